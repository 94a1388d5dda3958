"""Observation models p(x | decoder output) shared by the VAEs: Bernoulli, or Gaussian with fixed or learned scale.

The Gaussian likelihood and the "MSE view" of a VAE
---------------------------------------------------
With x | z ~ Normal(mu(z), sigma^2 I) over D values,

    -log p(x | z) = ||x - mu(z)||^2 / (2 sigma^2) + D log sigma + (D / 2) log(2 pi),

so for a fixed sigma the negative ELBO is, up to a constant and the positive factor 2 sigma^2,

    2 sigma^2 * (-ELBO) = E_q ||x - mu(z)||^2 + 2 sigma^2 KL(q(z|x) || p(z)) + const:

a squared-error autoencoder loss plus a KL penalty of weight beta = 2 sigma^2 (a beta-VAE, Higgins et
al. 2017). A small sigma weights reconstruction heavily: sharp reconstructions, a large KL, and prior
samples that fall off the data; a large sigma buys a small KL with blurry reconstructions. Either way
the decoder's output is the mean of a unimodal Gaussian, and where several images fit one z the mean
is their average, hence blur. Learning sigma (Rybkin et al. 2021, "sigma-VAE") settles it at the
maximum-likelihood value sigma^2 = mean squared reconstruction error.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")


class ObservationLikelihood(nn.Module):
    """Builds p(x | out) from a decoder output ``out`` of shape (..., D); the result has event dim 1.

    - ``"bernoulli"``: Bernoulli(logits=out), for data in {0, 1} (binarized images).
    - ``"gaussian"``: Normal(out, sigma) per value, for continuous data (``binarize="none"``).
      ``obs_scale`` fixes sigma; ``None`` learns one sigma shared by every pixel, a parameter of the
      model (not a latent), initialised at 1 and kept positive through its log. One shared sigma rather
      than one per pixel: a per-pixel sigma collapses to 0 on pixels that never change (MNIST's border),
      where the likelihood then grows without bound.
    """

    def __init__(self, kind: str = "bernoulli", obs_scale: float | None = None):
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; known: {', '.join(LIKELIHOODS)}")
        if obs_scale is not None and kind != "gaussian":
            raise ValueError(f"obs_scale={obs_scale} sets the sigma of likelihood='gaussian', not {kind!r}")
        if obs_scale is not None and not (math.isfinite(obs_scale) and obs_scale > 0):
            raise ValueError(f"obs_scale must be a positive number, got {obs_scale}")
        self.kind = kind
        self.fixed_scale = None if obs_scale is None else float(obs_scale)
        if kind == "gaussian" and obs_scale is None:
            self.log_scale = nn.Parameter(torch.zeros(()))

    @property
    def learned(self) -> bool:
        return self.kind == "gaussian" and self.fixed_scale is None

    def scale(self) -> torch.Tensor | float:
        """The Gaussian's sigma: the fixed value, or the learned one (a 0-dim tensor)."""
        return self.log_scale.exp() if self.learned else self.fixed_scale

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        if self.kind == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, self.scale()).to_event(1)

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f", obs_scale={self.fixed_scale}" if self.fixed_scale is not None else "")
