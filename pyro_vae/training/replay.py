"""Record an estimator's loss once per input signature as a graph of tensor operations, and replay it.

Running a Pyro program costs Python work on every step: effect handlers, traces, ``pyro.module``
registrations, site checks. The tensor operations a static program performs depend only on the shapes
of its inputs, so ``Replayed(estimator)`` records them once per signature with ``make_fx`` (above
autograd, so ``detach`` and grad-mode changes are kept) and afterwards calls that graph on the live
parameters: same operations, same random draws in the same order, same loss and gradients, without
the Python.

What is recorded: the model's and guide's parameters and buffers and the tensor arguments are the
graph's inputs; everything else the program reads is fixed at recording time. The signature therefore
holds the shapes, dtypes and devices of the tensor arguments, the non-tensor arguments, grad mode,
``training`` flags and the model's ``kl_scale``. A program that is not static falls back to the
ordinary eager call, so results never change, only speed:

- data-dependent Python control flow (``if x.sum() > 0``, ``.item()``) cannot be recorded;
- a ``pyro.param`` created inside ``forward`` or any other tensor that requires grad and is not a
  module parameter would be frozen into the graph;
- a program whose signature keeps changing (KL warm-up moves ``kl_scale`` every step) is recorded at
  most ``max_signatures`` times.

Pyro's own ELBOs convert values with ``.item()`` and check for NaN; while recording, those become a
``detach`` (in double precision, as Python floats are) and a no-op, and the recorded loss is cast to
the dtype the eager call returned: the value and the gradient are bit-identical to the eager ones.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from pyro_vae.estimators import grad_scaling
from pyro_vae.training.distributed import all_reduce_grads
from pyro_vae.training.simplify import simplify

_PYRO_MODULES_WITH_ITEM = ("pyro.infer.util", "pyro.infer.trace_elbo", "pyro.infer.trace_mean_field_elbo",
                           "pyro.infer.traceenum_elbo", "pyro.infer.renyi_elbo", "pyro.infer.tracegraph_elbo")


def _detached_item(x):
    # .item() gives a Python float: a double, so sums of items are double sums; keep them double
    return x.detach().double() if torch.is_tensor(x) else x


def _no_nan_check(value, *args, **kwargs):
    return value


@contextlib.contextmanager
def _tensor_only_pyro():
    """Pyro's ``torch_item`` and ``warn_if_nan`` read tensor values; while recording, keep them tensors."""
    saved = []
    try:
        for name in _PYRO_MODULES_WITH_ITEM:
            module = importlib.import_module(name)
            for attr, stand_in in (("torch_item", _detached_item), ("warn_if_nan", _no_nan_check)):
                if hasattr(module, attr):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, stand_in)
        yield
    finally:
        for module, attr, original in reversed(saved):
            setattr(module, attr, original)


def _rng_states(devices: set[torch.device]) -> list:
    states: list = [torch.get_rng_state()]
    states += [(d, torch.cuda.get_rng_state(d)) for d in devices if d.type == "cuda"]
    return states


def _set_rng_states(states: list) -> None:
    torch.set_rng_state(states[0])
    for d, s in states[1:]:
        torch.cuda.set_rng_state(s, d)


@dataclass
class _Recording:
    graph: Callable
    live: tuple[torch.Tensor, ...]      # parameters and buffers, in the graph's input order
    params: tuple[torch.Tensor, ...]    # the parameters the program registered (what SVI steps)
    plain: Callable | None = None       # the uncompiled graph, while a compiled one is unproven


_EAGER = object()  # marks a signature that is run eagerly
def _refuse_hook(self, hook):
    raise RuntimeError("a gradient hook cannot be recorded; use pyro_vae.estimators.grad_scaling.scale_grad")


