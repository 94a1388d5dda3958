"""What a model or guide program samples, read from its trace, so no code has to know the model."""
from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import UserError
from pyro_vae.programs.structure import check_site_pair, check_structure, plate_error


def _trace(fn, *args, **kwargs) -> poutine.Trace:
    """Trace a program for inspection without side effects: no global params, no RNG draws used up."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=cuda):
        return poutine.trace(fn).get_trace(*args, **kwargs)


def sample_sites(trace: poutine.Trace) -> dict[str, dict]:
    """The trace's sample statements, without the pseudo-sites that plates record."""
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def latent_sites(trace: poutine.Trace) -> list[str]:
    return [n for n, s in sample_sites(trace).items() if not s["is_observed"]]


def observed_sites(trace: poutine.Trace) -> list[str]:
    return [n for n, s in sample_sites(trace).items() if s["is_observed"]]


def max_plate_nesting(trace: poutine.Trace) -> int:
    dims = [f.dim for s in trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]
            if f.vectorized]
    return -min(dims) if dims else 0


def _structured_trace(program, x: torch.Tensor, **kwargs) -> poutine.Trace:
    """A trace of ``program``, its shapes checked against the contract (``structure.check_structure``)."""
    try:
        tr = _trace(program, x, **kwargs)
    except ValueError as e:
        err = plate_error(e, program)
        if err is not None:
            raise err from e
        raise
    check_structure(tr, program, sample_sites(tr), x.shape[0])
    return tr


def check_pairing(model, guide, x: torch.Tensor, **kwargs) -> None:
    """Raise a UserError naming any latent site the guide misses or adds, relative to the model, or samples
    with other plates, event dims, shape or support than the model's (``structure.check_site_pair``).

    A model's discrete site marked ``infer={"enumerate": "parallel"}`` needs no guide site: enum-elbo sums
    it out, the evaluation too, and the other estimators say they cannot."""
    model_tr = _structured_trace(model, x, **kwargs)
    try:
        guide_tr = _structured_trace(guide, x, **kwargs)
    except UserError:
        raise
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{type(guide).__name__} does not fit {type(model).__name__}: the guide fails on "
                        f"its data: {first}") from e
    model_sites, guide_sites = sample_sites(model_tr), sample_sites(guide_tr)
    model_latents, guide_latents = set(latent_sites(model_tr)), set(latent_sites(guide_tr))
    summed = {n for n in model_latents - guide_latents
              if (model_sites[n].get("infer") or {}).get("enumerate") == "parallel"
              and model_sites[n]["fn"].support.is_discrete}
    missing, extra = sorted(model_latents - guide_latents - summed), sorted(guide_latents - model_latents)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the guide has no site for the model's latent(s) {', '.join(missing)}")
        if extra:
            parts.append(f"the guide samples {', '.join(extra)}, which the model does not have")
        raise UserError(f"{type(guide).__name__} does not fit {type(model).__name__}: " + "; ".join(parts))
    for name in sorted(model_latents & guide_latents):
        check_site_pair(name, model, guide, model_sites[name], guide_sites[name])


def check_data_fits(model, x: torch.Tensor, **kwargs) -> None:
    """Raise a UserError if a batch does not fit the model: wrong shape, or outside the likelihood's support.
    The model's plates and shapes are checked first (``structure.check_structure``)."""
    try:
        trace = _structured_trace(model, x, **kwargs)
    except UserError:
        raise
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data of shape {tuple(x.shape[1:])} per point do not fit {type(model).__name__}: {first}") from e
    for name in observed_sites(trace):
        site = trace.nodes[name]
        fn = site["fn"]
        if tuple(site["value"].shape) != tuple(fn.shape()):
            raise UserError(f"data of shape {tuple(x.shape[1:])} per point do not fit {type(model).__name__}: "
                            f"its likelihood at site {name!r} expects {tuple(fn.event_shape) or 'scalars'}")
        if not bool(fn.support.check(site["value"]).all()):
            raise UserError(
                f"data outside the support of {type(model).__name__}'s likelihood at site {name!r} "
                f"({type(fn.base_dist if hasattr(fn, 'base_dist') else fn).__name__} needs {fn.support}); "
                "binarize the data or choose another likelihood")


def mean_or_sample(fn, value: torch.Tensor) -> torch.Tensor:
    """A site's mean, or its drawn value where the distribution has no closed-form mean."""
    try:
        return fn.mean
    except NotImplementedError:  # e.g. a flow guide: no closed-form mean
        return value


def latent_summary(fn, value: torch.Tensor) -> torch.Tensor:
    """A latent's mean, or its mode where it is discrete (a class index has no meaningful mean)."""
    if fn.support.is_discrete:
        try:
            return fn.mode
        except NotImplementedError:
            return value
    return mean_or_sample(fn, value)
