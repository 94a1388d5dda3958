"""A plain deterministic autoencoder written as a Pyro program: the VAE's decoder with its prior switched off."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp


@dataclass(frozen=True)
class AutoencoderConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"


class Autoencoder(PyroModule):
    """x | z ~ Bernoulli(logits=decoder(z)), trained on reconstruction alone: a baseline, not a VAE.

    Paired with the ``point`` guide (z = encoder(x), a point mass), every estimator's loss is the
    reconstruction negative log-likelihood -sum_n log p(x_n | z = encoder(x_n)): the prior's
    log-density is masked out (``poutine.mask(mask=False)``) and a point mass has log q = 0 at its
    point. So the "ELBO" a run logs for this model is only the reconstruction log-likelihood: it is
    no bound on log p(x), and it is not comparable to a VAE's ELBO (it is always higher, since the
    VAE pays the KL).

    ``model(None, batch_size=n)`` still draws z ~ Normal(0, I) and decodes it, the way a VAE
    generates. Nothing in training made the codes look like draws from N(0, I), which is why such
    samples are mostly not digits; ``pyro_vae.generation`` measures this.

    Train it with ReLU nets (``--activation relu``). With tanh, the library's default, the codes drift
    together early in training (nothing holds them near the origin, as a VAE's KL term does) until
    the decoder's first tanh layer saturates and ignores them; reconstruction then stalls near the
    mean image (about -207 nats on MNIST).

    There is no log-likelihood to estimate: ``has_likelihood = False`` tells code that estimates
    log p(x) by importance sampling (whose weights here would be log p(x | encoder(x)) for every
    draw, the reconstruction term again) that its number would not be one.

    Latent sites:   ``z``: (B, latent_dim), event dim 1 (its prior is masked out when scoring).
    Observed site:  ``x``: (B, x_dim) with values in {0, 1}, event dim 1.
    Plates:         ``data`` of size B at dim -1.
    """

    Config = AutoencoderConfig
    observed_site = "x"
    has_likelihood = False

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__(name="model")
        self.config = config
        self.latent_dim = config.latent_dim
        self.x_dim = config.x_dim
        self.decoder = mlp([config.latent_dim, *config.hidden, config.x_dim], config.activation)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        zeros = torch.zeros(self.latent_dim, device=self.decoder[0].weight.device)
        with pyro.plate("data", n, dim=-1):
            # masked, not removed: the site stays (so guides pair with it and generation can draw from it),
            # but its log-density counts for nothing, so no estimator pulls the codes towards the prior
            with poutine.mask(mask=False):
                z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
