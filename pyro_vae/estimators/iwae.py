"""The importance-weighted bound of Burda et al. (2016)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._weights import check_num_particles, estimator_log_weights


@dataclass(frozen=True)
class IWAE:
    """Negative IWAE bound, -sum_n [logsumexp_k log w_nk - log K], w_nk = p(x_n, z_nk) / q(z_nk | x_n).

    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016. The K draws are
    vectorized in a particle plate left of the data plate, and the logsumexp is taken per data point,
    so the bound is right for any batch size. Gradients are the plain reparameterized gradients of
    the bound (normalized weights w~ times the per-draw gradients, by autodiff).

    Requires: every guide latent reparameterizable; every latent local to ``pyro.plate("data")``.
    K = 1 gives the ELBO.
    """

    num_particles: int = 5
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, _ = estimator_log_weights("iwae", model, guide, self.num_particles, args, kwargs)
        return -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()
