"""The semi-supervised generative model M2 of Kingma, Rezende, Mohamed & Welling (2014)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_vae.nets import mlp

from .cvae import one_hot_like


@dataclass(frozen=True)
class M2Config:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (500,)
    activation: str = "softplus"
    num_classes: int = 10


class M2(PyroModule):
    """y ~ Categorical(uniform), z ~ Normal(0, I), x | y, z ~ Bernoulli(logits=decoder([z, onehot(y)])).

    Latent sites:   ``z``: (B, latent_dim), event dim 1; ``y``: (B,) int64, a latent where the batch
                    has no labels and observed where it has.
    Observed site:  ``x``: (B, x_dim) in {0, 1}, event dim 1.
    Labels:         optional (``labels = "optional"``): ``model(x, y)`` for a labeled batch,
                    ``model(x)`` for an unlabeled one.
    Plates:         ``data`` of size B at dim -1.

    The decoder broadcasts over leading dims, so ``y`` may be enumerated (``TraceEnum_ELBO`` with the
    guide's ``y`` marked for parallel enumeration puts its C values at dim -2) or drawn per particle.
    """

    Config = M2Config
    observed_site = "x"
    labels = "optional"
    label_site = "y"

    def __init__(self, config: M2Config = M2Config()):
        super().__init__(name="model")
        self.config = config
        self.num_classes = config.num_classes
        self.latent_dim = config.latent_dim
        self.decoder = mlp([config.latent_dim + config.num_classes, *config.hidden, config.x_dim], config.activation)

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else (batch_size if batch_size is not None else y.shape[0])
        device = self.decoder[0].weight.device
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim, device=device), 1.0).to_event(1))
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(self.num_classes, device=device)), obs=y)
            batch = torch.broadcast_shapes(z.shape[:-1], y.shape)
            h = torch.cat([z.expand(*batch, self.latent_dim), one_hot_like(y, self.num_classes, batch)], -1)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h)).to_event(1), obs=x)
