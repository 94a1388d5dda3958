"""The VAE of Kingma & Welling (2014) with the 1-layer architecture of Burda et al. (2015)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp


@dataclass(frozen=True)
class BernoulliVAEConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"


class BernoulliVAE(PyroModule):
    """z ~ Normal(0, I), x | z ~ Bernoulli(logits=decoder(z)), one z per data point.

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim) with values in {0, 1}, event dim 1.
    Plates:         ``data`` of size B at dim -1, so particles can vectorize at dim -2.

    Call as ``model(x)`` to score data, or ``model(None, batch_size=n)`` to sample from the prior.
    """

    Config = BernoulliVAEConfig
    observed_site = "x"

    def __init__(self, config: BernoulliVAEConfig = BernoulliVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.latent_dim = config.latent_dim
        self.x_dim = config.x_dim
        self.decoder = mlp([config.latent_dim, *config.hidden, config.x_dim], config.activation)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        zeros = torch.zeros(self.latent_dim, device=self._device())
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def _device(self) -> torch.device:
        return self.decoder[0].weight.device
