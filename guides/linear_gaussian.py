"""An amortized Gaussian guide linear in x: it contains the exact posterior of a linear-Gaussian model."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn


@dataclass(frozen=True)
class LinearGaussianGuideConfig:
    x_dim: int = 10
    latent_dim: int = 3
    full_covariance: bool = True
    site: str = "z"


class LinearGaussianGuide(PyroModule):
    """q(z|x) = N(A x + c, L L^T), with L lower-triangular (full covariance) or diagonal.

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1, reparameterized.
    ``set_exact(model)`` copies a LinearGaussian model's exact posterior into it.
    """

    Config = LinearGaussianGuideConfig

    def __init__(self, config: LinearGaussianGuideConfig = LinearGaussianGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        d = config.latent_dim
        self.a = nn.Parameter(torch.zeros(d, config.x_dim))
        self.c = nn.Parameter(torch.zeros(d))
        self.log_diag = nn.Parameter(torch.zeros(d))
        self.lower = nn.Parameter(torch.zeros(d, d)) if config.full_covariance else None

    def scale_tril(self) -> torch.Tensor:
        tril = torch.diag_embed(self.log_diag.exp())
        if self.lower is not None:
            tril = tril + self.lower.tril(-1)
        return tril

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        loc = x @ self.a.T + self.c
        with pyro.plate("data", x.shape[0], dim=-1):
            if self.lower is None:
                pyro.sample(self.config.site, dist.Normal(loc, self.log_diag.exp()).to_event(1))
            else:
                pyro.sample(self.config.site, dist.MultivariateNormal(loc, scale_tril=self.scale_tril()))

    @torch.no_grad()
    def set_exact(self, model) -> "LinearGaussianGuide":
        a, c, s = model.exact_posterior()
        chol = torch.linalg.cholesky(s)
        if self.lower is None and not torch.allclose(chol, torch.diag(chol.diagonal())):
            raise ValueError("this model's posterior is not diagonal; use full_covariance=True")
        self.a.copy_(a)
        self.c.copy_(c)
        self.log_diag.copy_(chol.diagonal().log())
        if self.lower is not None:
            self.lower.copy_(chol.tril(-1))
        return self