class Replayed:
    """``estimator`` with its loss recorded once per input signature and replayed afterwards.

    A drop-in estimator: ``(model, guide, *args, **kwargs) -> loss`` with the same value and gradient
    as ``estimator``. Calls without grad (evaluation) run eagerly, and so does the first call of each
    signature; the second records, and later ones replay. With ``compile=True`` the recorded graph
    goes through ``torch.compile`` (inductor, with its random draws left to the eager kernels, so they
    match): fused kernels, equal losses to float tolerance rather than bit for bit, and a compilation
    of some seconds per signature. A graph with ``scale_grad`` hooks (DReG) stays uncompiled: compiled,
    it runs as one autograd node, and no gradient would pass through the hooked tensor. After a replayed call,
    ``last_params`` holds the parameters the program registers, which ``ReplaySVI`` steps without
    tracing them again. ``compile=True`` also hands the recorded graph to ``torch.compile``.
    """

    def __init__(self, estimator: Callable, *, max_signatures: int = 4, compile: bool = False) -> None:
        self.estimator = estimator
        self.max_signatures = max_signatures
        self.compile = compile
        self.fallback_reason: str | None = None
        self.last_params: tuple[torch.Tensor, ...] | None = None
        self._recordings: dict[Any, Any] = {}
        self._seen: dict[Any, torch.dtype | None] = {}
        self._owner: tuple[int, int] | None = None
        if getattr(estimator, "replay_unsafe", None):  # Python state that a recorded graph would freeze
            self._give_up(str(estimator.replay_unsafe))

    def __getattr__(self, name: str):
        # estimator properties (value_from_log_weights, num_particles, ...) read through the wrapper
        if name == "estimator":
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def __repr__(self) -> str:
        return f"Replayed({self.estimator!r})"

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        self.last_params = None
        if not torch.is_grad_enabled() or self.fallback_reason is not None:
            return self.estimator(model, guide, *args, **kwargs)
        if self._owner != (id(model), id(guide)):
            self._recordings.clear()
            self._seen.clear()
            self._owner = (id(model), id(guide))
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if torch.is_tensor(x)]
        try:
            key = (spec, tuple((x.shape, x.dtype, x.device, x.requires_grad) if torch.is_tensor(x) else x
                               for x in leaves),
                   model.training, guide.training, getattr(model, "kl_scale", None))
            hash(key)
        except TypeError:
            return self.estimator(model, guide, *args, **kwargs)
        rec = self._recordings.get(key)
        if rec is None:
            if key not in self._seen and len(self._seen) >= 4 * self.max_signatures:
                self._give_up(f"more than {4 * self.max_signatures} input signatures (the program changes between "
                              "steps, e.g. KL warm-up)")
                return self.estimator(model, guide, *args, **kwargs)
            if key not in self._seen:
                # the first call of a signature runs eagerly: lazy set-up inside the estimator (checks, a
                # plate-nesting probe) happens there, with validation as configured, and the recording
                # on the next call then draws exactly the random numbers of one step
                out = self.estimator(model, guide, *args, **kwargs)
                self._seen[key] = out.dtype if torch.is_tensor(out) else None
                return out
            if len(self._recordings) >= self.max_signatures:
                self._give_up(f"more than {self.max_signatures} input signatures (the program changes between "
                              "steps, e.g. KL warm-up)")
                return self.estimator(model, guide, *args, **kwargs)
            rec = self._recordings[key] = self._record(model, guide, leaves, spec, tensors, self._seen[key])
        if rec is _EAGER:
            return self.estimator(model, guide, *args, **kwargs)
        if rec.plain is not None and rec.plain is not rec.graph:
            try:  # the first call compiles; without a working compiler, replay the graph uncompiled
                out = rec.graph(*rec.live, *tensors)
            except Exception as e:
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                              "replaying the graph uncompiled", RuntimeWarning, stacklevel=2)
                rec.graph = rec.plain
                out = rec.graph(*rec.live, *tensors)
            rec.plain = None
        else:
            out = rec.graph(*rec.live, *tensors)
        n = (len(out) - 1) // 2
        for t, factor in zip(out[1:1 + n], out[1 + n:]):
            t.register_hook(lambda g, factor=factor: g * factor)
        self.last_params = rec.params
        return out[0]

    def _give_up(self, reason: str) -> None:
        self.fallback_reason = reason
        self._recordings.clear()
        warnings.warn(f"running the estimator eagerly: {reason}", RuntimeWarning, stacklevel=3)

    def _record(self, model, guide, leaves, spec, tensors, dtype):
        names_m = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        names_g = [n for n, _ in guide.named_parameters()] + [n for n, _ in guide.named_buffers()]
        live = tuple(t for _, t in model.named_parameters()) + tuple(t for _, t in model.named_buffers()) \
            + tuple(t for _, t in guide.named_parameters()) + tuple(t for _, t in guide.named_buffers())
        n_m, n_live = len(names_m), len(live)
        estimator = self.estimator

        def program(*flat):
            state_m = dict(zip(names_m, flat[:n_m]))
            state_g = dict(zip(names_g, flat[n_m:n_live]))
            it = iter(flat[n_live:])
            args, kwargs = pytree.tree_unflatten([next(it) if torch.is_tensor(x) else x for x in leaves], spec)
            with _reparametrize_module(model, state_m), _reparametrize_module(guide, state_g):
                loss = estimator(model, guide, *args, **kwargs)
            if dtype is not None and torch.is_tensor(loss):
                loss = loss.to(dtype)
            return (loss, *(t for t, _ in scaled), *(f for _, f in scaled))

        devices = {t.device for t in (*live, *tensors)}
        rng = _rng_states(devices)
        scaled = grad_scaling.collect()
        hook = torch.Tensor.register_hook
        torch.Tensor.register_hook = _refuse_hook
        try:
            with _tensor_only_pyro(), pyro.validation_enabled(False), \
                    poutine.trace(param_only=True) as capture, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = make_fx(program, pre_dispatch=True)(*live, *tensors)
        except Exception as e:  # data-dependent control flow, or an op make_fx cannot record
            first = (str(e).splitlines() or [type(e).__name__])[0]
            self._give_up(f"it could not be recorded ({type(e).__name__}: {first[:160]})")
            return _EAGER
        finally:
            torch.Tensor.register_hook = hook
            grad_scaling.stop_collecting()
            _set_rng_states(rng)  # the recording drew random numbers; the replay must draw the same ones
        frozen = [n for n, c in graph.named_buffers() if c.requires_grad] + [
            n for n in dir(graph) if n.startswith("_tensor_constant") and getattr(graph, n).requires_grad]
        if frozen:
            self._give_up("the program reads tensors that require grad but are not module parameters "
                          "(pyro.param inside forward?); they would be frozen")
            return _EAGER
        live_ids = {id(t) for t in live}
        params = []
        for site in capture.trace.nodes.values():
            p = site["value"].unconstrained()
            if id(p) not in live_ids:
                self._give_up(f"parameter {site['name']!r} is not a parameter of the model or guide module")
                return _EAGER
            params.append(p)
        simplify(graph)
        runner = graph
        # a compiled graph runs as one autograd node, so no gradient passes through a hooked output
        if self.compile and not scaled:
            import torch._inductor.config as inductor

            inductor.fallback_random = True  # draw with the eager kernels: the same random numbers as eager
            runner = torch.compile(graph, dynamic=False)
        return _Recording(graph=runner, live=live, params=tuple(dict.fromkeys(params)), plain=graph)


