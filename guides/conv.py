"""Amortized mean-field Gaussian guide with a convolutional encoder, for image data."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import mlp, split_loc_scale
from pyro_vae.nets.conv import ConvFeatures, image_layout


@dataclass(frozen=True)
class ConvGuideConfig:
    x_dim: int = 784
    image_shape: tuple[int, ...] | None = None  # (H, W), (C, H, W) or (H, W, C); None: square grayscale
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)  # dense layers between the convolutions and (mu, sigma)
    channels: tuple[int, ...] = (32, 64)  # per stride-2 conv layer, from the image inwards
    activation: str = "tanh"             # of the dense layers, as in the MLP guides
    conv_activation: str = "relu"        # of the convolutions
    site: str = "z"


class ConvGuide(PyroModule):
    """q(z|x) = Normal(mu(x), diag sigma(x)^2), the encoder stride-2 convolutions then dense layers
    (Kingma & Welling 2014 with a DCGAN-style encoder, Radford et al. 2016).

    Latent sites: ``site`` (default ``z``): (B, latent_dim), event dim 1, reparameterized.

    Requires image data shaped as ``image_shape`` ((H, W), (C, H, W) or (H, W, C), C in 1, 3, 4),
    arriving flat (B, x_dim). Pairs with any model whose latent is ``z`` of that size.
    """

    Config = ConvGuideConfig

    def __init__(self, config: ConvGuideConfig = ConvGuideConfig()):
        super().__init__(name="guide")
        self.config = config
        features = ConvFeatures(image_layout(config.image_shape, config.x_dim), config.channels,
                                config.conv_activation)
        self.encoder = nn.Sequential(features, mlp([features.out_dim, *config.hidden, 2 * config.latent_dim],
                                                   config.activation))

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        loc, scale = split_loc_scale(self.encoder(x))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample(self.config.site, dist.Normal(loc, scale).to_event(1))
