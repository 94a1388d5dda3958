"""Reading a model program for ``AutoAmortized``: one ``SiteSpec`` per latent site, and what feeds the encoder.

The model is traced twice on the example batch (two random seeds, no side effects): its sample sites,
their distributions, supports, shapes, plates and ``infer`` configs are read from the first trace, and
the second one shows which supports are fixed (the same in both traces and for every point) and
that the program samples the same sites each time. Whatever the guide could not represent exactly is
refused here, in one line naming the site, before any network is built.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch.distributions import biject_to, constraints

from pyro_vae.programs.sites import _trace, sample_sites

from ._auto_families import SiteError, fixed_support, holds_counts, is_real, unwrap

DISCRETE = ("bernoulli", "categorical", "onehot")


@dataclass
class SiteSpec:
    """What the guide needs to know about one latent site of the model.

    ``kind``: ``real`` (a Normal family), ``constrained`` (a Normal family pushed through
    ``biject_to(support)``), ``point`` (a point mass: the model masks the site's log-density out
    entirely), or one of the discrete families ``bernoulli``, ``categorical``, ``onehot``.
    ``free_shape`` is the shape per draw that the head parameterizes: the unconstrained event shape of
    a continuous site (``transform.inverse_shape(event_shape)``), the event shape of a discrete one.
    ``kwarg`` names the model's keyword argument that observes the site when given (M2's ``y``): the
    head is then used only in calls without it.
    """

    name: str
    kind: str
    local: bool
    event_shape: tuple[int, ...]
    free_shape: tuple[int, ...]
    support: constraints.Constraint | None = None
    num_categories: int = 0
    infer: dict = field(default_factory=dict)
    kwarg: str | None = None
    batch_shape: tuple[int, ...] = ()                     # global sites: the batch shape their plates give
    frames: tuple[tuple[str, int, int], ...] = ()         # global sites: (name, size, dim) of their plates
    init: torch.Tensor | None = None                      # a starting location (free space) or prior logits
    index: int = -1                                       # position among the local heads or global parts

    @property
    def discrete(self) -> bool:
        return self.kind in DISCRETE

    def transform(self) -> torch.distributions.Transform | None:
        """The bijection from free (real) space onto the support, caching its last value, or None."""
        return biject_to(self.support).with_cache(1) if self.support is not None else None

    @property
    def free_dim(self) -> int:
        return _numel(self.free_shape)

    @property
    def feature_dim(self) -> int:
        """Width of the site's value as an input of later heads (one-hot for a Categorical)."""
        return _numel(self.event_shape) * (self.num_categories if self.kind == "categorical" else 1) \
            if self.discrete else self.free_dim

    def features(self, value: torch.Tensor, free: torch.Tensor | None = None) -> torch.Tensor:
        """The value flattened per draw, ``(..., feature_dim)``: unconstrained for continuous sites
        (``free``, where the caller has it), one-hot for a Categorical."""
        if self.kind == "categorical":
            v, nd = torch.nn.functional.one_hot(value.long(), self.num_categories), len(self.event_shape) + 1
        elif self.discrete:
            v, nd = value, len(self.event_shape)
        else:
            t = self.transform()
            v = free if free is not None else (t.inv(value) if t is not None else value)
            nd = len(self.free_shape)
        return v.reshape(v.shape[:v.dim() - nd] + (-1,))


@dataclass
class ProgramSpec:
    sites: list[SiteSpec]
    encoder_kwargs: list[tuple[str, str, int]]  # (name, "onehot" | "flat", width) of per-point tensor kwargs
    x_width: int
    counts: bool                                # every observed site in the data plate holds counts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@contextlib.contextmanager
