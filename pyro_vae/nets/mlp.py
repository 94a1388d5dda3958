"""Small network builders shared by models and guides."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_vae.errors import UserError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """A fully connected net `sizes[0] -> ... -> sizes[-1]` with `activation` between layers, none after the last."""
    if activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {activation!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
        raise UserError(f"layer sizes must be >= 2 positive integers, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(n_in), int(n_out)))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def split_loc_scale(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the last dim of a network output into a location and a positive scale."""
    loc, raw = h.chunk(2, dim=-1)
    # softplus rather than exp: exp overflows early in training with tanh nets at lr 1e-3
    return loc, nn.functional.softplus(raw) + 1e-6
