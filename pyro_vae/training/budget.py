"""A training budget in wall-clock seconds or in model-and-guide evaluations, checked after every step.

``fit`` asks a :class:`Budget` how many points of the next batch it may use, tells it what each step
consumed, and stops when it is spent. What was consumed is recorded in every history row and in the
checkpoint, so a resumed run continues the same budget.

- **seconds**: the training steps' wall clock (data preparation included; the per-epoch test bound,
  checkpoints and plots not). A run stops after the first step that reaches the budget, so it overshoots
  by less than one step.
- **evals**: model-and-guide evaluations, i.e. particles x data points seen, the particles being the
  estimator's ``num_particles`` (1 if it has none). The last step's batch is cut to the points the budget
  has left, so a run consumes exactly the budget whenever it is a multiple of the particles: runs with
  different K see the same count.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

clock = time.perf_counter  # module-level so a test can drive the budget with a clock of its own


def particles_of(estimator) -> int:
    """The number of particles each data point costs under ``estimator`` (its ``num_particles``, else 1)."""
    return int(getattr(estimator, "num_particles", 1) or 1)


class Budget:
    """What a run has consumed (training seconds, evaluations) and whether ``config``'s limits are reached."""

    def __init__(self, config, estimator, min_points: int = 1) -> None:
        self.max_seconds: float | None = getattr(config, "max_seconds", None)
        self.max_evals: int | None = getattr(config, "max_evals", None)
        self.particles = particles_of(estimator)
        self.min_points = min_points  # a step needs at least this many points (one per rank)
        self.seconds = 0.0
        self.evals = 0
        self._mark: float | None = None

    def state(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "evals": self.evals}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.seconds, self.evals = float(state["seconds"]), int(state["evals"])

    def start(self) -> None:
        """The clock runs from here (an epoch begins); time spent between epochs is not training."""
        self._mark = clock()

    def trim(self, x: torch.Tensor, y: torch.Tensor | None):
        """The part of the next batch the budget lets through: all of it, or the first points of the last step."""
        if self.max_evals is None:
            return x, y
        n = min(x.shape[0], math.ceil((self.max_evals - self.evals) / self.particles))
        return x[:n], None if y is None else y[:n]

    def spend(self, points: int) -> None:
        """A step on ``points`` data points is done."""
        now = clock()
        self.seconds += now - (self._mark if self._mark is not None else now)
        self._mark = now
        self.evals += points * self.particles

    @property
    def done(self) -> bool:
        if self.max_seconds is not None and self.seconds >= self.max_seconds:
            return True
        if self.max_evals is not None:
            left = math.ceil((self.max_evals - self.evals) / self.particles)
            return left < self.min_points
        return False

    def row(self) -> dict[str, Any]:
        """What the history row records: cumulative training seconds and evaluations."""
        return {"train_seconds": self.seconds, "evals": self.evals}

    def label(self, epoch: int, epochs: int) -> str:
        """The progress bar's title: the epoch, and the budget when there is one."""
        if self.max_seconds is not None:
            return f"epoch {epoch} ({self.seconds:.0f}/{self.max_seconds:g} s)"
        if self.max_evals is not None:
            return f"epoch {epoch} ({self.evals:.3g}/{self.max_evals:.3g} evals)"
        return f"epoch {epoch}/{epochs}"
