"""Doubly-reparameterized gradients for the IWAE bound (Tucker et al. 2019)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyro_vae.programs.sites import latent_sites

from ._weights import check_num_particles, estimator_log_weights
from .grad_scaling import scale_grad


@dataclass(frozen=True)
class DReG:
    """The IWAE bound's value with the DReG gradient estimator.

    Tucker, Lawson, Gu & Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo
    Objectives", ICLR 2019. Guide gradient: sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi), with
    log q evaluated at stopped guide parameters, so the high-variance score term of the IWAE
    gradient is gone; it is unbiased for the IWAE gradient. Model gradient: the IWAE one,
    sum_k w~_k d log w_k / d theta.

    For a hierarchical guide q(z1|x) q(z2|z1), z_k is the whole draw (z1, z2), d z_k / d phi includes
    z2's dependence on phi through z1, and log q_phi(z) at stopped phi still depends on z1 through
    q(z2|z1) (the guide is replayed on its draws with its parameters detached). Each latent's draw
    reaches log w through a separate copy that carries the w~_k^2 scaling; the guide's own z1 -> z2
    map uses the raw draw, so every path to phi is scaled exactly once.

    Requires: every guide latent reparameterizable and local to ``pyro.plate("data")``; the guide's
    parameters owned by the guide module (or ``pyro.param``), so that they can be held fixed; with
    two or more latent sites, a guide whose code is a deterministic function of its inputs and its
    draws (it is run again: no dropout, no batch-norm updates).
    """

    num_particles: int = 5
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, (model_tr, guide_tr) = estimator_log_weights("dreg", model, guide, self.num_particles, args, kwargs,
                                                            path_derivative=True)
        value = -(torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()
        if not log_w.requires_grad:
            return value
        w = torch.softmax(log_w.detach(), 0)
        for name in latent_sites(guide_tr):
            fn = guide_tr.nodes[name]["fn"]
            copy = model_tr.nodes[name]["value"] if name in model_tr.nodes else None
            if copy is not None and copy.requires_grad:
                # (K, B) weights laid out as the site's (K, inner plates..., B, event...) value
                inner = len(fn.batch_shape) - 2
                shape = (w.shape[0],) + (1,) * inner + (w.shape[1],) + (1,) * len(fn.event_shape)
                # the surrogate below sends w~ through z; this hook on log w's copy of z makes it w~^2
                scale_grad(copy, w.reshape(shape))
        surrogate = -(w * log_w).sum()
        return value.detach() + (surrogate - surrogate.detach())
