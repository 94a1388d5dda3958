"""The ELBO with the KL term in closed form where one is registered (Pyro's TraceMeanField_ELBO)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar
from weakref import WeakKeyDictionary

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ._checks import checked_call, quiet_pyro_guesses, warn_once
from ._weights import check_num_particles
from .elbo import kl_scaled_guide

# per guide: does it sample its latents in another order than its model?
_OUT_OF_ORDER: WeakKeyDictionary = WeakKeyDictionary()


@dataclass(frozen=True)
class AnalyticKL:
    """Negative ELBO, -(E_q[log p(x|z)] - KL(q(z|x) || p(z))), in nats summed over the data plate.

    The reconstruction term is estimated by Monte Carlo; the KL is exact wherever
    ``torch.distributions.kl_divergence`` knows the pair (e.g. diagonal Gaussians, Kingma & Welling
    2014, eq. 10) and falls back to Monte Carlo elsewhere, saying so once per site (e.g. a LogNormal guide
    for a Gamma prior). Same expectation as ``elbo``, lower variance. Every guide site must be
    reparameterizable (the reconstruction term has no score-function part here): a discrete one is
    refused with the estimators that fit.

    The closed form needs the guide to sample its latents in the model's order (Pyro's condition for
    TraceMeanField_ELBO); a guide that does not (a bottom-up hierarchical guide q(z1|x) q(z2|z1) for
    p(z2) p(z1|z2)) gets the Monte Carlo KL of ``elbo`` instead, since its closed-form KLs would be biased
    (said once).
    A model's ``kl_scale`` (beta-VAE) weights the KL. Its value is not a function of the log-weights alone.
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = False
    _elbo: TraceMeanField_ELBO = field(init=False, repr=False, compare=False)
    _monte_carlo: Trace_ELBO = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        vectorize = self.num_particles > 1
        object.__setattr__(self, "_elbo", TraceMeanField_ELBO(num_particles=self.num_particles,
                                                              vectorize_particles=vectorize))
        object.__setattr__(self, "_monte_carlo", Trace_ELBO(num_particles=self.num_particles,
                                                            vectorize_particles=vectorize))

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        def run(m, g):
            return self._loss(model, guide, m, kl_scaled_guide(model, g), args, kwargs)
        with quiet_pyro_guesses():
            return checked_call("analytic-kl", model, guide, run, args, kwargs, analytic_kl=True)

    def _loss(self, model, guide, m, g, args: tuple, kwargs: dict) -> torch.Tensor:
        if guide not in _OUT_OF_ORDER:
            # Pyro only warns (and only with validation on) when the guide samples latents in another order
            # than the model (e.g. q(z1|x) q(z2|z1) against p(z2) p(z1|z2)): each closed-form KL would then be
            # taken given later latents, a biased value. Check once per guide, with validation on.
            with warnings.catch_warnings(), pyro.validation_enabled(True):
                warnings.filterwarnings("error", message="Failed to verify mean field restriction")
                try:
                    loss = self._elbo.differentiable_loss(m, g, *args, **kwargs)
                    _OUT_OF_ORDER[guide] = False
                    return loss
                except UserWarning:
                    _OUT_OF_ORDER[guide] = True
                    warn_once(guide, "order", "", f"analytic-kl: {type(guide).__name__} samples its latents in "
                              f"another order than {type(model).__name__}, so closed-form KLs would be biased; "
                              "every KL term is estimated by Monte Carlo instead, as in elbo")
        elbo = self._monte_carlo if _OUT_OF_ORDER[guide] else self._elbo
        return elbo.differentiable_loss(m, g, *args, **kwargs)
