"""SVI over a replayed loss, with the audit: replayed steps compared with eager ones on a schedule.

What no signature can hold (a module-level global read by ``forward``, a closure, a NumPy generator
object) could make a recorded graph compute something else than the program. ``ReplaySVI``
therefore takes some replayed steps a second time, eagerly, from the same RNG state and the same
tensors, and compares the loss, the set of parameters, every gradient and every tensor the step
writes in place. Equal (bit for bit on the CPU; to 1e-3 relative on a GPU or with ``torch.compile``),
the replay's results are kept, so a run is bit-identical with and without the audit. Different, the
eager results are kept, the loss runs eagerly from then on, and a ``ReplayWarning`` names the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI

from pyro_vae.training.distributed import all_reduce_grads, sum_scalars
from pyro_vae.training.replay_record import StepState


@dataclass(frozen=True)
class AuditSchedule:
    """Audited steps (counted from 1): 2, 4, 8, ... up to ``doubling_until``, then every ``every``-th,
    and the first replay of every recording."""

    doubling_until: int = 256
    every: int = 512

    def due(self, step: int) -> bool:
        return step >= 2 and ((step <= self.doubling_until and step & (step - 1) == 0) or step % self.every == 0)


DEFAULT_AUDIT = AuditSchedule()


class ReplaySVI(SVI):
    """``pyro.infer.SVI`` whose step takes the parameters from a ``Replayed`` loss when it has them.

    ``SVI.step`` traces every ``pyro.param`` statement to learn what to step; a replayed loss runs
    none, and reports them in ``last_params`` instead. Gradients are set to None after the step
    rather than to zeros; a parameter that had a gradient before and has none now gets zeros, and one
    that never had one is left out, as with Pyro's ``zero_grads``.
    With a ``world`` of several processes, the gradients are summed over the ranks before the step
    (``pyro_vae.training.distributed``), so every rank makes the update of the whole batch.
    ``steps_done`` counts the steps taken (a resumed trainer sets it); ``audit=None`` turns the audit
    off; ``audit_seconds`` is the time the audits took.
    """

    def __init__(self, model, guide, optim, loss, world=None, audit: AuditSchedule | None = DEFAULT_AUDIT) -> None:
        self.world = world
        self.audit = audit
        self.steps_done = 0
        self.audit_seconds = 0.0
        self._graded: set = set()
        self._replayed = loss if hasattr(loss, "defer_checks") else None
        if self._replayed is not None:
            self._replayed.defer_checks = True

        def loss_and_grads(*args, **kwargs):
            value = loss(*args, **kwargs)
            if getattr(value, "requires_grad", False):
                value.backward()
            return value

        super().__init__(model, guide, optim, loss, loss_and_grads=loss_and_grads)

    @property
    def _active(self) -> bool:
        return self.world is not None and self.world.active

    def step(self, *args, **kwargs) -> float:
        number = self.steps_done + 1
        due = self.audit is not None and self.audit.due(number)
        replayed = self._replayed
        if replayed is not None:
            replayed.step_number, replayed.audit_next = number, due
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = getattr(self.loss, "last_params", None)
        pending = replayed.pending if replayed is not None else None
        mismatch = None
        if pending is not None:
            replayed.pending = None
            if pending.ok is not None and not bool(pending.ok):  # validation failed: the step eagerly, as SVI
                loss, params = self._eager_again(pending, args, kwargs)
            elif pending.audit and self.audit is not None:
                t0 = time.perf_counter()
                loss, params, mismatch = self._audit(pending, loss, params, args, kwargs)
                self.audit_seconds += time.perf_counter() - t0
        if due and self._active and replayed is not None:  # the ranks switch to eager together
            if sum_scalars(self.world, [float(mismatch is not None)])[0] and mismatch is None:
                mismatch = "the replayed step differed from eager on another process"
        if mismatch is not None:
            replayed.give_up(f"the replayed step {number} differed from eager Pyro ({mismatch}); step {number} "
                             "took the eager results", step=number)
        if params is None:
            params = tuple(dict.fromkeys(site["value"].unconstrained() for site in capture.trace.nodes.values()))
        self._step_params(params)
        self.steps_done = number
        return loss.item() if torch.is_tensor(loss) else float(loss)

    def _step_params(self, params) -> None:
        for p in params:
            if p.grad is not None:
                self._graded.add(p)
            elif p in self._graded:  # Pyro keeps a zero gradient once a parameter has had one
                p.grad = torch.zeros_like(p)
            elif self._active:  # the all-reduce needs every rank's
                p.grad = torch.zeros_like(p)
        if self._active:
            all_reduce_grads(self.world, params)  # the batch's gradient: the sum of the ranks' (losses are sums)
        self.optim(params)
        for p in params:
            p.grad = None

    def _eager(self, args, kwargs):
        """The estimator's loss and gradients, eagerly, and the parameters it registered."""
        with poutine.trace(param_only=True) as capture:
            loss = self._replayed.estimator(self.model, self.guide, *args, **kwargs)
            if getattr(loss, "requires_grad", False):
                loss.backward()
        return loss, tuple(dict.fromkeys(site["value"].unconstrained() for site in capture.trace.nodes.values()))

    def _eager_again(self, pending, args, kwargs):
        for p in self._replayed.last_params or ():
            p.grad = None
        pending.start.restore()
        return self._eager(args, kwargs)

    def _audit(self, pending, loss, params, args, kwargs):
        """Take the step again eagerly from where it started and compare; returns (loss, params, mismatch)."""
        grads = [p.grad for p in params]
        after = StepState(pending.devices, pending.written)  # the replay's outcome: RNG streams, written tensors
        e_loss, e_params = self._eager_again(pending, args, kwargs)
        mismatch = _compare(loss, grads, params, [c for _, _, c in after.saved], e_loss, e_params, pending.written,
                            pending.exact)
        if mismatch is not None:
            return e_loss, e_params, mismatch
        for p in e_params:  # keep the replay's results: the run is the same without the audit
            p.grad = None
        for p, g in zip(params, grads):
            p.grad = g
        after.restore()
        return loss, params, None


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact:
        return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= 1e-3 * max(float(a.norm()), float(b.norm())) + 1e-12)


def _compare(loss, grads, params, written, e_loss, e_params, e_written, exact) -> str | None:
    """What differs between a replayed step and the eager one, in words; None when nothing does."""
    if not _same(torch.as_tensor(loss).detach(), torch.as_tensor(e_loss).detach(), exact):
        return f"the loss: replayed {float(loss):.9g}, eager {float(e_loss):.9g}"
    if set(params) != set(e_params):
        return "the set of parameters the program registers"
    store = pyro.get_param_store()
    for p, g in zip(params, grads):
        if (g is None) != (p.grad is None) or (g is not None and not _same(g, p.grad, exact)):
            return f"the gradient of {_name(store, p)}"
    for r, e in zip(written, e_written):
        if not _same(r, e.detach(), exact):
            return "a tensor the step writes in place (a buffer such as batch-norm statistics)"
    return None


def _name(store, p) -> str:
    try:
        return repr(store.param_name(p))
    except (KeyError, AttributeError):
        return f"a parameter of shape {tuple(p.shape)}"
