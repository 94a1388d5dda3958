"""Amortized mean-field Gaussian guide, the encoder of Kingma & Welling (2014)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp, split_loc_scale


@dataclass(frozen=True)
class DiagonalNormalGuideConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    site: str = "z"


class DiagonalNormalGuide(PyroModule):
    """q(z|x) = Normal(mu(x), diag sigma(x)^2), with an MLP encoder (Burda et al. 1-layer by default).

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1, reparameterized.
    """

    Config = DiagonalNormalGuideConfig

    def __init__(self, config: DiagonalNormalGuideConfig = DiagonalNormalGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.encoder = mlp([config.x_dim, *config.hidden, 2 * config.latent_dim], config.activation)

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        loc, scale = split_loc_scale(self.encoder(x))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample(self.config.site, dist.Normal(loc, scale).to_event(1))
