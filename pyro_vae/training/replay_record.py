"""Recording one step of a Pyro program as a graph of tensor operations, and when a graph cannot stand in.

``record`` traces the estimator (model, guide and all) with ``make_fx`` above autograd and refuses,
with ``NotReplayable`` and a clause saying why, every program whose graph could compute something
else than the program on a later step:

- it reads a tensor's value in Python (``.item()``, ``if x.sum() > 0``) or uses an operation whose
  result size depends on the data (``x[mask]``, ``nonzero``);
- it calls a ``torch.autograd.Function`` (straight-through estimators, gradient reversal), a bare
  ``register_hook`` or a module backward hook: a recorded graph keeps the forward and drops the backward;
- it draws from ``numpy.random`` or ``random``, or changes a module's or the estimator's attributes
  (a Python side effect a graph does not repeat);
- it reads a tensor that requires grad but is no module parameter, or registers a ``pyro.param``
  that belongs to no module: it would be frozen.

What the recording writes in place (batch-norm statistics, ``x.clamp_()``) and the random numbers it
draws are put back, so the step itself then runs once, from the graph. Pyro's validation stays in
the graph: the support and argument checks of ``torch.distributions`` and Pyro's NaN/inf checks
become one flag, and a batch that fails any of them is run eagerly, raising or warning as eager does.
"""
from __future__ import annotations

import contextlib
import importlib
import random
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyro.poutine as poutine
import torch
import torch.nn.modules.module as module_globals
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from pyro_vae.estimators import grad_scaling
from pyro_vae.training.replay_key import BACKWARD_HOOKS, describe_change, module_tensors
from pyro_vae.training.simplify import simplify

_PYRO_MODULES_WITH_ITEM = ("pyro.infer.util", "pyro.infer.trace_elbo", "pyro.infer.trace_mean_field_elbo",
                           "pyro.infer.traceenum_elbo", "pyro.infer.renyi_elbo", "pyro.infer.tracegraph_elbo",
                           "pyro.poutine.trace_struct")
_VALUE_READ = "It appears that you're trying to get value out of a tracing tensor"


class NotReplayable(Exception):
    """The program cannot be replayed; the message is a clause that says why."""


@dataclass
class Recording:
    graph: Callable
    live: tuple[torch.Tensor, ...]      # parameters and buffers, in the graph's input order
    params: tuple[torch.Tensor, ...]    # the parameters the program registered (what SVI steps)
    n_scaled: int                       # scale_grad pairs among the outputs
    checked: bool                       # the last output is validation's flag: True when all checks pass
    written_live: tuple[torch.Tensor, ...]  # the live tensors the program writes in place
    written_args: tuple[int, ...]       # the same for the tensor arguments, by position
    devices: frozenset
    exact: bool = True                  # whether a replay is bit-identical to eager (uncompiled, CPU)
    pins: list = field(default_factory=list)  # the objects its signature names by id, kept alive
    param_names: tuple[str, ...] = ()   # the names of ``params`` in Pyro's param store
    plain: Callable | None = None       # the uncompiled graph
    bound: tuple = ()                   # (graph constant, module, attribute): module tensors read as constants

    def written(self, tensors) -> list[torch.Tensor]:
        return [*self.written_live, *(tensors[i] for i in self.written_args)]


class StepState:
    """The random streams and the given tensors' values, to run a step again from where it started."""

    def __init__(self, devices, tensors, *, python: bool = True) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices if d.type == "cuda"]
        self.python = (np.random.get_state(), random.getstate()) if python else None
        self.saved = [(t, t._version, t.detach().clone()) for t in tensors]

    def python_streams_changed(self) -> str | None:
        if self.python is None:
            return None
        np_state, py_state = self.python
        now = np.random.get_state()
        if now[2] != np_state[2] or now[3:] != np_state[3:] or not np.array_equal(now[1], np_state[1]):
            return "numpy.random"
        return "Python's random module" if random.getstate() != py_state else None

    def restore(self) -> list[int]:
        """Put everything back; returns the positions of the tensors that had been written since (told by
        value too: ``aten.batch_norm`` updates its running statistics without bumping their version)."""
        torch.set_rng_state(self.torch)
        for d, s in self.cuda:
            torch.cuda.set_rng_state(s, d)
        if self.python is not None:
            np.random.set_state(self.python[0])
            random.setstate(self.python[1])
        written = []
        with torch.no_grad():
            for i, (t, version, value) in enumerate(self.saved):
                if t._version != version or not torch.equal(t, value):
                    t.copy_(value)
                    written.append(i)
        return written


