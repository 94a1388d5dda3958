"""The Rényi-alpha variational bound (Li & Turner 2016)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._weights import check_num_particles, estimator_log_weights


@dataclass(frozen=True)
class Renyi:
    """Negative VR bound, -sum_n 1/(1-alpha) log (1/K) sum_k w_nk^(1-alpha).

    Li & Turner, "Rényi Divergence Variational Inference", NeurIPS 2016. alpha = 0 is the IWAE
    bound; alpha -> 1 approaches the ELBO (alpha = 1 is taken as that limit, the mean log-weight);
    alpha < 0 bounds log p(x) from above for large K, so its value is then no lower bound. Per data
    point, vectorized particles, reparameterized gradients.

    Requires: every guide latent reparameterizable; every latent local to ``pyro.plate("data")``.
    """

    alpha: float = 0.5
    num_particles: int = 5
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")

    @property
    def note(self) -> str | None:
        """What a user choosing this alpha should know (the command line prints it), or None."""
        a = float(self.alpha)
        if a == 1:
            return ("renyi at alpha 1 is the ELBO (the limit alpha -> 1: the mean log-weight), the same bound as "
                    "--estimator elbo")
        if a < 0:
            return (f"renyi at alpha {a:g} < 0 is no lower bound: for large K it bounds log p(x) from above "
                    "(Li & Turner 2016), so its values do not compare with the other estimators' bounds")
        if a > 1:
            return f"renyi at alpha {a:g} > 1 is a looser lower bound than the ELBO (the bound falls as alpha grows)"
        return None

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, _ = estimator_log_weights("renyi", model, guide, self.num_particles, args, kwargs)
        if self.alpha == 1:
            return -log_w.mean(0).sum()
        one_minus = 1.0 - float(self.alpha)
        bound = (torch.logsumexp(one_minus * log_w, 0) - math.log(self.num_particles)) / one_minus
        return -bound.sum()
