"""The signature a recorded graph stands for: everything a step reads besides the values of its tensors.

A recorded graph takes the model's and guide's parameters and buffers and the step's tensor
arguments as inputs; whatever else the program reads is fixed into it. ``signature`` therefore holds:

- the shapes, dtypes, devices and ``requires_grad`` of the tensor arguments, and the value of every
  other argument (an object by its identity and its attributes);
- for every module of the model and the guide: its type, its ``training`` flag, its plain attributes
  (numbers, strings, tuples, small containers, objects by identity and attributes, tensors by identity),
  the identity and ``requires_grad`` of each parameter, the identity of each buffer, its submodules,
  its forward and backward hooks; and the device and dtype of the parameters;
- the estimator's attributes, the Pyro effect handlers active around the step, and the process-wide
  modes a program reads: autocast, the default dtype and device, Pyro's validation flags, global hooks.

A step whose signature was recorded replays; any other is run eagerly first (see ``replay.py``).
Identities are safe to compare because a recording keeps the objects its signature names alive.
"""
from __future__ import annotations

import enum
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import pyro.distributions.util as dist_util
import pyro.infer.util as infer_util
import pyro.poutine.util as poutine_util
import torch
import torch.nn.modules.module as module_globals
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger

_PRIMITIVE = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
                        torch.layout, torch.memory_format, type(Ellipsis), range})
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
         torch.nn.Module)
_CONTAINERS = frozenset({tuple, list, dict, OrderedDict, set, frozenset})
_MAX_ITEMS = 64  # containers longer than this are told apart by identity only
# nn.Module bookkeeping read separately (parameters, buffers, submodules, hooks) or never read by forward,
# and PyroModule's call context (a counter and a cache, empty between calls)
_INTERNAL = frozenset({"_pyro_context", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
                       "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                       "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                       "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                       "_backward_pre_hooks"})
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
BACKWARD_HOOKS = ("_backward_pre_hooks", "_backward_hooks")


class Unkeyable(Exception):
    """A step reads something no signature can hold; the message names it, as a clause."""


def freeze(value: Any, pins: list, depth: int = 2, strict: bool = False) -> Any:
    """A hashable stand-in for ``value`` that changes whenever what a program could read from it changes.

    Objects appear by ``id``, and are appended to ``pins`` so that whoever keeps the signature can keep
    them alive (an id is unique only while its object lives). Objects with attributes also appear by
    their attributes, ``depth`` levels down; a frozen dataclass by identity alone (its fields cannot be
    reassigned). ``strict``: an object that cannot be seen into (no ``__dict__``) raises ``Unkeyable``
    instead of appearing by identity alone."""
    t = type(value)
    if t in _PRIMITIVE:
        return value
    if t in _CONTAINERS:
        if not value:
            return t
        if len(value) <= _MAX_ITEMS:
            if t is dict or t is OrderedDict:
                return t, tuple([(k, v if type(v) in _PRIMITIVE else freeze(v, pins, depth, strict))
                                 for k, v in value.items()])
            if t is tuple or t is list:
                return t, tuple([v if type(v) in _PRIMITIVE else freeze(v, pins, depth, strict) for v in value])
            if all(type(v) in _PRIMITIVE for v in value):
                return t, frozenset(value)
    if isinstance(value, torch.Tensor):  # read as a constant: in-place changes reach the graph, new tensors not
        pins.append(value)
        return "tensor", id(value), value.shape, value.dtype, value.device, value.requires_grad
    if isinstance(value, enum.Enum):
        return value
    pins.append(value)
    if isinstance(value, _CODE):
        return "code", id(value)  # what the code reads from globals or closures is for the audit
    if isinstance(value, np.ndarray) and value.size <= _MAX_ITEMS:
        return np.ndarray, value.shape, value.dtype.str, value.tobytes()
    params = getattr(t, "__dataclass_params__", None)
    if params is not None and params.frozen:
        return "frozen", id(value)
    if depth > 0 and hasattr(value, "__dict__"):
        return object_state(value, pins, depth, strict)
    if strict:
        raise Unkeyable(f"it is given a {t.__name__} argument, whose state cannot be compared between steps")
    return "object", id(value)


def object_state(value: Any, pins: list, depth: int = 2, strict: bool = False) -> tuple:
    """An object by identity and by its attributes, ``depth`` levels down (see ``freeze``)."""
    if not pins or pins[-1] is not value:
        pins.append(value)
    return "object", id(value), tuple([(k, v if type(v) in _PRIMITIVE else freeze(v, pins, depth - 1, strict))
                                       for k, v in vars(value).items()])


_END = "<end of module>"


def module_state(root: torch.nn.Module, pins: list, ids: bool = False) -> tuple:
    """The state of every module under ``root``, flat: for each module ("<module>", name, type), its
    (attribute, frozen value) pairs, its parameters, buffers and hooks, its submodules, then ``_END``.
    ``model.to(...)`` moves all parameters at once, so the first one's device and dtype stand for all
    (one parameter changed in place, ``p.data = ...``, is left to the audit).

    A tensor held directly as a module attribute appears by shape, dtype, device and ``requires_grad``:
    a recording reads it afresh on every replay (see ``replay_record``). With ``ids`` it appears by
    identity too, to tell whether running the program replaced it."""
    out: list = []
    first: list = []
    _walk(root, "", out, pins, set(), first, ids)
    out.append((first[0].device, first[0].dtype) if first else None)
    return tuple(out)


def _walk(m: torch.nn.Module, name: str, out: list, pins: list, seen: set, first: list, ids: bool) -> None:
    out.append(("<module>", name, type(m)))
    if id(m) in seen:  # the same module under two names
        out.append(("<shared with another module>", id(m)))
        out.append(_END)
        return
    seen.add(id(m))
    d = m.__dict__
    out += [(k, v if type(v) in _PRIMITIVE else _attribute(v, pins, ids)) for k, v in d.items() if k not in _INTERNAL]
    params = d["_parameters"]
    if params:
        out += [(k, "parameter", None if p is None else id(p), p is not None and p.requires_grad)
                for k, p in params.items()]
        if not first:
            first += [p for p in params.values() if p is not None][:1]
    if d["_buffers"]:
        out += [(k, "buffer", None if b is None else id(b)) for k, b in d["_buffers"].items()]
    out += [(k, tuple(d[k])) for k in _HOOKS if d[k]]
    for k, sub in d["_modules"].items():
        if sub is not None:
            _walk(sub, k, out, pins, seen, first, ids)
    out.append(_END)


def _attribute(v: Any, pins: list, ids: bool) -> Any:
    if not ids and isinstance(v, torch.Tensor):
        return "tensor attribute", v.shape, v.dtype, v.device, v.requires_grad
    return freeze(v, pins)


def module_tensors(*roots: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, str]]:
    """id -> (module, attribute) of every tensor held directly as a plain attribute of a module."""
    return {id(v): (m, k) for root in roots for m in root.modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and k not in _INTERNAL}


def handler_state(pins: list) -> tuple:
    """The Pyro effect handlers around the step (``poutine.scale``, ``mask``, ...), by type and attributes."""
    out = []
    for h in _PYRO_STACK:
        if isinstance(h, TraceMessenger):
            if not h.param_only:  # Pyro's SVI traces parameters only; a full trace records every site
                raise Unkeyable("a poutine.trace around the step records every site, and a replayed graph "
                                "runs none")
            out.append(TraceMessenger)
        else:
            out.append((type(h), freeze(vars(h), pins, 1)))
    return tuple(out)


def modes() -> tuple:
    """Process-wide settings a program's operations depend on."""
    device = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    return (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), torch.get_default_dtype(),
            None if device is None else device.device, infer_util.is_validation_enabled(),
            poutine_util.is_validation_enabled(), dist_util.is_validation_enabled(),
            torch.distributions.Distribution._validate_args,
            *(tuple(getattr(module_globals, g) or ()) for g in _GLOBAL_HOOKS))


