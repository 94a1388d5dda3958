"""Factor analysis / probabilistic PCA: a latent-variable model whose log p(x) and posterior are exact."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn


@dataclass(frozen=True)
class LinearGaussianConfig:
    x_dim: int = 10
    latent_dim: int = 3
    init_scale: float = 0.5


class LinearGaussian(PyroModule):
    """z ~ Normal(0, I), x | z ~ Normal(W z + b, diag(psi)): factor analysis (Tipping & Bishop 1999 for
    psi = sigma^2 I).

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim), event dim 1.
    Plates:         ``data`` of size B at dim -1.

    Exact results: p(x) = N(b, W W^T + diag psi), and p(z|x) = N(S W^T Psi^-1 (x - b), S) with
    S = (I + W^T Psi^-1 W)^-1. Estimators and evaluators are checked against these.
    """

    Config = LinearGaussianConfig

    def __init__(self, config: LinearGaussianConfig = LinearGaussianConfig()):
        super().__init__(name="model")
        self.config = config
        self.latent_dim, self.x_dim = config.latent_dim, config.x_dim
        self.weight = nn.Parameter(config.init_scale * torch.randn(config.x_dim, config.latent_dim))
        self.bias = nn.Parameter(torch.zeros(config.x_dim))
        self.log_psi = nn.Parameter(torch.zeros(config.x_dim))

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        w, b, scale = self.weight, self.bias, (0.5 * self.log_psi).exp()
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(w[0]), 1.0).to_event(1))
            loc = (z.unsqueeze(-2) @ w.transpose(-1, -2)).squeeze(-2) + b
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)

    @torch.no_grad()
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per point, shape (B,)."""
        w = self.weight
        cov = w @ w.T + torch.diag(self.log_psi.exp())
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def exact_posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, c, S) with p(z|x) = N(A x + c, S)."""
        w, psi_inv = self.weight, (-self.log_psi).exp()
        eye = torch.eye(self.latent_dim, dtype=w.dtype, device=w.device)
        s = torch.linalg.inv(eye + w.T @ (psi_inv[:, None] * w))
        a = s @ w.T * psi_inv
        return a, -a @ self.bias, s

    def sample_data(self, n: int) -> torch.Tensor:
        """n exact draws from p(x), on the parameters' device (from that device's generator)."""
        w = self.weight
        with torch.no_grad():
            z = torch.randn(n, self.latent_dim, dtype=w.dtype, device=w.device)
            noise = torch.randn(n, self.x_dim, dtype=w.dtype, device=w.device)
            return z @ w.T + self.bias + (0.5 * self.log_psi).exp() * noise


