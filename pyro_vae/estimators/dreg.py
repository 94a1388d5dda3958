"""Doubly-reparameterized gradients for the IWAE bound (Tucker et al. 2019)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..sites import latent_sites
from ._weights import log_weights, require_independent_guide_sites, require_reparameterized


@dataclass(frozen=True)
class DReG:
    """The IWAE bound's value with the DReG gradient estimator.

    Tucker, Lawson, Gu & Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo
    Objectives", ICLR 2019. Guide gradient: sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi), with
    log q evaluated at stopped guide parameters, so the high-variance score term of the IWAE
    gradient is gone; it is unbiased for the IWAE gradient. Model gradient: the IWAE one,
    sum_k w~_k d log w_k / d theta.

    Requires: every guide latent reparameterizable, and no guide latent feeding the distribution of
    another (checked on every call; a hierarchical guide gets a clear error, not a wrong gradient).
    """

    num_particles: int = 5
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if int(self.num_particles) <= 0:
            raise ValueError(f"num_particles must be positive, got {self.num_particles}")

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, guide_tr = log_weights(model, guide, self.num_particles, *args, stop_guide_params=True, **kwargs)
        require_reparameterized(guide_tr, "dreg")
        require_independent_guide_sites(guide_tr, "dreg")
        value = -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()
        if not log_w.requires_grad:
            return value
        w = torch.softmax(log_w.detach(), 0)
        for name in latent_sites(guide_tr):
            z = guide_tr.nodes[name]["value"]
            if z.requires_grad:
                # the surrogate below sends w~ through z; this hook makes it w~^2 on the path to phi
                z.register_hook(lambda g, w=w: g * w.reshape(w.shape + (1,) * (g.dim() - w.dim())))
        surrogate = -(w * log_w).sum()
        return value.detach() + (surrogate - surrogate.detach())