def _detached_item(x):
    # .item() gives a Python float: a double, so sums of items are double sums; keep them double
    return x.detach().double() if torch.is_tensor(x) else x


@contextlib.contextmanager
def _patched(checks: list, refused: list):
    """While recording: keep Pyro's value reads as tensors, turn validation's checks into graph outputs,
    and refuse what a graph cannot keep (custom backward passes, gradient hooks)."""

    def warn_if_nan(value, msg="", *args, **kwargs):
        if torch.is_tensor(value):
            checks.append(~torch.isnan(value.detach()).any())
        return value

    def warn_if_inf(value, msg="", allow_posinf=False, allow_neginf=False, *args, **kwargs):
        if torch.is_tensor(value):
            v = value.detach()
            if not allow_posinf:
                checks.append(~(v == float("inf")).any())
            if not allow_neginf:
                checks.append(~(v == float("-inf")).any())
        return value

    def is_all_true(valid):  # torch.distributions: `if not torch._is_all_true(valid): raise ValueError`
        checks.append(valid.all())
        return True

    def refuse_hook(self, hook):
        refused.append("it registers a gradient hook (register_hook), which a recorded graph cannot keep; "
                       "use pyro_vae.estimators.grad_scaling.scale_grad")
        raise NotReplayable(refused[-1])

    def refuse_function(cls, *args, **kwargs):
        refused.append(f"it calls the torch.autograd.Function {cls.__name__}, whose own backward a recorded "
                       "graph would drop")
        raise NotReplayable(refused[-1])

    saved = [(torch.Tensor, "register_hook", torch.Tensor.register_hook), (torch, "_is_all_true", torch._is_all_true),
             (torch.autograd.Function, "apply", torch.autograd.Function.__dict__["apply"])]
    stand_ins = {"torch_item": _detached_item, "warn_if_nan": warn_if_nan, "warn_if_inf": warn_if_inf}
    for name in _PYRO_MODULES_WITH_ITEM:
        module = importlib.import_module(name)
        saved += [(module, attr, getattr(module, attr)) for attr in stand_ins if hasattr(module, attr)]
    try:
        for owner, attr, _ in saved[3:]:
            setattr(owner, attr, stand_ins[attr])
        torch.Tensor.register_hook = refuse_hook
        torch._is_all_true = is_all_true
        torch.autograd.Function.apply = classmethod(refuse_function)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def _refuse_backward_hooks(*modules) -> None:
    if any(getattr(module_globals, g) for g in ("_global_backward_hooks", "_global_backward_pre_hooks")):
        raise NotReplayable("a global module backward hook is registered, which a recorded graph cannot keep")
    for root in modules:
        for name, m in root.named_modules():
            if any(getattr(m, h, None) for h in BACKWARD_HOOKS):
                raise NotReplayable(f"the module {name or type(m).__name__} has a backward hook, which a "
                                    "recorded graph cannot keep")


def _data_dependent_size(graph: torch.fx.GraphModule) -> str | None:
    for n in graph.graph.nodes:
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) \
                or torch.Tag.dynamic_output_shape not in t.tags:
            continue
        if t is torch.ops.aten.index.Tensor:  # dynamic only with a boolean mask among the indices
            vals = [i.meta.get("val") for i in n.args[1] if isinstance(i, torch.fx.Node)]
            if not any(v is not None and v.dtype in (torch.bool, torch.uint8) for v in vals):
                continue
        if t.name() == "aten::one_hot" and (n.args[1] if len(n.args) > 1 else n.kwargs.get("num_classes", -1)) >= 0:
            continue  # one_hot(y, num_classes): the size is given
        if t.name() == "aten::repeat_interleave" and n.kwargs.get("output_size") is not None:
            continue
        return t.__name__
    return None


def _explain(e: Exception) -> str:
    text = str(e)
    if _VALUE_READ in text:
        return ("it could not be recorded: it reads a tensor's value in Python (.item(), float(t), `if` on a "
                "tensor), so what it computes depends on the data")
    first = (text.strip().splitlines() or [""])[0].strip()
    return f"it could not be recorded ({type(e).__name__}{': ' + first if first else ''})"


