"""Conditional VAE (Sohn, Lee & Yan 2015): the prior, decoder and guide all see the label."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import mlp


@dataclass(frozen=True)
class ConditionalVAEConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    num_classes: int = 10


def one_hot_like(y: torch.Tensor, num_classes: int, batch_shape: torch.Size) -> torch.Tensor:
    """One-hot labels (B,) -> (..., B, C), broadcast to ``batch_shape`` = (..., B), e.g. with particles in front."""
    return nn.functional.one_hot(y, num_classes).to(torch.get_default_dtype()).expand(*batch_shape, num_classes)


class ConditionalVAE(PyroModule):
    """z | y ~ Normal(mu_y, diag sigma_y^2), x | z, y ~ Bernoulli(logits=decoder([z, onehot(y)])).

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim) in {0, 1}, event dim 1.
    Labels:         required, ``y``: (B,) int64 in [0, num_classes); an argument, not a sample site.
    Plates:         ``data`` of size B at dim -1.

    The prior's per-class mean and scale are learned and start at N(0, I). Call as ``model(x, y)`` to
    score, ``model(None, y, batch_size=n)`` to draw images of the given classes.
    """

    Config = ConditionalVAEConfig
    observed_site = "x"
    labels = "required"

    def __init__(self, config: ConditionalVAEConfig = ConditionalVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.num_classes = config.num_classes
        self.latent_dim = config.latent_dim
        self.prior_loc = nn.Parameter(torch.zeros(config.num_classes, config.latent_dim))
        self.prior_raw_scale = nn.Parameter(torch.zeros(config.num_classes, config.latent_dim))
        self.decoder = mlp([config.latent_dim + config.num_classes, *config.hidden, config.x_dim], config.activation)

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                batch_size: int | None = None) -> None:
        if y is None:
            raise ValueError("ConditionalVAE needs labels y")
        n = x.shape[0] if x is not None else (batch_size or y.shape[0])
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
        # exp(0) = 1 at initialization: the prior starts as N(0, I) for every class
        scale = torch.exp(self.prior_raw_scale[y])
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(self.prior_loc[y], scale).to_event(1))
            h = torch.cat([z, one_hot_like(y, self.num_classes, z.shape[:-1])], -1)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h)).to_event(1), obs=x)
