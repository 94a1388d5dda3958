"""How to train: the optimizer, budget, seed and device of one run, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyro_vae.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: once per epoch
    clip_norm: float | None = None       # clip each parameter's gradient norm (Pyro's clip_args)
    replay: bool = True                  # replay the loss recorded per input shape (pyro_vae.training.replay); False: eager
    compile: bool = False                # also torch.compile the recorded graph (needs replay)
    max_seconds: float | None = None     # stop after the step that reaches this much training wall clock
    max_evals: int | None = None         # stop at this many model-and-guide evaluations (particles x points)
    audit: bool = True                   # compare replayed steps with eager ones on a schedule (replay_svi.py)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not (float(self.lr) > 0):
            raise UserError(f"lr must be positive, got {self.lr}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise UserError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        for name in ("checkpoint_every", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {value}")
        if self.max_seconds is not None and not (float(self.max_seconds) > 0 and math.isfinite(self.max_seconds)):
            raise UserError(f"a seconds budget must be a positive number, got {self.max_seconds}")
        if self.max_evals is not None and not (isinstance(self.max_evals, int) and self.max_evals > 0):
            raise UserError(f"an evals budget must be a positive integer, got {self.max_evals}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"unknown device {self.device!r}; use auto, cpu or cuda")
        if self.compile and not self.replay:
            raise UserError("--compile compiles the replayed graph; it cannot be combined with --eager")
