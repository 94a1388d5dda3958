"""The pieces of ``AutoAmortized`` that depend on a site's support and family: reading supports, and
building q at a site from its head's output."""
from __future__ import annotations

import copy

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import ReshapeTransform

from pyro_vae.errors import UserError
from pyro_vae.nets import split_loc_scale

from .flow import iaf_transforms


class SiteError(UserError, ValueError):
    """A model site that AutoAmortized cannot represent; the message names the site."""


def unwrap(fn):
    """The distribution under Independent / Expanded / Masked wrappers."""
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def base_constraint(c):
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def support_name(c) -> str:
    """A support's short name: "positive", "interval(0.0, 1.0)", "Simplex"; the class name where a bound is a tensor."""
    c = base_constraint(c)
    lower, upper = getattr(c, "lower_bound", None), getattr(c, "upper_bound", None)
    if not (torch.is_tensor(lower) or torch.is_tensor(upper)):
        if isinstance(c, (constraints._GreaterThan, constraints._GreaterThanEq)):
            return "positive" if lower == 0 else f"greater than {lower}"
        if isinstance(c, (constraints._Interval, constraints._HalfOpenInterval)):
            return f"interval({lower}, {upper})"
    return type(c).__name__.strip("_")


def is_real(c) -> bool:
    return isinstance(base_constraint(c), constraints._Real)


def holds_counts(c) -> bool:
    """A non-negative integer support wider than {0, 1} (Poisson, Binomial, negative binomial counts)."""
    c = base_constraint(c)
    if isinstance(c, constraints._IntegerGreaterThan):
        return float(c.lower_bound) >= 0
    if isinstance(c, constraints._IntegerInterval):
        return float(torch.as_tensor(c.lower_bound).min()) >= 0 and float(torch.as_tensor(c.upper_bound).max()) > 1
    return False


def fixed_support(c, other, name: str):
    """The support with any tensor bounds replaced by their one value, or a SiteError when a bound is
    learned, differs between points or between two runs (then it depends on parameters, data or latents)."""
    if isinstance(c, constraints.independent):
        return constraints.independent(fixed_support(c.base_constraint, other.base_constraint, name),
                                       c.reinterpreted_batch_ndims)
    if constraints.is_dependent(c):
        raise SiteError(f"site {name!r} has a dependent support ({c}) that AutoAmortized cannot place a Normal on")
    bounds = {k: v for k, v in vars(c).items() if torch.is_tensor(v)}
    if not bounds:
        return c
    fixed = {}
    for k, v in bounds.items():
        flat, again = v.detach().reshape(-1), getattr(other, k, None)
        same = torch.is_tensor(again) and again.shape == v.shape and torch.equal(again.detach(), v.detach())
        if v.requires_grad or not same or not bool((flat == flat[0]).all()):
            raise SiteError(f"site {name!r} has a support ({support_name(c)}) whose {k} depends on the model's "
                            "parameters, its data or other latents; AutoAmortized needs a fixed support to map a Normal onto")
        fixed[k] = float(flat[0])
    out = copy.copy(c)
    vars(out).update(fixed)
    return out


def uses_iaf(spec, config) -> bool:
    """Whether the site's continuous family is the IAF flow (a point mass or a 1-d site stays diagonal)."""
    return config.family == "iaf" and not spec.discrete and spec.kind != "point" and spec.free_dim > 1 \
        and int(config.num_flows) > 0


def out_dim(spec, config) -> int:
    """The head's output width for the site."""
    if spec.discrete:
        return spec.feature_dim
    d = spec.free_dim
    if spec.kind == "point":
        return d
    if config.family == "lowrank":
        return 2 * d + d * int(config.rank)
    return 2 * d + (int(config.context_dim) if uses_iaf(spec, config) else 0)


def continuous(spec, config, out: torch.Tensor, t, flows) -> dist.TorchDistribution:
    """q at a continuous site from its head's output ``out``: the family over the free vector, reshaped to the
    site's free shape, then pushed through the support's bijection ``t`` (None for a real site)."""
    batch = out.shape[:-1]
    d, shape = spec.free_dim, spec.free_shape
    transforms = []
    if config.family == "lowrank":
        loc, raw, factor = out.split([d, d, d * int(config.rank)], -1)
        base = dist.LowRankMultivariateNormal(loc, factor.reshape(*batch, d, int(config.rank)),
                                              nn.functional.softplus(raw) + 1e-6)
    elif uses_iaf(spec, config):
        loc, scale = split_loc_scale(out[..., :2 * d])
        base = dist.Normal(loc, scale).to_event(1)
        reverse = torch.arange(d - 1, -1, -1, device=out.device)
        transforms += iaf_transforms(flows, out[..., 2 * d:], reverse)
    else:
        loc, scale = split_loc_scale(out)
        base = dist.Normal(loc.reshape(batch + shape), scale.reshape(batch + shape)).to_event(len(shape))
        shape = None  # already in the site's free shape
    if shape is not None and shape != (d,):
        transforms.append(ReshapeTransform((d,), shape))
    if t is not None:
        transforms.append(t)
    return dist.TransformedDistribution(base, transforms) if transforms else base


def discrete(spec, out: torch.Tensor) -> dist.TorchDistribution:
    """q at a discrete site: the model site's family with logits from the head."""
    batch = out.shape[:-1]
    event = spec.event_shape
    if spec.kind == "bernoulli":
        return dist.Bernoulli(logits=out.reshape(batch + event)).to_event(len(event))
    if spec.kind == "categorical":
        return dist.Categorical(logits=out.reshape(batch + event + (spec.num_categories,))).to_event(len(event))
    return dist.OneHotCategorical(logits=out.reshape(batch + event)).to_event(len(event) - 1)