def seeded(seed: int):
    """Every generator (CPU and each CUDA device) seeded with ``seed`` inside, and restored afterwards."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _seeded_trace(model, x, kwargs, seed: int) -> poutine.Trace:
    with seeded(seed):
        return _trace(model, x, **kwargs)


def _data_plate(site: dict, name: str, batch: int) -> bool:
    """Whether the site is local (inside pyro.plate("data") at dim -1, one draw per point); refuses layouts
    the guide cannot mirror."""
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    for f in frames:
        if f.full_size is not None and f.full_size != f.size:
            raise SiteError(f"site {name!r} is in a subsampled plate {f.name!r} ({f.size} of {f.full_size}); "
                            "AutoAmortized needs unsubsampled plates")
    data = [f for f in frames if f.name == "data"]
    if not data:
        return False
    f = data[0]
    if f.dim != -1:
        raise SiteError(f"site {name!r} is in pyro.plate('data') at dim {f.dim}; AutoAmortized needs it at dim -1")
    if f.size != batch:
        raise SiteError(f"site {name!r} is in pyro.plate('data') of size {f.size} for a batch of {batch} points; "
                        "AutoAmortized needs one plate entry per data point")
    others = [g.name for g in frames if g.name != "data"]
    if others:
        raise SiteError(f"site {name!r} is in plate(s) {', '.join(others)} inside pyro.plate('data'); AutoAmortized "
                        "handles one draw per data point: make those dims event dims with .to_event()")
    if tuple(site["fn"].batch_shape) != (batch,):
        raise SiteError(f"site {name!r} has batch shape {tuple(site['fn'].batch_shape)} inside pyro.plate('data') "
                        f"of {batch} points; make the dims right of the data dim event dims with .to_event()")
    return True


def _observing_kwarg(model, x, kwargs: dict, name: str, site: dict, signature) -> str | None:
    """The keyword argument that turns this latent into an observed site (M2's ``y``), found by tracing
    the model again with the drawn value passed under that name."""
    candidates = []
    if signature is not None and (name in signature.parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())):
        candidates.append(name)
    if getattr(model, "labels", None) == "optional" and getattr(model, "label_site", None) == name:
        candidates.append("y")
    for k in dict.fromkeys(candidates):
        if k in kwargs or k == "x":
            continue
        value = site["value"].detach()
        try:
            again = _seeded_trace(model, x, {**kwargs, k: value}, 0).nodes.get(name)
        except Exception:  # the model does not take it this way: not an observing argument
            continue
        if again is not None and again["is_observed"] and again["value"] is value:
            return k
    return None


def _signature(model):
    try:
        return inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
    except (TypeError, ValueError):
        return None


def _prior_location(fn, value: torch.Tensor, transform) -> torch.Tensor:
    """The prior's mean (or the drawn value where it has none) in free space."""
    try:
        m = fn.mean.detach()
    except NotImplementedError:
        m = value.detach()
    if m.shape != value.shape or not bool(torch.isfinite(m).all()):
        m = value.detach()
    u = transform.inv(m) if transform is not None else m
    return torch.where(torch.isfinite(u), u, torch.zeros_like(u))


def _discrete_spec(name, site, local, kwarg, enumerate_mode) -> SiteSpec:
    fn, base = site["fn"], unwrap(site["fn"])
    if site["mask"] is False:
        raise SiteError(f"site {name!r} is discrete and masked out of the model; AutoAmortized has no point mass for it")
    if not local:
        raise SiteError(f"site {name!r} is a discrete latent outside pyro.plate('data'); AutoAmortized's global "
                        "part is a Normal: make it local, or sum it out in the model")
    infer = {k: v for k, v in site["infer"].items() if not k.startswith("_")}
    if enumerate_mode and "enumerate" not in infer and fn.has_enumerate_support:
        infer["enumerate"] = enumerate_mode
    event = tuple(fn.event_shape)
    if isinstance(base, dist.Bernoulli):
        kind, k, init = "bernoulli", 0, base.logits.detach()
    elif isinstance(base, dist.OneHotCategorical):
        kind, k, init = "onehot", int(base.logits.shape[-1]), torch.log_softmax(base.logits.detach(), -1)
    elif isinstance(base, dist.Categorical):
        kind, k, init = "categorical", int(base.logits.shape[-1]), torch.log_softmax(base.logits.detach(), -1)
    else:
        raise SiteError(f"site {name!r} is a discrete {type(base).__name__}; AutoAmortized has heads for Bernoulli, "
                        "Categorical and OneHotCategorical latents only")
    width = _numel(event) * (k if kind == "categorical" else 1)
    init = init.expand(fn.batch_shape + event + ((k,) if kind == "categorical" else ())).reshape(-1, width).mean(0)
    return SiteSpec(name, kind, True, event, event, num_categories=k, infer=infer, kwarg=kwarg, init=init)


def _continuous_spec(name, site, again, local, kwarg) -> SiteSpec:
    fn = site["fn"]
    support = fixed_support(fn.support, again["fn"].support, name)
    transform = None
    if not is_real(support):
        try:
            transform = biject_to(support)
        except NotImplementedError:
            raise SiteError(f"site {name!r} has support {support}, which Pyro has no bijection from the real numbers "
                            "for (biject_to); AutoAmortized cannot place a Normal on it") from None
    kind = "point" if site["mask"] is False else "real" if transform is None else "constrained"
    event = tuple(fn.event_shape)
    free = tuple(transform.inverse_shape(event)) if transform is not None else event
    init = _prior_location(fn, site["value"], transform)
    if local:
        init = init.reshape(-1, _numel(free)).mean(0)
    frames = () if local else tuple((f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized)
    return SiteSpec(name, kind, local, event, free, support=None if transform is None else support, kwarg=kwarg,
                    batch_shape=() if local else tuple(fn.batch_shape), frames=frames, init=init)


def read_model(model, x: torch.Tensor, kwargs: dict, enumerate_mode: str | None,
               model_enumerated: str = "guide") -> ProgramSpec:
    """The latent sites of ``model(x, **kwargs)`` in the model's order, and the encoder's inputs.

    With ``model_enumerated="model"``, a discrete site the model itself marks ``infer={"enumerate": ...}``
    gets no guide site: it is summed out in the model (a mixture prior written the natural way)."""
    batch = x.shape[0]
    with poutine.block(), pyro.validation_enabled(False):
        first, second = _seeded_trace(model, x, kwargs, 0), _seeded_trace(model, x, kwargs, 1)
    sites, again = sample_sites(first), sample_sites(second)
    shape = {n: (s["is_observed"], tuple(s["value"].shape)) for n, s in sites.items()}
    if shape != {n: (s["is_observed"], tuple(s["value"].shape)) for n, s in again.items()}:
        raise SiteError("the model samples other sites (or shapes) on another run with the same data; AutoAmortized "
                        "needs a program whose sites do not depend on random draws")
    tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
    signature = _signature(model)
    specs, counts, observed, left = [], True, 0, 0
    for name, site in sites.items():
        local = _data_plate(site, name, batch)
        kwarg = None
        if site["is_observed"]:
            kwarg = next((k for k, v in tensors.items() if site["value"] is v), None)
            if kwarg is None:  # data: it feeds the encoder through x
                if local:
                    observed += 1
                    counts = counts and holds_counts(site["fn"].support)
                continue
        elif local:
            with poutine.block(), pyro.validation_enabled(False):
                kwarg = _observing_kwarg(model, x, kwargs, name, site, signature)
        if site["fn"].support.is_discrete and model_enumerated == "model" and site["infer"].get("enumerate") \
                and not site["is_observed"]:
            left += 1
        elif site["fn"].support.is_discrete:
            specs.append(_discrete_spec(name, site, local, kwarg, enumerate_mode))
        else:
            specs.append(_continuous_spec(name, site, again[name], local, kwarg))
    if not specs and not left:
        raise SiteError("the model has no latent sites: there is nothing for a guide to infer")
    conditioned = {s.kwarg for s in specs}
    encoder = []
    for k, v in tensors.items():
        if k in conditioned or v.dim() == 0 or v.shape[0] != batch:
            continue  # a site's value, or not per point
        if v.dtype.is_floating_point or v.dtype == torch.bool:
            encoder.append((k, "flat", _numel(v.shape[1:])))
        elif v.dim() == 1 and isinstance(getattr(model, "num_classes", None), int):
            encoder.append((k, "onehot", int(model.num_classes)))
        else:
            raise SiteError(f"the model's keyword argument {k!r} is an integer tensor; give the model a num_classes "
                            "attribute so the encoder can one-hot encode it, or pass it one-hot as floats")
    return ProgramSpec(specs, encoder, _numel(x.shape[1:]), counts and observed > 0)