_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def signature(model, guide, estimator, leaves: list, spec, pins: list) -> tuple:
    """The step's signature (see the module docstring); raises ``Unkeyable`` when it has none. The
    objects it names by identity are appended to ``pins``."""
    args = tuple([(x.shape, x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor)
                  else freeze(x, pins, strict=True) for x in leaves])
    return (("the arguments", (spec, args)), ("the modes", modes()), ("the effect handlers", handler_state(pins)),
            ("the estimator", object_state(estimator, pins, 3)), ("the model", module_state(model, pins)),
            ("the guide", module_state(guide, pins)), ("the model's kl_scale", getattr(model, "kl_scale", None)))


def describe_change(old: tuple, new: tuple) -> str:
    """What differs between two signatures, in words: 'the model's attribute temperature (of decoder)'."""
    if old is None:
        return "the signature"
    for (label, a), (_, b) in zip(old, new):
        if a == b:
            continue
        if label in ("the model", "the guide"):
            return _module_change(label, a, b)
        if label == "the estimator":
            names = [k for (k, va), (_, vb) in zip(a[2], b[2]) if va != vb] if len(a) == 3 == len(b) else []
            return f"the estimator's attribute {names[0]}" if names else "the estimator object"
        if label == "the modes":
            return "a process-wide mode (autocast, default dtype or device, Pyro validation, global module hooks)"
        return label
    return "nothing that can be named"


def _module_change(label: str, a: tuple, b: tuple) -> str:
    owner = label + "'s"
    path: list[str] = []
    for x, y in zip(a, b):
        if x == y:
            if type(x) is tuple and x and x[0] == "<module>":
                path.append(x[1])
            elif x == _END:
                path.pop()
            continue
        where = ".".join(p for p in path[1:] if p) if len(path) > 1 else ""
        where = f" (of {where})" if where else ""
        if not (type(x) is tuple and type(y) is tuple) or x[0] != y[0] or "<module>" in (x[0], y[0]):
            return f"{owner} submodules{where} (one was added, removed or replaced)"
        kind = y[1] if len(y) > 2 and y[1] in ("parameter", "buffer") else "attribute"
        return f"{owner} {kind} {y[0]}{where}"
    return f"{owner} device or dtype" if a[-1:] != b[-1:] else f"{owner} submodules"


