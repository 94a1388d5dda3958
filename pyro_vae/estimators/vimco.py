"""VIMCO: the IWAE bound with leave-one-out score-function baselines (Mnih & Rezende 2016)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyro_vae.programs.sites import latent_sites

from ._checks import warn_ignored_baselines
from ._weights import _site_log_prob, check_num_particles, estimator_log_weights, plate_nesting


def leave_one_out(log_w: torch.Tensor) -> torch.Tensor:
    """L_{-k} = log (1/K) [sum_{j != k} w_j + exp(mean_{j != k} log w_j)] per particle k and point, (K, B).

    The bound with the k-th log-weight replaced by the mean of the others (the geometric mean of the
    others' weights, Mnih & Rezende 2016, eq. 8); it does not depend on draw k."""
    k = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)  # (K, K, 1): row k swaps entry k
    swapped = torch.where(eye, others_mean.unsqueeze(1), log_w.unsqueeze(0))  # (K, K, B)
    return torch.logsumexp(swapped, 1) - math.log(k)


@dataclass(frozen=True)
class VIMCO:
    """Negative IWAE bound, -sum_n [logsumexp_k log w_nk - log K], with the VIMCO gradient.

    Mnih & Rezende, "Variational Inference for Monte Carlo Objectives", ICML 2016. With L the bound of
    one data point, its gradient is E[sum_k (L - L_{-k}) d log q(z_k|x) + sum_k w~_k d log w_k]
    (eq. 6, 9): every guide site that is not reparameterizable gets the first, score-function term,
    whose learning signal for draw k is centred by the leave-one-out bound L_{-k} (``leave_one_out``),
    a baseline that depends only on the other K - 1 draws, so the gradient stays unbiased for the
    IWAE gradient. The second term is autodiff of the bound: the model's gradient, and the
    reparameterized path of every site that has one (a guide without discrete sites gets exactly
    IWAE's gradient). Everything is per data point, vectorized over the K particles.

    Requires: K >= 2; every latent local to ``pyro.plate("data")``; unscaled sites. No Python state:
    the replayed training path records it like any other estimator.
    """

    num_particles: int = 5
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        if self.num_particles < 2:
            raise ValueError("vimco needs num_particles >= 2: its baseline for a draw is built from the others")

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, (_, guide_tr) = estimator_log_weights("vimco", model, guide, self.num_particles, args, kwargs,
                                                     reparameterized=False)
        warn_ignored_baselines("vimco", guide, guide_tr, "its leave-one-out baselines take its place")
        bound = torch.logsumexp(log_w, 0) - math.log(self.num_particles)
        value = -bound.sum()
        if not log_w.requires_grad:
            return value
        nesting = plate_nesting(model, *args, **kwargs)
        scored = [guide_tr.nodes[n] for n in latent_sites(guide_tr) if not guide_tr.nodes[n]["fn"].has_rsample]
        if not scored:
            return value
        log_q = sum(_site_log_prob(site, nesting, False) for site in scored)  # (K, B)
        signal = (bound.unsqueeze(0) - leave_one_out(log_w)).detach()
        surrogate = (signal * log_q).sum()
        return value - (surrogate - surrogate.detach())
