"""A Bernoulli guide with straight-through relaxed (binary Concrete) gradients: biased, but reparameterized."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from .bernoulli import BernoulliGuide, BernoulliGuideConfig


class StraightThroughBernoulli(dist.Bernoulli):
    """Bernoulli(sigmoid(logits)) whose ``rsample`` is an exact Bernoulli draw with a relaxed gradient.

    A binary Concrete / Gumbel-softmax draw s = sigmoid((logits + L) / temperature), L ~ Logistic(0, 1)
    (Maddison et al. 2017; Jang et al. 2017), is rounded: h = [s > 1/2] = [logits + L > 0], which is
    exactly Bernoulli(sigmoid(logits)) whatever the temperature. The returned value is h + (s - s.detach()),
    equal to h, with the gradient of s ("straight-through", Bengio et al. 2013). ``log_prob`` is the
    Bernoulli one, so densities, bounds and importance weights are exact; only the gradient is biased.
    """

    has_rsample = True

    def __init__(self, logits, temperature: float, validate_args=None):
        super().__init__(logits=logits, validate_args=validate_args)
        self.temperature = temperature

    def expand(self, batch_shape, _instance=None):
        return StraightThroughBernoulli(self.logits.expand(batch_shape), self.temperature)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device).clamp(1e-7, 1 - 1e-7)
        noisy = self.logits.expand(shape) + u.log() - (-u).log1p()  # logits + Logistic(0, 1) noise
        soft = torch.sigmoid(noisy / self.temperature)
        hard = (noisy > 0).to(soft.dtype)
        return hard + (soft - soft.detach())


@dataclass(frozen=True)
class RelaxedBernoulliGuideConfig(BernoulliGuideConfig):
    temperature: float = 2 / 3


class RelaxedBernoulliGuide(BernoulliGuide):
    """The ``bernoulli`` guide's q(h|x) (and q(h2|h)), its draws made by ``StraightThroughBernoulli``.

    Latent sites: ``h`` (and ``h2``) as in ``bernoulli``, reparameterized: the path-derivative and
    importance-weighted estimators (elbo, iwae, dreg, stl) accept it. Its values, bounds and IS
    log-likelihoods are exact, since every draw is an exact Bernoulli draw; its gradients are biased
    for those of the bound, the bias shrinking with the temperature while their variance grows.
    A comparison point for the unbiased discrete estimators (tracegraph, vimco, rws).
    """

    Config = RelaxedBernoulliGuideConfig

    def __init__(self, config: RelaxedBernoulliGuideConfig = RelaxedBernoulliGuideConfig()):
        if not config.temperature > 0:
            raise ValueError(f"temperature must be positive, got {config.temperature}")
        super().__init__(config)

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        t = self.config.temperature
        logits = self.encoder(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            h = pyro.sample("h", StraightThroughBernoulli(logits, t).to_event(1), infer=self._infer("h", x))
            if self.config.top_dim:
                pyro.sample("h2", StraightThroughBernoulli(self.top_encoder(h), t).to_event(1),
                            infer=self._infer("h2", x))
