"""The MLP VAE of Kingma & Welling (2014) with a Gaussian likelihood, for continuous data."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp

from .likelihoods import ObservationLikelihood


@dataclass(frozen=True)
class GaussianVAEConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    obs_scale: float | None = None  # sigma; None learns one sigma shared by every value


class GaussianVAE(PyroModule):
    """z ~ Normal(0, I), x | z ~ Normal(decoder(z), sigma^2 I), one z per data point.

    With a fixed sigma the negative ELBO is ||x - mu(z)||^2 / (2 sigma^2) + KL + const, an MSE
    autoencoder with a KL weight of 2 sigma^2 (the "MSE view", see models/likelihoods.py); with
    ``obs_scale=None`` sigma is a learned parameter of the model, not a latent.

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim), real values (use binarize="none"), event dim 1.
    Plates:         ``data`` of size B at dim -1, so particles can vectorize at dim -2.

    Call as ``model(x)`` to score data, or ``model(None, batch_size=n)`` to sample from the prior.
    """

    Config = GaussianVAEConfig
    observed_site = "x"

    def __init__(self, config: GaussianVAEConfig = GaussianVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.latent_dim = config.latent_dim
        self.x_dim = config.x_dim
        self.decoder = mlp([config.latent_dim, *config.hidden, config.x_dim], config.activation)
        self.likelihood = ObservationLikelihood("gaussian", config.obs_scale)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        w = self.decoder[0].weight
        zeros = torch.zeros(self.latent_dim, device=w.device, dtype=w.dtype)
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
