"""Gradient scaling that survives the fast path's recording: an estimator's hook on an intermediate tensor."""
from __future__ import annotations

import torch

_collected: list | None = None  # (tensor, factor) pairs asked for while a program is being recorded


def scale_grad(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply the gradient that reaches ``tensor`` by ``factor`` (DReG's w~ on log w's copy of z).

    A gradient hook; use this rather than ``register_hook``, which a recording cannot keep: while a
    program is recorded (``pyro_vae.training.replay``), the pair becomes an output of the graph and
    the hook is put back on every replay. A bare ``register_hook`` makes the recording fall back to eager.
    """
    if _collected is not None:
        _collected.append((tensor, factor))
        return
    tensor.register_hook(lambda g: g * factor)


def collect() -> list:
    """Start collecting ``scale_grad`` requests instead of registering hooks; returns the list they go to."""
    global _collected
    _collected = []
    return _collected


def stop_collecting() -> None:
    global _collected
    _collected = None
