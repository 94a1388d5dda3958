"""The hierarchical guide q(z1|x) q(z2|z1) of Burda et al.'s two-stochastic-layer VAE."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp, split_loc_scale


@dataclass(frozen=True)
class TwoLayerGuideConfig:
    """Same fields, defaults and meaning as the two-layer VAE's config (``latent_dim`` is z2's size)."""

    x_dim: int = 784
    latent_dim: int = 50
    z1_dim: int = 100
    hidden: tuple[int, ...] = (200, 200)
    top_hidden: tuple[int, ...] = (100, 100)
    activation: str = "tanh"


class TwoLayerGuide(PyroModule):
    """q(z1|x) = Normal(mu(x), diag sigma(x)^2), q(z2|z1) = Normal(mu(z1), diag sigma(z1)^2).

    Burda, Grosse & Salakhutdinov (ICLR 2016): tanh MLPs 784-200-200-(100) and 100-100-100-(50).
    z2's distribution depends on the draw of z1, so the guide is hierarchical: every estimator takes
    it, the path-derivative ones (stl, dreg) by replaying it on its draws (see their docstrings).

    Latent sites: ``z1``: (B, z1_dim), ``z2``: (B, latent_dim), event dim 1 each, reparameterized.
    """

    Config = TwoLayerGuideConfig

    def __init__(self, config: TwoLayerGuideConfig = TwoLayerGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.z1_net = mlp([config.x_dim, *config.hidden, 2 * config.z1_dim], config.activation)
        self.z2_net = mlp([config.z1_dim, *config.top_hidden, 2 * config.latent_dim], config.activation)

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        loc, scale = split_loc_scale(self.z1_net(x))
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            loc, scale = split_loc_scale(self.z2_net(z1))
            pyro.sample("z2", dist.Normal(loc, scale).to_event(1))
