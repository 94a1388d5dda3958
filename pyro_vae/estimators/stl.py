"""'Sticking the landing': the path-derivative ELBO gradient (Roeder et al. 2017)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._weights import check_num_particles, estimator_log_weights


@dataclass(frozen=True)
class STL:
    """The ELBO's value with the path-derivative gradient, which drops the score term of the guide.

    Roeder, Wu & Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient Estimators for
    Variational Inference", NeurIPS 2017. log q is evaluated at stopped guide parameters, so the guide
    gradient is E[(d log w / d z)(d z / d phi)]; it is unbiased, and exactly zero when q is the exact
    posterior (log w is then constant in z). The model gradient is the ELBO's.

    For a hierarchical guide q(z1|x) q(z2|z1) the guide is replayed on its draws with its parameters
    detached, so log q still depends on z1 through q(z2|z1): the path derivative is taken through
    every draw, and the gradient is still zero at the exact posterior.

    Requires: every guide latent reparameterizable and local to ``pyro.plate("data")``; the guide's
    parameters owned by the guide module (or ``pyro.param``), so that they can be held fixed; with
    two or more latent sites, a guide whose code is a deterministic function of its inputs and its
    draws (it is run again: no dropout, no batch-norm updates).
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, _ = estimator_log_weights("stl", model, guide, self.num_particles, args, kwargs, path_derivative=True)
        return -log_w.mean(0).sum()