def record(model, guide, estimator, leaves, spec, tensors, dtype,
           state_of: Callable[[], tuple]) -> tuple[Recording, StepState]:
    """Record ``estimator(model, guide, *args, **kwargs)``; ``state_of()`` gives the attributes that must
    not change while it runs. Returns the recording and the state the step started from (put back)."""
    _refuse_backward_hooks(model, guide)
    names_m = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    names_g = [n for n, _ in guide.named_parameters()] + [n for n, _ in guide.named_buffers()]
    live = tuple(t for _, t in model.named_parameters()) + tuple(t for _, t in model.named_buffers()) \
        + tuple(t for _, t in guide.named_parameters()) + tuple(t for _, t in guide.named_buffers())
    n_m, n_live = len(names_m), len(live)
    checks: list = []
    refused: list = []

    def program(*flat):
        state_m = dict(zip(names_m, flat[:n_m]))
        state_g = dict(zip(names_g, flat[n_m:n_live]))
        it = iter(flat[n_live:])
        args, kwargs = pytree.tree_unflatten([next(it) if torch.is_tensor(x) else x for x in leaves], spec)
        with _reparametrize_module(model, state_m), _reparametrize_module(guide, state_g):
            loss = estimator(model, guide, *args, **kwargs)
        if dtype is not None and torch.is_tensor(loss):
            loss = loss.to(dtype)
        ok = (torch.stack([c.reshape(()) for c in checks]).all(),) if checks else ()
        return (loss, *(t for t, _ in scaled), *(f for _, f in scaled), *ok)

    start = StepState({t.device for t in (*live, *tensors)}, (*live, *tensors))
    before = state_of()
    attributes = module_tensors(model, guide)
    scaled = grad_scaling.collect()
    try:
        with _patched(checks, refused), poutine.trace(param_only=True) as capture, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager call before the recording has shown them
            graph = make_fx(program, pre_dispatch=True)(*live, *tensors)
    except Exception as e:  # data-dependent control flow, or an op make_fx cannot record
        raise NotReplayable(refused[0] if refused else _explain(e)) from None
    finally:
        grad_scaling.stop_collecting()
        stream = start.python_streams_changed()
        written = start.restore()  # the recording drew random numbers and wrote tensors; the replay will too
    if stream:
        raise NotReplayable(f"it draws from {stream}, and a recorded graph would repeat the recorded draw")
    after = state_of()
    if after != before:
        raise NotReplayable(f"running it changes {describe_change(before, after)}, a Python side effect that a "
                            "recorded graph would not repeat")
    frozen = [n for n, c in graph.named_buffers() if c.requires_grad] + [
        n for n in dir(graph) if n.startswith("_tensor_constant") and getattr(graph, n).requires_grad]
    if frozen:
        raise NotReplayable("it reads tensors that require grad but are not module parameters (pyro.param "
                            "inside forward?): they would be frozen in a recorded graph")
    op = _data_dependent_size(graph)
    if op:
        raise NotReplayable(f"it calls {op}, whose result size depends on the data (x[mask], nonzero), and a "
                            "recorded graph would keep the recorded size")
    live_ids = {id(t) for t in live}
    params, names = [], []
    for site in capture.trace.nodes.values():
        p = site["value"].unconstrained()
        if id(p) not in live_ids:
            raise NotReplayable(f"its parameter {site['name']!r} is not a parameter of the model or guide module")
        params.append(p)
        names.append(site["name"])
    simplify(graph)
    bound = tuple((n, *attributes[id(getattr(graph, n))]) for n in dir(graph)
                  if n.startswith("_tensor_constant") and id(getattr(graph, n)) in attributes)
    rec = Recording(graph=graph, live=live, params=tuple(dict.fromkeys(params)), n_scaled=len(scaled),
                    checked=bool(checks), written_live=tuple(live[i] for i in written if i < n_live),
                    written_args=tuple(i - n_live for i in written if i >= n_live),
                    devices=frozenset(t.device for t in (*live, *tensors)), param_names=tuple(dict.fromkeys(names)), plain=graph, bound=bound)
    rec.exact = all(d.type == "cpu" for d in rec.devices)
    return rec, start
