"""The standard evidence lower bound, estimated by Monte Carlo (Pyro's Trace_ELBO)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pyro.infer import Trace_ELBO

from ._weights import check_num_particles


@dataclass(frozen=True)
class ELBO:
    """Negative ELBO, -E_q[log p(x, z) - log q(z|x)], summed over the data plate, in nats.

    The KL term is estimated by Monte Carlo from the same samples as the reconstruction term
    (Kingma & Welling 2014). Gradients use the reparameterization trick where a guide site is
    reparameterizable, and score-function terms elsewhere, as Pyro's ``Trace_ELBO`` does.

    ``num_particles`` > 1 averages that many samples, vectorized over a particle plate placed left
    of the model's plates.
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = True
    _elbo: Trace_ELBO = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        elbo = Trace_ELBO(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1)
        object.__setattr__(self, "_elbo", elbo)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self._elbo.differentiable_loss(model, guide, *args, **kwargs)
