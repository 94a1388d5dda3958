"""The VAE with two stochastic layers of Burda, Grosse & Salakhutdinov (2016)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp, split_loc_scale


@dataclass(frozen=True)
class TwoLayerVAEConfig:
    """Defaults: Burda et al.'s MNIST architecture (latents 100 and 50; hidden 200-200 and 100-100).

    The network options ``latent_dim`` and ``hidden`` set the top latent z2 (the one with the N(0, I)
    prior) and the hidden layers of the networks that touch x; ``z1_dim`` and ``top_hidden`` (the
    networks between z1 and z2) keep Burda's sizes unless given.
    """

    x_dim: int = 784
    latent_dim: int = 50
    z1_dim: int = 100
    hidden: tuple[int, ...] = (200, 200)
    top_hidden: tuple[int, ...] = (100, 100)
    activation: str = "tanh"


class TwoLayerVAE(PyroModule):
    """z2 ~ Normal(0, I), z1 | z2 ~ Normal(mu(z2), diag sigma(z2)^2), x | z1 ~ Bernoulli(logits=f(z1)).

    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, section 5: two
    stochastic layers of 100 and 50 units, tanh MLPs 50-100-100-(100) for p(z1|z2) and 100-200-200-784
    for p(x|z1).

    Latent sites:   ``z2``: (B, latent_dim), ``z1``: (B, z1_dim), event dim 1 each.
    Observed site:  ``x``: (B, x_dim) with values in {0, 1}, event dim 1.
    Plates:         ``data`` of size B at dim -1, so particles can vectorize at dim -2.

    Call as ``model(x)`` to score data, or ``model(None, batch_size=n)`` to sample from the prior.
    """

    Config = TwoLayerVAEConfig
    observed_site = "x"

    def __init__(self, config: TwoLayerVAEConfig = TwoLayerVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.z1_net = mlp([config.latent_dim, *config.top_hidden, 2 * config.z1_dim], config.activation)
        self.decoder = mlp([config.z1_dim, *config.hidden, config.x_dim], config.activation)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        zeros = torch.zeros(self.config.latent_dim, device=self.decoder[0].weight.device)
        with pyro.plate("data", n, dim=-1):
            z2 = pyro.sample("z2", dist.Normal(zeros, 1.0).to_event(1))
            loc, scale = split_loc_scale(self.z1_net(z2))
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1)).to_event(1), obs=x)
