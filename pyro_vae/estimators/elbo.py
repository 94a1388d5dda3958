"""The standard evidence lower bound, estimated by Monte Carlo (Pyro's Trace_ELBO)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO

from ._checks import checked_call, quiet_pyro_guesses
from ._weights import check_num_particles


def kl_scaled_guide(model, guide):
    """The guide under the model's ``kl_scale`` (e.g. a beta-VAE's beta), so that the scaled model's latent
    log p and the guide's log q together form beta * KL; the guide itself where the model has none."""
    scale = getattr(model, "kl_scale", None)
    return guide if scale is None or scale == 1.0 else poutine.scale(guide, scale=scale)


@dataclass(frozen=True)
class ELBO:
    """Negative ELBO, -E_q[log p(x, z) - log q(z|x)], summed over the data plate, in nats.

    The KL term is estimated by Monte Carlo from the same samples as the reconstruction term
    (Kingma & Welling 2014). Gradients use the reparameterization trick where a guide site is
    reparameterizable, and score-function terms elsewhere, as Pyro's ``Trace_ELBO`` does.

    ``num_particles`` > 1 averages that many samples, vectorized over a particle plate placed left
    of the model's plates. A model with a ``kl_scale`` (beta-VAE) gets -(E_q[log p(x|z)] - scale * KL).
    A model-side enumerated site (``infer={"enumerate": "parallel"}``, no guide site) is refused: enum-elbo
    sums it out. A guide's ``infer={"baseline": ...}`` is not used (and said so, once).
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = True
    _elbo: Trace_ELBO = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        elbo = Trace_ELBO(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1)
        object.__setattr__(self, "_elbo", elbo)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        def run(m, g):
            return self._elbo.differentiable_loss(m, kl_scaled_guide(model, g), *args, **kwargs)
        with quiet_pyro_guesses():
            return checked_call("elbo", model, guide, run, args, kwargs)
