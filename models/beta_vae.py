"""beta-VAE (Higgins et al. 2017) with an optional KL warm-up (Bowman et al. 2016; Sonderby et al. 2016)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger

from .bernoulli_vae import BernoulliVAE, BernoulliVAEConfig


class ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``scale``; observed sites keep theirs."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.scale


@dataclass(frozen=True)
class BetaVAEConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    beta: float = 4.0
    kl_warmup_steps: int = 0  # 0: beta from the first step; N: beta * min(1, (step + 1) / N)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")


class BetaVAE(PyroModule):
    """The Bernoulli VAE with its KL term weighted by beta: E_q[log p(x|z)] - beta * KL(q(z|x) || p(z)).

    beta > 1 trades reconstruction for a latent code closer to the factorized prior (Higgins et al.
    2017); beta < 1 the reverse. With ``kl_warmup_steps`` the weight rises linearly from beta/N to beta
    over the first N optimizer steps, which keeps units from collapsing early (Sonderby et al. 2016).

    How: the model's latent sites run under ``poutine.scale(kl_scale)`` via ``ScaleLatents``. The KL
    is E_q[log q - log p], so the guide's log q must carry the same scale; the ``elbo`` and
    ``analytic-kl`` estimators apply the model's ``kl_scale`` to the guide. The importance-weighted
    estimators refuse scaled sites. The trainer calls ``set_step`` before each step.

    The training and test bounds a run logs are the beta-weighted objective. The evaluation's ELBO
    and log-likelihood are unweighted: they ignore scales.

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim) in {0, 1}, event dim 1.
    """

    Config = BetaVAEConfig
    observed_site = "x"

    def __init__(self, config: BetaVAEConfig = BetaVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.vae = BernoulliVAE(BernoulliVAEConfig(config.x_dim, config.latent_dim, config.hidden, config.activation))
        self.latent_dim = config.latent_dim
        self._step = None  # None: not training, the full beta

    def set_step(self, step: int) -> None:
        self._step = step

    @property
    def kl_scale(self) -> float:
        warmup = self.config.kl_warmup_steps
        if not warmup or self._step is None:
            return self.config.beta
        return self.config.beta * min(1.0, (self._step + 1) / warmup)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        with ScaleLatents(self.kl_scale):
            self.vae(x, batch_size=batch_size)
