"""Amortized mean-field Bernoulli guide q(h|x) for binary latents (the SBN inference network of NVIL / RWS)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import mlp


@dataclass(frozen=True)
class BernoulliGuideConfig:
    x_dim: int = 784
    latent_dim: int = 200
    hidden: tuple[int, ...] = ()  # () gives logits linear in x, as in Mnih & Gregor (2014)
    activation: str = "tanh"
    top_dim: int = 0  # > 0: also q(h2 | h), for a two-layer sbn
    baseline_hidden: tuple[int, ...] | None = None  # NVIL's learned baseline C(x), e.g. (100,); None: none


class BernoulliGuide(PyroModule):
    """q(h|x) = prod_i Bernoulli(h_i; sigmoid(f(x)_i)), f an MLP (linear when ``hidden = ()``); with
    ``top_dim`` also q(h2|h) = prod_j Bernoulli(sigmoid(g(h)_j)), g linear, for a two-layer sbn.

    Latent sites: ``h``: (B, latent_dim), event dim 1 (and ``h2``: (B, top_dim)); not reparameterizable,
    so only the score-function and wake-phase estimators (tracegraph, vimco, rws, elbo) train it.

    With ``baseline_hidden``, the guide owns one baseline network per site, an MLP x -> one number per
    data point (Mnih & Gregor 2014, section 3.3: the input-dependent baseline C_psi(x)), and marks each
    site with Pyro's ``infer={"baseline": {"nn_baseline": net, "nn_baseline_input": x,
    "use_decaying_avg_baseline": True}}``. ``tracegraph`` subtracts C_psi(x) plus a decaying average
    from each site's learning signal and trains psi by least squares on that signal; because the
    networks are submodules of the guide, SVI's parameter capture steps them with the guide's own
    parameters, checkpoints hold them, and the replayed training path records them. Other estimators
    ignore the baselines.
    """

    Config = BernoulliGuideConfig

    def __init__(self, config: BernoulliGuideConfig = BernoulliGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        self.encoder = mlp([config.x_dim, *config.hidden, config.latent_dim], config.activation)
        if config.top_dim:
            self.top_encoder = nn.Linear(config.latent_dim, config.top_dim)
        if config.baseline_hidden is not None:
            def baseline() -> nn.Module:  # (B, x_dim) -> (B,)
                return nn.Sequential(mlp([config.x_dim, *config.baseline_hidden, 1], config.activation), nn.Flatten(-2))
            self.baseline_h = baseline()
            if config.top_dim:
                self.baseline_h2 = baseline()

    def _infer(self, name: str, x: torch.Tensor) -> dict:
        if self.config.baseline_hidden is None:
            return {}
        return {"baseline": {"nn_baseline": getattr(self, f"baseline_{name}"), "nn_baseline_input": x,
                             "use_decaying_avg_baseline": True}}

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        logits = self.encoder(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            h = pyro.sample("h", dist.Bernoulli(logits=logits).to_event(1), infer=self._infer("h", x))
            if self.config.top_dim:
                pyro.sample("h2", dist.Bernoulli(logits=self.top_encoder(h)).to_event(1), infer=self._infer("h2", x))
