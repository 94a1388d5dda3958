"""A convolutional VAE for images: a dense-then-deconvolutional decoder with a Bernoulli or Gaussian likelihood."""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import mlp
from pyro_vae.nets.conv import DeconvImage, activation_layer, image_layout

from .likelihoods import ObservationLikelihood


@dataclass(frozen=True)
class ConvVAEConfig:
    x_dim: int = 784
    image_shape: tuple[int, ...] | None = None  # (H, W), (C, H, W) or (H, W, C); None: square grayscale
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)  # dense layers between z and the deconvolutions
    channels: tuple[int, ...] = (32, 64)  # per stride-2 layer, image side first (the encoder's order)
    activation: str = "tanh"             # of the dense layers, as in the MLP models
    conv_activation: str = "relu"        # of the convolutions: with tanh there MNIST training stalled
    likelihood: str = "bernoulli"        # or "gaussian", for continuous data (binarize="none")
    obs_scale: float | None = None       # Gaussian sigma; None learns one sigma shared by all pixels


class ConvVAE(PyroModule):
    """z ~ Normal(0, I), x | z ~ p(x | decoder(z)), the decoder a DCGAN-style stack of transposed
    convolutions (Radford et al. 2016) behind dense layers; Kingma & Welling (2014) otherwise.

    Latent sites:   ``z``: (B, latent_dim), event dim 1.
    Observed site:  ``x``: (B, x_dim) flat images in the data's layout, event dim 1; in {0, 1} for the
                    Bernoulli likelihood, real for the Gaussian (see models/likelihoods.py for the
                    "MSE view": with fixed sigma, -ELBO = ||x - mu||^2 / (2 sigma^2) + KL + const).
    Plates:         ``data`` of size B at dim -1. The decoder takes z of any leading shape, so
                    particles vectorized at dim -2 ((K, B, latent_dim)) work with every estimator.

    Requires image data: ``image_shape`` (H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4, each side
    at least ``2 ** len(channels)``. Pairs with the ``conv`` guide, or with any guide sampling ``z``.

    Call as ``model(x)`` to score data, or ``model(None, batch_size=n)`` to sample from the prior.
    """

    Config = ConvVAEConfig
    observed_site = "x"

    def __init__(self, config: ConvVAEConfig = ConvVAEConfig()):
        super().__init__(name="model")
        self.config = config
        self.latent_dim = config.latent_dim
        self.x_dim = config.x_dim
        layout = image_layout(config.image_shape, config.x_dim)
        deconv = DeconvImage(layout, config.channels, config.conv_activation)
        self.decoder = nn.Sequential(mlp([config.latent_dim, *config.hidden, deconv.in_dim], config.activation),
                                     activation_layer(config.conv_activation), deconv)
        self.likelihood = ObservationLikelihood(config.likelihood, config.obs_scale)

    def forward(self, x: torch.Tensor | None = None, *, batch_size: int | None = None) -> None:
        n = x.shape[0] if x is not None else batch_size
        w = self.decoder[0][0].weight
        zeros = torch.zeros(self.latent_dim, device=w.device, dtype=w.dtype)
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
