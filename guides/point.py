"""A point-mass "guide": the deterministic encoder of a plain autoencoder."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp


@dataclass(frozen=True)
class PointGuideConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    site: str = "z"


class PointGuide(PyroModule):
    """q(z|x) = Delta(encoder(x)): one code per data point, no spread.

    A point mass has no density: its site is masked (``poutine.mask(mask=False)``), so neither its
    log q (0 at its point) nor a closed-form KL against it (Pyro's KL(Delta || p) = -log p(z), which
    the ``analytic-kl`` estimator would otherwise add) counts in any loss. With the ``autoencoder``
    model, whose prior is masked too, every estimator's loss is then exactly the reconstruction
    negative log-likelihood (see models/autoencoder.py). Paired with a VAE's model it is MAP-style
    training, not an ELBO, and estimators disagree on whether the prior term counts: pair it with
    ``autoencoder``.

    It is no importance-sampling proposal either: ``has_density = False`` says so to code that would
    use it as one.

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1; the draw is encoder(x)
    itself, so gradients reach the encoder through it.
    """

    Config = PointGuideConfig
    has_density = False

    def __init__(self, config: PointGuideConfig = PointGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.encoder = mlp([config.x_dim, *config.hidden, config.latent_dim], config.activation)

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            with poutine.mask(mask=False):
                pyro.sample(self.config.site, dist.Delta(self.encoder(x)).to_event(1))
