"""'Sticking the landing': the path-derivative ELBO gradient (Roeder et al. 2017)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._weights import log_weights, require_independent_guide_sites, require_reparameterized


@dataclass(frozen=True)
class STL:
    """The ELBO's value with the path-derivative gradient, which drops the score term of the guide.

    Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient Estimators for
    Variational Inference", NeurIPS 2017. log q is evaluated at stopped guide parameters, so the guide
    gradient is E[(d log w / d z)(d z / d phi)]; it is unbiased, and exactly zero when q is the exact
    posterior (log w is then constant in z). The model gradient is the ELBO's.

    Requires: every guide latent reparameterizable, and no guide latent feeding another.
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if int(self.num_particles) <= 0:
            raise ValueError(f"num_particles must be positive, got {self.num_particles}")

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, guide_tr = log_weights(model, guide, self.num_particles, *args, stop_guide_params=True, **kwargs)
        require_reparameterized(guide_tr, "stl")
        require_independent_guide_sites(guide_tr, "stl")
        return -log_w.mean(0).sum()