class ReplaySVI(SVI):
    """``pyro.infer.SVI`` whose step takes the parameters from a ``Replayed`` loss when it has them.

    ``SVI.step`` traces every ``pyro.param`` statement to learn what to step; a replayed loss runs
    none, and reports them in ``last_params`` instead. Gradients are set to None after the step
    rather than to zeros; a parameter that had a gradient before and has none now gets zeros, and one
    that never had one is left out, as with Pyro's ``zero_grads``.
    With a ``world`` of several processes, the gradients are summed over the ranks before the step
    (``pyro_vae.distributed``), so every rank makes the update of the whole batch.
    """

    def __init__(self, model, guide, optim, loss, world=None) -> None:
        self.world = world
        self._graded: set = set()

        def loss_and_grads(*args, **kwargs):
            value = loss(*args, **kwargs)
            if getattr(value, "requires_grad", False):
                value.backward()
            return value

        super().__init__(model, guide, optim, loss, loss_and_grads=loss_and_grads)

    def step(self, *args, **kwargs) -> float:
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = getattr(self.loss, "last_params", None)
        if params is None:
            params = tuple(dict.fromkeys(site["value"].unconstrained() for site in capture.trace.nodes.values()))
        for p in params:
            if p.grad is not None:
                self._graded.add(p)
            elif p in self._graded:  # Pyro keeps a zero gradient once a parameter has had one
                p.grad = torch.zeros_like(p)
            elif self.world is not None and self.world.active:  # the all-reduce needs every rank's
                p.grad = torch.zeros_like(p)
        if self.world is not None and self.world.active:
            all_reduce_grads(self.world, params)  # the batch's gradient: the sum of the ranks' (losses are sums)
        self.optim(params)
        for p in params:
            p.grad = None
        return loss.item() if torch.is_tensor(loss) else float(loss)
