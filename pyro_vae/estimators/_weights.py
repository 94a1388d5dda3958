"""Importance log-weights log p(x, z_k) - log q(z_k | x), vectorized over K particles, for any model/guide.

Shared by the IWAE-family estimators, STL and the evaluation. Every latent must be local to the data
plate (dim -1): then each data point's weights involve only its own latents, and every bound is
correct per data point whatever the batch size.
"""
from __future__ import annotations

import numbers
from weakref import WeakKeyDictionary

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import detach, scale_and_mask

from ..errors import UserError
from ..sites import _trace, latent_sites, max_plate_nesting, sample_sites

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
    dim = -plate_nesting(model, *args, **kwargs) - 1
    guide_tr = poutine.trace(_vectorized(guide, k, dim)).get_trace(*args, **kwargs)
    model_tr = poutine.trace(poutine.replay(_vectorized(model, k, dim), trace=guide_tr)).get_trace(*args, **kwargs)
    return model_tr, guide_tr


def _site_log_prob(site: dict, nesting: int, stop_params: bool) -> torch.Tensor:
    fn = detach(site["fn"]) if stop_params else site["fn"]
    # the mask applies; a poutine.scale does not: log w is the model's own log p(x,z) - log q(z|x)
    lp = scale_and_mask(fn.log_prob(site["value"]), 1.0, site["mask"])
    lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + lp.shape)
    if nesting > 1:  # plates nested inside a data point belong to that point's weight
        lp = lp.sum(dim=tuple(range(1, nesting)))
    return lp


def log_weights(model, guide, k: int, *args, stop_guide_params: bool = False,
                **kwargs) -> tuple[torch.Tensor, poutine.Trace]:
    """Log importance weights of shape (k, B), and the guide trace that drew them.

    With ``stop_guide_params`` the guide's densities are evaluated with their parameters detached,
    while each draw z keeps its reparameterized path to the guide's parameters: the form the
    path-derivative estimators (STL, DReG) differentiate.
    """
    model_tr, guide_tr = particle_traces(model, guide, k, *args, **kwargs)
    nesting = plate_nesting(model, *args, **kwargs)
    for name in latent_sites(model_tr):
        if not any(f.dim == -1 and f.vectorized for f in model_tr.nodes[name]["cond_indep_stack"]
                   if f.name != "_particles"):
            raise UserError(f"importance weights need every latent inside the data plate at dim -1; "
                            f"{name!r} is global, so its weight would be shared by all points")
    log_w = 0.0
    for site in sample_sites(model_tr).values():
        log_w = log_w + _site_log_prob(site, nesting, False)
    for site in sample_sites(guide_tr).values():
        log_w = log_w - _site_log_prob(site, nesting, stop_guide_params)
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
    bad = [n for n in latent_sites(guide_tr) if not guide_tr.nodes[n]["fn"].has_rsample]
    if bad:
        raise UserError(f"{estimator} needs reparameterizable guide sites; {', '.join(bad)} "
                        "cannot be reparameterized (use the elbo estimator)")


def require_independent_guide_sites(guide_tr: poutine.Trace, estimator: str) -> None:
    """Path-derivative estimators detach the guide's parameters; that is only right when no guide latent
    feeds the distribution of another, or the detached density would also cut the path through it."""
    names = latent_sites(guide_tr)
    values = {n: guide_tr.nodes[n]["value"] for n in names}
    upstream = [n for n in names if values[n].requires_grad]
    if len(names) < 2 or not upstream:
        return
    for name in names:
        site = guide_tr.nodes[name]
        lp = site["fn"].log_prob(site["value"].detach()).sum()
        others = [n for n in upstream if n != name]
        if not lp.requires_grad or not others:
            continue
        grads = torch.autograd.grad(lp, [values[n] for n in others], allow_unused=True, retain_graph=True)
        feeding = [n for n, g in zip(others, grads) if g is not None]
        if feeding:
            raise UserError(f"{estimator} needs guide latents that do not feed each other, but the guide's "
                            f"{name!r} depends on {', '.join(map(repr, feeding))}")


def estimator_log_weights(name: str, model, guide, k: int, args: tuple, kwargs: dict, *,
                          path_derivative: bool = False) -> tuple[torch.Tensor, poutine.Trace]:
    """log_weights for an importance-weighted estimator, after checking what its gradient needs."""
    log_w, (model_tr, guide_tr) = log_weights(model, guide, k, *args, stop_guide_params=path_derivative, **kwargs)
    require_reparameterized(guide_tr, name)
    require_unscaled(model_tr, guide_tr, name)
    if path_derivative:
        require_independent_guide_sites(guide_tr, name)
    return log_w, guide_tr
