"""Amortized inverse autoregressive flow guide (Kingma et al. 2016)."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN, PyroModule
from torch import nn

from pyro_vae.nets import ACTIVATIONS, mlp, split_loc_scale


@dataclass(frozen=True)
class IAFGuideConfig:
    x_dim: int = 784
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    num_flows: int = 2
    flow_hidden: tuple[int, ...] | None = None  # MADE hidden sizes; None: one layer of 4 * latent_dim
    context_dim: int = 50                       # size of the data summary h(x) each step is conditioned on
    site: str = "z"

    def __post_init__(self) -> None:
        if int(self.num_flows) < 0:
            raise ValueError(f"num_flows must be >= 0, got {self.num_flows}")
        if int(self.context_dim) <= 0:
            raise ValueError(f"context_dim must be positive, got {self.context_dim}")


def iaf_steps(latent_dim: int, context_dim: int, num_flows: int, flow_hidden: tuple[int, ...] | None = None,
              activation: str = "tanh") -> nn.ModuleList:
    """``num_flows`` IAF steps on vectors of ``latent_dim``, each conditioned on a context of ``context_dim``.

    Each step is Pyro's ``ConditionalAffineAutoregressive`` in its stable form (Kingma et al. 2016, eq.
    13-14) over a MADE with ``flow_hidden`` hidden sizes (None: one layer of 4 * latent_dim)."""
    hidden = list(flow_hidden) if flow_hidden else [4 * latent_dim]
    # skip connections give each step an exactly linear path, so an affine (Gaussian) posterior
    # with a full covariance is reachable, not only approximated by the hidden units
    return nn.ModuleList(
        ConditionalAffineAutoregressive(
            ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden, skip_connections=True,
                                        nonlinearity=ACTIVATIONS[activation]()),
            stable=True)
        for _ in range(num_flows))


def iaf_transforms(flows: nn.ModuleList, context: torch.Tensor, reverse: torch.Tensor) -> list:
    """The steps conditioned on ``context``, with the order of z reversed (``reverse``) between steps, so
    every coordinate can depend on every other."""
    transforms = []
    for i, flow in enumerate(flows):
        if i > 0:
            transforms.append(Permute(reverse))
        transforms.append(flow.condition(context))
    return transforms


class IAFGuide(PyroModule):
    """q(z|x): a diagonal Normal(mu(x), sigma(x)) pushed through ``num_flows`` IAF steps conditioned on h(x).

    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved Variational Inference with Inverse
    Autoregressive Flow", NeurIPS 2016. One encoder MLP gives (mu, sigma, h). Step t maps
    z -> sigma_t * z + (1 - sigma_t) * m_t with [m_t, logit sigma_t] = MADE_t(z, h) autoregressive in z
    (the paper's numerically stable form, eq. 13-14); the order of z is reversed between steps, so
    every coordinate can depend on every other. Sampling is one pass per step, and the density of a
    draw, log q(z|x) = log N(z_0; mu, sigma) - sum_t sum_i log sigma_t,i, comes from the values cached
    while sampling; scoring a z that was not drawn here inverts each step, one coordinate at a time.

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1, reparameterized, in
    ``pyro.plate("data")`` at dim -1; K particles at dim -2 give draws of shape (K, B, latent_dim).
    All flow weights are submodules, so they train and are saved with ``state_dict()``.
    ``num_flows=0`` is the diagonal-normal guide with an unused context output.
    """

    Config = IAFGuideConfig

    def __init__(self, config: IAFGuideConfig = IAFGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        d, c = int(config.latent_dim), int(config.context_dim)
        self.encoder = mlp([config.x_dim, *config.hidden, 2 * d + c], config.activation)
        self.flows = iaf_steps(d, c, int(config.num_flows), config.flow_hidden, config.activation)
        self.register_buffer("reverse", torch.arange(d - 1, -1, -1), persistent=False)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) with batch shape (B,) and event shape (latent_dim,)."""
        d = int(self.config.latent_dim)
        out = self.encoder(x)
        loc, scale = split_loc_scale(out[..., :2 * d])
        h = out[..., 2 * d:]
        transforms = iaf_transforms(self.flows, h, self.reverse)
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, transforms) if transforms else base

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample(self.config.site, self.distribution(x))
