"""Importance log-weights log p(x, z_k) - log q(z_k | x), vectorized over K particles, for any model/guide.

Shared by the IWAE-family estimators, STL and the evaluation. Every latent must be local to the data
plate (dim -1): then each data point's weights involve only its own latents, and every bound is
correct per data point whatever the batch size.

The path-derivative estimators (STL, DReG) need log q_phi(z) with phi held fixed in the density while
each draw z = z(eps, phi) keeps its reparameterized path to phi, including, for a hierarchical guide
q(z1|x) q(z2|z1), the path from z1 into the parameters of q(z2|z1). ``log_weights(...,
stop_guide_params=True)`` builds exactly that (see ``_stopped_guide_log_prob``).
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from weakref import WeakKeyDictionary

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import detach, scale_and_mask
from pyro.params.param_store import _MODULE_NAMESPACE_DIVIDER
from pyro.poutine.messenger import Messenger

from pyro_vae.errors import UserError
from pyro_vae.estimators._checks import enumerated_refusal, model_only_enumerated, reparameterization_refusal
from pyro_vae.estimators._enumerated import summed_log_density
from pyro_vae.programs.sites import _trace, latent_sites, max_plate_nesting, sample_sites

_NESTING: WeakKeyDictionary = WeakKeyDictionary()


def check_num_particles(n: int) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_particles must be a positive integer, got {n!r}")


def plate_nesting(model, *args, **kwargs) -> int:
    """How many plate dims the model uses; traced once per model object and remembered."""
    if model not in _NESTING:
        _NESTING[model] = max_plate_nesting(_trace(model, *args, **kwargs))
    return _NESTING[model]


def _vectorized(fn, k: int, dim: int):
    def particles(*args, **kwargs):
        with pyro.plate("_particles", k, dim=dim):
            return fn(*args, **kwargs)
    return particles


def particle_traces(model, guide, k: int, *args, **kwargs) -> tuple[poutine.Trace, poutine.Trace]:
    """The guide's trace with k draws per point, and the model's trace replayed on those draws."""
    return _traces(model, guide, k, args, kwargs, separate=False)


class _FixedDraws(Messenger):
    """Each latent draw is detached as it is drawn, before any trace records it or the program reads it:
    no gradient reaches the guide's parameters through a draw, not even through q(z2|z1)'s use of z1."""

    def _pyro_post_sample(self, msg) -> None:
        if not msg["is_observed"] and torch.is_tensor(msg["value"]):
            msg["value"] = msg["value"].detach()


def _traces(model, guide, k: int, args: tuple, kwargs: dict, separate: bool,
            fixed_draws: bool = False) -> tuple[poutine.Trace, poutine.Trace]:
    dim = -plate_nesting(model, *args, **kwargs) - 1
    with _FixedDraws() if fixed_draws else contextlib.nullcontext(), _vectorization_errors(guide, k):
        # _FixedDraws outside the trace: it records the detached draws
        guide_tr = poutine.trace(_vectorized(guide, k, dim)).get_trace(*args, **kwargs)
    values_tr = _values_trace(guide_tr, separate)
    with _vectorization_errors(model, k):
        model_tr = poutine.trace(poutine.replay(_vectorized(model, k, dim), trace=values_tr)).get_trace(*args, **kwargs)
    return model_tr, guide_tr


@contextlib.contextmanager
def _vectorization_errors(program, k: int):
    """A program that runs on a batch but not with particles in a plate left of its plates (it reshapes or
    indexes from the left, ``z.view(B, -1)``, ``z[:, 0]``): one line saying so, not Pyro's trace table with
    its internal plate."""
    try:
        yield
    except (UserError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace("_particles", "particle plate")
        name = getattr(program, "__name__", None) or type(program).__name__
        raise UserError(f"{name} fails when run with {k} draws per data point in a plate left of its own plates "
                        f"({first}): write it to broadcast over leading batch dims (index and reshape from the "
                        "right: z[..., 0], z.reshape(*z.shape[:-1], 2, 2))") from e


def _site_log_prob(site: dict, nesting: int, stop_params: bool) -> torch.Tensor:
    fn = detach(site["fn"]) if stop_params else site["fn"]
    # the mask applies; a poutine.scale does not: log w is the model's own log p(x,z) - log q(z|x)
    lp = scale_and_mask(fn.log_prob(site["value"]), 1.0, site["mask"])
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape)
    if nesting > 1:  # plates nested inside a data point belong to that point's weight
        lp = lp.sum(dim=tuple(range(1, nesting)))
    return lp


class _DetachParams(Messenger):
    """``pyro.param`` values come back detached; a ``pyro.module`` parameter still live means a module
    the replay could not reach (not the guide object itself, nor one of its submodules)."""

    def _pyro_post_param(self, msg) -> None:
        value = msg["value"]
        if not (torch.is_tensor(value) and value.requires_grad):
            return
        if _MODULE_NAMESPACE_DIVIDER in msg["name"]:
            module = msg["name"].split(_MODULE_NAMESPACE_DIVIDER)[0]
            raise UserError(f"the path-derivative estimators cannot hold the parameters of module {module!r} "
                            "fixed: make the guide an nn.Module (e.g. a PyroModule) that owns it")
        detached = value.detach()
        if hasattr(value, "unconstrained"):  # Pyro's param capture reads it
            detached.unconstrained = value.unconstrained
        msg["value"] = detached


def _stopped_guide_log_prob(guide, guide_tr: poutine.Trace, model_tr: poutine.Trace, k: int, nesting: int,
                            args: tuple, kwargs: dict) -> torch.Tensor:
    """log q_phi(z) per point, (k, B), with phi held fixed and z the draws as the model consumed them.

    With one latent site, no site's distribution can depend on another latent, so detaching the
    parameters of the drawn distribution is enough (and free). Otherwise the guide is replayed on the
    values with its own parameters detached: its distributions are recomputed from the values, so
    the only gradient left runs through the values themselves (z1 into q(z2|z1) included). That
    costs one more forward pass of the guide, never a backward pass through its parameters. Only the
    ``pyro.sample`` draws are replayed, so the guide's other computation must be deterministic.
    """
    names = latent_sites(guide_tr)
    values_tr = poutine.Trace()
    for n in names:
        value = (model_tr.nodes if n in model_tr.nodes else guide_tr.nodes)[n]["value"]
        values_tr.add_node(n, **{**guide_tr.nodes[n], "value": value})
    if len(names) < 2:
        sites = [values_tr.nodes[n] if n in names else site for n, site in sample_sites(guide_tr).items()]
        return sum(_site_log_prob(site, nesting, stop_params=True) for site in sites)
    if isinstance(guide, torch.nn.Module):
        frozen = {n: p.detach() for n, p in guide.named_parameters()}

        def run(*a, **kw):
            return torch.func.functional_call(guide, frozen, a, kw)
    else:
        run = guide
    with warnings.catch_warnings(), _DetachParams():
        # pyro.module warns that the detached (requires_grad=False) parameters are not registered
        warnings.filterwarnings("ignore", message=".*was not registered in the param store")
        replay_tr = poutine.trace(poutine.replay(_vectorized(run, k, -nesting - 1), trace=values_tr)).get_trace(
            *args, **kwargs)
    if set(latent_sites(replay_tr)) != set(names):
        raise UserError("the guide sampled other latent sites when replayed on its own draws; the "
                        "path-derivative estimators need a guide whose sites do not change between runs")
    return sum(_site_log_prob(site, nesting, stop_params=False) for site in sample_sites(replay_tr).values())


def _values_trace(guide_tr: poutine.Trace, separate: bool) -> poutine.Trace:
    """The guide's draws for the model (and then the stopped-parameter log q) to consume.

    With ``separate``, each latent's value is a new autograd node (a view) used by log w alone, while
    the guide's own computation downstream of a draw (z1 -> q(z2|z1) -> z2) keeps the raw value. A
    gradient hook on the separate value then scales d log w / dz exactly once on every path to phi:
    a hook on a raw z2 would also run again at z1 for the part of d/dz2 that flows back through the
    guide's own z1 -> z2 map, and scale it twice.
    """
    if not separate:
        return guide_tr
    tr = poutine.Trace()
    for name, site in guide_tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            site = {**site, "value": site["value"].view_as(site["value"])}
        tr.add_node(name, **site)
    return tr


def log_weights(model, guide, k: int, *args, stop_guide_params: bool = False, fixed_draws: bool = False,
                **kwargs) -> tuple[torch.Tensor, tuple[poutine.Trace, poutine.Trace]]:
    """Log importance weights of shape (k, B), and the model and guide traces that made them.

    With ``stop_guide_params`` the guide's densities are evaluated with their parameters held fixed,
    while each draw z keeps its reparameterized path to the guide's parameters (including paths
    through other draws in a hierarchical guide): the form the path-derivative estimators (STL,
    DReG) differentiate. The model trace then holds separate copies of the draws, which are the
    values log w was computed from (``_values_trace`` says why DReG needs them).

    With ``fixed_draws`` every draw is detached as it is drawn (``_FixedDraws``): log w depends on the
    parameters only through the densities, the form reweighted wake-sleep differentiates.

    A model-side enumerated site (``infer={"enumerate": "parallel"}`` in the model, none in the guide,
    e.g. a mixture component c) is summed out exactly: log w = log sum_c p(x, z, c) - log q(z|x)
    (``pyro_vae.estimators._enumerated``).
    """
    return _log_weights(model, guide, k, args, kwargs, stop_guide_params, None, fixed_draws)


def _log_weights(model, guide, k: int, args: tuple, kwargs: dict, stop_guide_params: bool,
                 estimator: str | None, fixed_draws: bool = False) -> tuple[torch.Tensor, tuple[poutine.Trace, poutine.Trace]]:
    model_tr, guide_tr = _traces(model, guide, k, args, kwargs, separate=stop_guide_params, fixed_draws=fixed_draws)
    nesting = plate_nesting(model, *args, **kwargs)
    for name in latent_sites(model_tr):
        if not any(f.dim == -1 and f.vectorized for f in model_tr.nodes[name]["cond_indep_stack"]
                   if f.name != "_particles"):
            raise UserError(f"importance weights need every latent inside the data plate at dim -1; "
                            f"{name!r} is global, so its weight would be shared by all points")
    enumerated = model_only_enumerated(sample_sites(model_tr), guide_tr.nodes)
    if enumerated and estimator is not None:
        raise enumerated_refusal(estimator, enumerated)
    if enumerated:  # the model run again, its enumerated sites summed out, on the values it consumed
        values = poutine.Trace()
        for n in latent_sites(guide_tr):
            values.add_node(n, **{**guide_tr.nodes[n], "value": model_tr.nodes[n]["value"]})
        log_w = summed_log_density(_vectorized(model, k, -nesting - 1), values, nesting, args, kwargs)
    else:
        log_w = 0.0
        for site in sample_sites(model_tr).values():
            log_w = log_w + _site_log_prob(site, nesting, False)
    if stop_guide_params:
        log_w = log_w - _stopped_guide_log_prob(guide, guide_tr, model_tr, k, nesting, args, kwargs)
    else:
        for site in sample_sites(guide_tr).values():
            log_w = log_w - _site_log_prob(site, nesting, False)
    if not torch.is_tensor(log_w) or log_w.dim() != 2:
        raise UserError("could not form per-point log-weights: the model must sample in pyro.plate('data') at dim -1")
    return log_w, (model_tr, guide_tr)


def require_unscaled(model_tr: poutine.Trace, guide_tr: poutine.Trace, estimator: str) -> None:
    """A scale (poutine.scale, a subsampled plate) does not commute with the logsumexp of the weights."""
    for tr in (model_tr, guide_tr):
        for name, site in sample_sites(tr).items():
            if not (isinstance(site["scale"], (int, float)) and site["scale"] == 1.0):
                raise UserError(f"{estimator} needs unscaled sites, but {name!r} is scaled (poutine.scale or a "
                                "subsampled plate); use the elbo estimator")


def require_reparameterized(guide_tr: poutine.Trace, estimator: str) -> None:
    """Refuse guide sites without a reparameterized sampler, naming the estimators that fit them (the one
    message, built in ``_checks.reparameterization_refusal``)."""
    bad = {n: guide_tr.nodes[n]["fn"] for n in latent_sites(guide_tr) if not guide_tr.nodes[n]["fn"].has_rsample}
    if bad:
        raise reparameterization_refusal(estimator, bad)


def estimator_log_weights(name: str, model, guide, k: int, args: tuple, kwargs: dict, *,
                          path_derivative: bool = False, reparameterized: bool = True,
                          fixed_draws: bool = False) -> tuple[torch.Tensor, tuple[poutine.Trace, poutine.Trace]]:
    """log_weights for an importance-weighted estimator, after checking what its gradient needs
    (``reparameterized=False`` for estimators with score-function or wake-phase guide gradients)."""
    log_w, (model_tr, guide_tr) = _log_weights(model, guide, k, args, kwargs, path_derivative, name, fixed_draws)
    if reparameterized:
        require_reparameterized(guide_tr, name)
    require_unscaled(model_tr, guide_tr, name)
    return log_w, (model_tr, guide_tr)
