"""Sigmoid belief networks (Neal 1992): binary latents, the benchmark model of NVIL, VIMCO and RWS."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.errors import UserError

MAX_ENUMERATED = 20  # latent bits enumerated by exact_log_likelihood: 2^20 configurations per point at most


@dataclass(frozen=True)
class SigmoidBeliefNetConfig:
    x_dim: int = 784
    latent_dim: int = 200
    top_dim: int = 0  # > 0: a second layer h2 of that many units above h


class SigmoidBeliefNet(PyroModule):
    """A sigmoid belief net with one or two layers of binary latents.

    One layer (``top_dim = 0``): h ~ Bernoulli(sigmoid(b)), x | h ~ Bernoulli(logits = W h + c), the
    "SBN 200" of Mnih & Gregor (2014) at ``latent_dim = 200``. Two layers: h2 ~ Bernoulli(sigmoid(b2)),
    h | h2 ~ Bernoulli(logits = W2 h2 + c2), and x | h as before ("SBN 200-200").

    Latent sites:   ``h``: (B, latent_dim), event dim 1, values in {0, 1}; with two layers also
                    ``h2``: (B, top_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim) with values in {0, 1}, event dim 1.
    Plates:         ``data`` of size B at dim -1, so particles can vectorize at dim -2.

    No latent is reparameterizable: train it with ``tracegraph``, ``vimco``, ``rws`` or ``elbo`` (a plain
    score function). ``exact_log_likelihood`` sums p(x, h) over every configuration for small nets.
    """

    Config = SigmoidBeliefNetConfig
    observed_site = "x"

    def __init__(self, config: SigmoidBeliefNetConfig = SigmoidBeliefNetConfig()):
        super().__init__(name="model")
        if config.latent_dim <= 0 or config.x_dim <= 0 or config.top_dim < 0:
            raise ValueError(f"sizes must be positive (top_dim >= 0), got {config}")
        self.config = config
        self.latent_dim, self.x_dim = config.latent_dim, config.x_dim
        self.decoder = nn.Linear(config.latent_dim, config.x_dim)
        if config.top_dim:
            self.top_logits = nn.Parameter(torch.zeros(config.top_dim))
            self.hidden = nn.Linear(config.top_dim, config.latent_dim)
        else:
            self.prior_logits = nn.Parameter(torch.zeros(config.latent_dim))

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            if self.config.top_dim:
                h2 = pyro.sample("h2", dist.Bernoulli(logits=self.top_logits.expand(n, -1)).to_event(1))
                logits = self.hidden(h2)
            else:
                logits = self.prior_logits.expand(n, -1)
            h = pyro.sample("h", dist.Bernoulli(logits=logits).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(h)).to_event(1), obs=x)

    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per point, shape (B,), by summing p(x, h) over all 2^(latent bits) configurations.

        Differentiable in the model's parameters. Refused above ``MAX_ENUMERATED`` latent bits."""
        return torch.logsumexp(self.log_joint_table(x)[0], 0)

    def log_joint_table(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(log p(x, h) for every latent configuration, shape (M, B); the configurations, {site: (M, 1, d)})."""
        sizes = {"h": self.latent_dim, **({"h2": self.config.top_dim} if self.config.top_dim else {})}
        bits = sum(sizes.values())
        if bits > MAX_ENUMERATED:
            raise UserError(f"exact_log_likelihood enumerates 2^{bits} configurations; at most "
                            f"{MAX_ENUMERATED} latent bits are allowed")
        device, dtype = self.decoder.weight.device, self.decoder.weight.dtype
        table = torch.tensor(list(itertools.product((0.0, 1.0), repeat=bits)), device=device, dtype=dtype)
        values, start = {}, 0
        for name, d in sizes.items():
            values[name] = table[:, start:start + d].unsqueeze(1)  # (M, 1, d): broadcast over the data plate
            start += d
        with pyro.plate("_configurations", table.shape[0], dim=-2):
            tr = poutine.trace(poutine.condition(self, data=values)).get_trace(x)
        log_joint = sum(site["fn"].log_prob(site["value"]) for site in tr.nodes.values() if site["type"] == "sample")
        return log_joint, values
