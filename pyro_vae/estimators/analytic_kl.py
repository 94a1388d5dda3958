"""The ELBO with the KL term in closed form where one is registered (Pyro's TraceMeanField_ELBO)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pyro.infer import TraceMeanField_ELBO

from ._weights import check_num_particles
from .elbo import kl_scaled_guide


@dataclass(frozen=True)
class AnalyticKL:
    """Negative ELBO, -(E_q[log p(x|z)] - KL(q(z|x) || p(z))), in nats summed over the data plate.

    The reconstruction term is estimated by Monte Carlo; the KL is exact wherever
    ``torch.distributions.kl_divergence`` knows the pair (e.g. diagonal Gaussians, Kingma & Welling
    2014, eq. 10) and falls back to Monte Carlo elsewhere. Same expectation as ``elbo``, lower variance.

    Requires: a mean-field guide whose sites match the model's one for one (Pyro's condition for
    TraceMeanField_ELBO). A model's ``kl_scale`` (beta-VAE) weights the KL. Its value is not a
    function of the log-weights alone.
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = False
    _elbo: TraceMeanField_ELBO = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        elbo = TraceMeanField_ELBO(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1)
        object.__setattr__(self, "_elbo", elbo)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self._elbo.differentiable_loss(model, kl_scaled_guide(model, guide), *args, **kwargs)
