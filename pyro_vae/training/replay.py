"""Record an estimator's loss once per signature as a graph of tensor operations, and replay it.

Running a Pyro program costs Python work on every step: effect handlers, traces, ``pyro.module``
registrations, site checks. ``Replayed(estimator)`` records the tensor operations of one step with
``make_fx`` (above autograd, so ``detach`` and grad-mode changes are kept) and afterwards calls that
graph on the live parameters: same operations, same random draws in the same order, same loss and
gradients, without the Python.

The contract: for any Pyro program, the replayed loss gives what the eager call gives (bit for bit
on the CPU), or the estimator runs eagerly and a ``ReplayWarning`` says once why. Three layers keep it:

- **the signature** (``replay_key``): the graph of a step is used only for steps with the same
  argument shapes, module attributes, training flags, parameter identities, hooks, effect handlers
  and modes; any other step runs eagerly first and is recorded when seen again;
- **the rules at recording time** (``replay_record``): programs a graph cannot stand for (data-
  dependent control flow or sizes, autograd.Function, NumPy/Python randomness, side effects on
  attributes, ...) run eagerly from then on, and so does an estimator that declares
  ``replay_unsafe = "<reason>"`` (Python state that changes between steps);
- **the audit** (``replay_svi``): on a schedule the trainer computes a replayed step again eagerly
  from the same state and compares the loss and every gradient, catching what nothing can key
  (a global, a closure).

Calls without grad (evaluation) run eagerly, and so does the first call of each signature; the
second records, and later ones replay. With ``compile=True`` the recorded graph also goes through
``torch.compile`` (inductor, its random draws left to the eager kernels so they match): equal
losses to float tolerance, a compilation of some seconds per signature; if compiling fails at any
point (forward or the first backward), the graph is replayed uncompiled, with one warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch.utils import _pytree as pytree

from pyro_vae.training.replay_key import Unkeyable, describe_change, module_state, object_state, signature
from pyro_vae.training.replay_record import NotReplayable, Recording, StepState, record
from pyro_vae.training.replay_warning import ReplayWarning, warn

__all__ = ["Replayed", "ReplaySVI", "ReplayWarning"]

# torch.compile options: inductor draws random numbers with the eager kernels, so replays draw the same
COMPILE_OPTIONS = {"fallback_random": True}


@dataclass
class Pending:
    """A replayed step whose checks run after its backward pass (in ``ReplaySVI``)."""

    start: StepState                 # the state the step started from, to run it again eagerly
    ok: torch.Tensor | None          # validation's flag, when the graph has checks
    audit: bool                      # whether to compare the step with an eager one
    exact: bool                      # compare bit for bit (else to float tolerance)
    written: list[torch.Tensor]      # what the step wrote in place (compared too)
    devices: frozenset


class Replayed:
    """``estimator`` with its loss recorded once per signature and replayed afterwards.

    A drop-in estimator: ``(model, guide, *args, **kwargs) -> loss`` with the same value and gradient
    as ``estimator``. After a replayed call, ``last_params`` holds the parameters the program
    registers, which ``ReplaySVI`` steps without tracing them again. ``fallback_reason`` says why
    it runs eagerly, once it does; ``events`` lists each switch with the step it happened at.
    A graph with ``scale_grad`` hooks (DReG) stays uncompiled: compiled, it runs as one autograd node,
    and no gradient would pass through the hooked tensor.
    """

    def __init__(self, estimator: Callable, *, max_signatures: int = 4, compile: bool = False) -> None:
        self.estimator = estimator
        self.max_signatures = max_signatures
        self.compile = compile
        self.fallback_reason: str | None = None
        self.last_params: tuple[torch.Tensor, ...] | None = None
        self.events: list[dict[str, Any]] = []
        # set by ReplaySVI: the step being taken, whether to audit it, and to check after the backward pass
        self.step_number: int | None = None
        self.audit_next = False
        self.defer_checks = False
        self.pending: Pending | None = None
        self._recordings: dict[Any, Recording] = {}
        self._seen: dict[Any, tuple] = {}  # signature -> (the eager loss's dtype, the objects it names)
        self._last_key: Any = None
        self._owner: tuple[int, int] | None = None
        self._unsafe_checked = False

    def __getattr__(self, name: str):
        # estimator properties (value_from_log_weights, num_particles, ...) read through the wrapper
        if name == "estimator":
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def __repr__(self) -> str:
        return f"Replayed({self.estimator!r})"

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        self.last_params = None
        self.pending = None
        if not torch.is_grad_enabled() or self.fallback_reason is not None or not self._replay_allowed():
            return self.estimator(model, guide, *args, **kwargs)
        if self._owner != (id(model), id(guide)):
            self._recordings.clear()
            self._seen.clear()
            self._owner = (id(model), id(guide))
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if torch.is_tensor(x)]
        pins: list = []  # the objects the signature names by id, kept alive with it
        try:
            key = signature(model, guide, self.estimator, leaves, spec, pins)
            hash(key)
        except (Unkeyable, TypeError) as e:
            self.give_up(str(e) if isinstance(e, Unkeyable) else f"its signature cannot be hashed ({e})")
            return self.estimator(model, guide, *args, **kwargs)
        rec, start = self._recordings.get(key), None
        if rec is None:
            if key not in self._seen:
                return self._first_sighting(key, pins, model, guide, args, kwargs)
            if len(self._recordings) >= self.max_signatures:
                self.give_up(f"more than {self.max_signatures} input signatures were recorded, as "
                             f"{describe_change(self._last_key, key)} keeps changing between steps")
                return self.estimator(model, guide, *args, **kwargs)
            try:
                rec, start = record(model, guide, self.estimator, leaves, spec, tensors, self._seen[key][0],
                                    lambda: self._state(model, guide))
                rec.pins = pins
                if self.compile and not rec.n_scaled:
                    self._compile(rec, tensors, start)
            except NotReplayable as e:
                self.give_up(str(e))
                return self.estimator(model, guide, *args, **kwargs)
            self._recordings[key] = rec
        self._last_key = key
        return self._replay(rec, tensors, start, model, guide, args, kwargs)

    def _replay_allowed(self) -> bool:
        if not self._unsafe_checked:
            self._unsafe_checked = True
            reason = getattr(self.estimator, "replay_unsafe", None)
            if reason:
                self.give_up(f"{type(self.estimator).__name__} declares replay_unsafe: {reason}")
        return self.fallback_reason is None

    def _first_sighting(self, key, pins, model, guide, args, kwargs) -> torch.Tensor:
        # the first call of a signature runs eagerly: lazy set-up inside the estimator (checks, a
        # plate-nesting probe) happens there, and the recording on the next call then draws exactly
        # the random numbers of one step
        if len(self._seen) >= 4 * self.max_signatures:
            self.give_up(f"more than {4 * self.max_signatures} input signatures were seen, as "
                         f"{describe_change(self._last_key, key)} keeps changing between steps")
            return self.estimator(model, guide, *args, **kwargs)
        out = self.estimator(model, guide, *args, **kwargs)
        self._seen[key] = (out.dtype if torch.is_tensor(out) else None, pins)
        self._last_key = key
        return out

    def _state(self, model, guide) -> tuple:
        pins: list = []
        return (("the estimator", object_state(self.estimator, pins, 3)), ("the model", module_state(model, pins, True)),
                ("the guide", module_state(guide, pins, True)))

    def _compile(self, rec: Recording, tensors: list, start: StepState) -> None:
        """Compile the graph and run it forward and backward once; on any failure keep it uncompiled."""
        # torch.compile's first use turns torch.distributions' argument checks off for the whole process
        validate = torch.distributions.Distribution._validate_args
        try:
            compiled = torch.compile(rec.graph, dynamic=False, options=dict(COMPILE_OPTIONS))
            out = compiled(*rec.live, *tensors)
            inputs = [t for t in (*rec.live, *tensors) if t.requires_grad]
            if out[0].requires_grad and inputs:  # inductor compiles the backward lazily, on its first use
                torch.autograd.grad(out[0], inputs, allow_unused=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0].strip()
            warn(f"torch.compile failed on the recorded graph ({type(e).__name__}{': ' + first if first else ''}), "
                 "so the graph is replayed uncompiled.")
        else:
            rec.graph, rec.exact = compiled, False  # a compiled graph holds its constants: bound ones unbind it
        finally:
            start.restore()  # the trial run drew random numbers and wrote tensors
            torch.distributions.Distribution.set_default_validate_args(validate)

    def _replay(self, rec: Recording, tensors, start, model, guide, args, kwargs) -> torch.Tensor:
        audit = start is not None or self.audit_next  # the first replay of every recording is audited
        for constant, module, name in rec.bound:  # tensor attributes: the graph reads the ones held now
            now = module.__dict__.get(name)
            if now is not getattr(rec.plain, constant):
                setattr(rec.plain, constant, now)
                rec.graph, rec.exact = rec.plain, all(d.type == "cpu" for d in rec.devices)
        if start is None and (audit or rec.checked):
            start = StepState(rec.devices, rec.written(tensors), python=audit)
        out = rec.graph(*rec.live, *tensors)
        n = rec.n_scaled
        for t, factor in zip(out[1:1 + n], out[1 + n:1 + 2 * n]):
            t.register_hook(lambda g, factor=factor: g * factor)
        ok = out[-1] if rec.checked else None
        self.last_params = rec.params
        if not self.defer_checks and any(isinstance(h, TraceMessenger) for h in _PYRO_STACK):
            for name in rec.param_names:  # Pyro's SVI learns what to step by tracing pyro.param statements
                pyro.param(name)
        if self.defer_checks:
            self.pending = Pending(start, ok, audit, rec.exact, rec.written(tensors), rec.devices)
        elif ok is not None and not bool(ok):  # validation failed: run the step eagerly, as eager SVI would
            start.restore()
            self.last_params = None
            return self.estimator(model, guide, *args, **kwargs)
        return out[0]

    def give_up(self, reason: str, *, step: int | None = None, notify: bool = True) -> None:
        """Run the estimator eagerly from now on, and say why (once)."""
        if self.fallback_reason is not None:
            return
        step = self.step_number if step is None else step
        self.fallback_reason = reason
        self._recordings.clear()
        self._seen.clear()
        self.events.append({"step": step, "reason": reason})
        if notify:
            where = f" from step {step} on" if step is not None else ""
            warn(f"pyro-vae runs {type(self.estimator).__name__} eagerly{where}, because {reason}.")


from pyro_vae.training.replay_svi import ReplaySVI  # noqa: E402  (ReplaySVI reads Replayed's results)
