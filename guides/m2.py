"""The inference networks of M2 (Kingma et al. 2014): a classifier q(y|x) and q(z|x, y)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.models.cvae import one_hot_like
from pyro_vae.nets import mlp, split_loc_scale


@dataclass(frozen=True)
class M2GuideConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (500,)
    activation: str = "softplus"
    num_classes: int = 10
    aux_weight: float = 0.0  # alpha of the classification loss on labeled batches (Kingma et al.: 0.1 * N)


class M2Guide(PyroModule):
    """q(y|x) = Categorical(classifier(x)) and q(z|x,y) = Normal(mu([x, onehot y]), diag sigma^2).

    Latent sites: ``y`` (B,) where the batch is unlabeled, marked for parallel enumeration;
                  ``z`` (B, latent_dim), event dim 1, reparameterized.
    With labels, ``y`` is not sampled, and ``aux_weight`` > 0 adds Kingma et al.'s classification loss
    -aux_weight * log q(y|x) as a guide factor (a factor in the guide enters the loss with the sign of
    log q: the term is -aux_weight * log q(y|x), so the loss gains +aux_weight * (-log q(y|x))).
    """

    Config = M2GuideConfig

    def __init__(self, config: M2GuideConfig = M2GuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.classifier = mlp([config.x_dim, *config.hidden, config.num_classes], config.activation)
        self.encoder = mlp([config.x_dim + config.num_classes, *config.hidden, 2 * config.latent_dim],
                           config.activation)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            logits = self.classifier(x)
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
            elif self.config.aux_weight > 0:
                log_q = dist.Categorical(logits=logits).log_prob(y)
                pyro.factor("y_classifier", -self.config.aux_weight * log_q, has_rsample=True)
            loc, scale = split_loc_scale(self._encode(x, y))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def _encode(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``encoder([x, onehot(y)])``, with the first layer's product split in two: W [x, onehot y] =
        W_x x + W_y onehot(y). With y enumerated over C classes this computes W_x x once instead of
        C times (the largest matrix product of the guide), and the result equals the concatenated form
        to float rounding."""
        first = self.encoder[0]
        d = x.shape[-1]
        h = nn.functional.linear(x, first.weight[:, :d], first.bias)  # (..., B, hidden)
        batch = torch.broadcast_shapes(y.shape, x.shape[:-1])
        # a one-hot product rather than indexing by y: the fast path records it as a plain tensor graph
        h = h + one_hot_like(y, self.config.num_classes, batch) @ first.weight[:, d:].T
        return self.encoder[1:](h)
