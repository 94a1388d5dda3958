"""The local guide q*(z|x_n) of the inference gaps: a mean-field Gaussian per point, in each latent's
unconstrained space, so that any continuous latent can be fitted.

For a latent site with support S, q* is the Gaussian N(loc_n, diag scale_n^2) pushed through
T = ``torch.distributions.biject_to(S)`` (the identity for real-valued latents, exp for positive ones,
a sigmoid for an interval, stick-breaking for a simplex), with the change-of-variables term in its
density: log q*(z) = log N(T^-1(z)) - log |det dT/du| at u = T^-1(z). This is the variational family
of ADVI (Kucukelbir et al. 2017, "Automatic Differentiation Variational Inference").
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to, constraints

from pyro_vae.errors import UserError
from pyro_vae.estimators._weights import particle_traces
from pyro_vae.programs.sites import _trace, latent_sites


def unconstrained_transform(support) -> torch.distributions.Transform:
    """``biject_to(support)``, looking through the support of a mixture (which is its components')."""
    while isinstance(support, constraints.MixtureSameFamilyConstraint):
        support = support.base_constraint
    return biject_to(support)


def is_identity(transform: torch.distributions.Transform) -> bool:
    """Whether ``transform`` is the identity (what ``biject_to`` gives for real-valued supports)."""
    if isinstance(transform, torch.distributions.IndependentTransform):
        return is_identity(transform.base_transform)
    return isinstance(transform, torch.distributions.ComposeTransform) and not transform.parts


@dataclass
class SiteStart:
    """Where q* starts for one latent site: loc and scale in the unconstrained space, the map T to the
    site's support, and the site's event dim in that space."""

    loc: torch.Tensor
    scale: torch.Tensor
    transform: torch.distributions.Transform
    event_dim: int


class LocalGaussian(nn.Module):
    """q*(z|x_n) = prod over latent sites of T_site(Normal(loc_n, diag scale_n^2)): free parameters for each
    of the B points of one batch, shaped like each site's unconstrained value, and no encoder. A guide for
    that batch only.

    A plain nn.Module, never in Pyro's param store, so fitting it touches nothing global.
    """

    def __init__(self, init: dict[str, SiteStart]):
        super().__init__()
        self.sites = list(init)
        # ParameterDict keys cannot hold every site name (dots), so parameters are indexed by position
        self.locs = nn.ParameterList([nn.Parameter(s.loc.detach().clone()) for s in init.values()])
        self.log_scales = nn.ParameterList([nn.Parameter(s.scale.detach().clamp_min(1e-6).log())
                                            for s in init.values()])
        self.transforms = [s.transform for s in init.values()]
        self.event_dims = [s.event_dim for s in init.values()]

    @property
    def loc(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.sites, self.locs))

    @property
    def scale(self) -> dict[str, torch.Tensor]:
        return {n: s.exp() for n, s in zip(self.sites, self.log_scales)}

    @property
    def transformed(self) -> list[str]:
        """The sites fitted in an unconstrained space (their loc and scale are not those of z itself)."""
        return [n for n, t in zip(self.sites, self.transforms) if not is_identity(t)]

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            for name, loc, log_scale, t, event_dim in zip(self.sites, self.locs, self.log_scales, self.transforms,
                                                          self.event_dims):
                base = dist.Normal(loc, log_scale.exp()).to_event(event_dim)
                pyro.sample(name, base if is_identity(t) else dist.TransformedDistribution(base, t))


def _bounds(support) -> list[torch.Tensor]:
    """The tensor-valued bounds of a (possibly wrapped) support, e.g. an interval's ends."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return [v for k in ("lower_bound", "upper_bound") if torch.is_tensor(v := getattr(support, k, None))]


def _check_fixed_support(model, x: torch.Tensor, name: str, support, kwargs: dict) -> None:
    """q* uses one map T per site; a support that moves with other latents (Uniform(0, z1)) has none."""
    bounds = _bounds(support)
    if not bounds:
        return
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(torch.initial_seed() + 1)
        other = _bounds(_trace(model, x, **kwargs).nodes[name]["fn"].support)
    if any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(bounds, other)):
        raise UserError(f"the model's latent {name!r} has a support that depends on other latents ({support}); "
                        "the local q*(z|x) of the inference gaps needs a fixed support per site")


@torch.no_grad()
def gaussian_start(model, guide, x: torch.Tensor, num_draws: int = 256, **kwargs) -> dict[str, SiteStart]:
    """Per latent site, a mean-field Gaussian in the site's unconstrained space matching the guide at x: the
    guide's own mean and standard deviation where the site is real-valued and the guide has them (Normal,
    MultivariateNormal), else the moments of T^-1 of its draws."""
    guide_tr, model_tr = _trace(guide, x, **kwargs), _trace(model, x, **kwargs)
    init, moments = {}, []
    for name in latent_sites(guide_tr):
        support = model_tr.nodes[name]["fn"].support
        if support.is_discrete:
            raise UserError(f"the model's latent {name!r} is discrete ({support}); the local q*(z|x) of the "
                            "inference gaps is a density over continuous latents")
        _check_fixed_support(model, x, name, support, kwargs)
        try:
            t = unconstrained_transform(support)
        except NotImplementedError:
            raise UserError(f"the model's latent {name!r} has support {support}, which torch cannot map to an "
                            "unconstrained space (biject_to); the inference gaps cannot fit a local q* to it") from None
        fn = guide_tr.nodes[name]["fn"]
        event_dim = fn.event_dim - t.codomain.event_dim + t.domain.event_dim
        if is_identity(t):
            try:
                init[name] = SiteStart(fn.mean, fn.variance.sqrt(), t, event_dim)
                continue
            except NotImplementedError:  # a flow: no closed-form moments
                pass
        moments.append((name, t, event_dim))
    if moments:
        _, tr = particle_traces(model, guide, num_draws, x, **kwargs)
        for name, t, event_dim in moments:
            u = t.inv(tr.nodes[name]["value"])
            u = torch.where(torch.isfinite(u), u, torch.nan)  # a draw on the support's edge (an underflow to 0)
            loc = u.nanmean(0)
            std = ((u - loc) ** 2).nanmean(0).sqrt()
            init[name] = SiteStart(torch.nan_to_num(loc), torch.nan_to_num(std, nan=1.0).clamp_min(1e-3), t,
                                   event_dim)
    return init
