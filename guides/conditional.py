"""Amortized Gaussian guide q(z | x, y) for label-conditioned models."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import mlp, split_loc_scale


@dataclass(frozen=True)
class ConditionalGuideConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    num_classes: int = 10
    site: str = "z"


class ConditionalGuide(PyroModule):
    """q(z | x, y) = Normal(mu([x, onehot y]), diag sigma([x, onehot y])^2), the CVAE's recognition network.

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1, reparameterized.
    Labels: ``y`` (B,) int64, required.
    """

    Config = ConditionalGuideConfig

    def __init__(self, config: ConditionalGuideConfig = ConditionalGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.encoder = mlp([config.x_dim + config.num_classes, *config.hidden, 2 * config.latent_dim],
                           config.activation)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> None:
        if y is None:
            raise ValueError("ConditionalGuide needs labels y")
        h = torch.cat([x, nn.functional.one_hot(y, self.config.num_classes).to(x.dtype)], -1)
        loc, scale = split_loc_scale(self.encoder(h))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample(self.config.site, dist.Normal(loc, scale).to_event(1))
