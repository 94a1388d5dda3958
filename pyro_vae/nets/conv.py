"""Convolutional networks over flat image vectors, shared by the conv model and the conv guide.

Data reach every component flat, (..., D). These networks reshape them to (N, C, H, W) for the
convolutions, whatever the stored layout ((H, W), (C, H, W) or channels-last (H, W, C)), and return
flat vectors in the same layout, with the caller's leading dims (particles, batch) restored.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pyro_vae.errors import UserError

from .mlp import ACTIVATIONS

# Kernel 4, stride 2, padding 1 halves an even side exactly (DCGAN, Radford et al. 2016); odd sides are
# floored on the way down and restored by output_padding on the way up.
_KERNEL, _STRIDE, _PADDING = 4, 2, 1


@dataclass(frozen=True)
class ImageLayout:
    """How a flat vector of ``channels * height * width`` values is an image."""

    channels: int
    height: int
    width: int
    channels_last: bool

    @property
    def dim(self) -> int:
        return self.channels * self.height * self.width

    def to_images(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C, H, W)."""
        if self.channels_last:
            return flat.reshape(-1, self.height, self.width, self.channels).permute(0, 3, 1, 2)
        return flat.reshape(-1, self.channels, self.height, self.width)

    def to_flat(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D), in the data's own layout."""
        if self.channels_last:
            images = images.permute(0, 2, 3, 1)
        return images.reshape(images.shape[0], self.dim)


def image_layout(image_shape: Sequence[int] | None, x_dim: int) -> ImageLayout:
    """The layout of ``image_shape`` ((H, W), (C, H, W) or (H, W, C), C in 1, 3, 4).

    With no shape, a square grayscale image of ``x_dim`` pixels is assumed (library use with bare
    tensors); a declared shape is never guessed around.
    """
    if image_shape is None:
        side = math.isqrt(int(x_dim))
        if side * side != x_dim:
            raise ValueError(f"x_dim={x_dim} is not a square image; give image_shape (H, W), (C, H, W) or (H, W, C)")
        image_shape = (side, side)
    shape = tuple(int(s) for s in image_shape)
    if math.prod(shape) != x_dim:
        raise ValueError(f"image_shape {shape} holds {math.prod(shape)} values, but x_dim is {x_dim}")
    if len(shape) == 2:
        return ImageLayout(1, shape[0], shape[1], channels_last=False)
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return ImageLayout(*shape, channels_last=False)
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return ImageLayout(shape[2], shape[0], shape[1], channels_last=True)
    raise ValueError(f"convolutional networks need images shaped (H, W), (C, H, W) or (H, W, C) with C in "
                     f"1, 3, 4; the data are shaped {shape} (save them as images, e.g. (N, 28, 28))")


def activation_layer(name: str) -> nn.Module:
    """A fresh activation module by name, as nets.mlp uses between its layers."""
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


def feature_sizes(layout: ImageLayout, channels: Sequence[int]) -> list[tuple[int, int]]:
    """(H, W) of the input and after each stride-2 convolution."""
    if not channels or any(int(c) <= 0 for c in channels):
        raise ValueError(f"channels must be one or more positive integers, got {list(channels)}")
    sizes = [(layout.height, layout.width)]
    for _ in channels:
        h, w = sizes[-1]
        if min(h, w) < 2:
            raise ValueError(f"{len(channels)} stride-2 conv layers shrink a {layout.height}x{layout.width} "
                             "image below 1 pixel; use fewer channels entries")
        sizes.append((h // 2, w // 2))
    return sizes


class ConvFeatures(nn.Module):
    """Flat images (..., D) -> features (..., channels[-1] * h * w) from stride-2 convolutions."""

    def __init__(self, layout: ImageLayout, channels: Sequence[int], activation: str):
        super().__init__()
        self.layout = layout
        sizes = feature_sizes(layout, channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([layout.channels, *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, int(c_out), _KERNEL, _STRIDE, _PADDING), activation_layer(activation)]
        self.net = nn.Sequential(*layers)
        self.out_dim = int(channels[-1]) * sizes[-1][0] * sizes[-1][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.net(self.layout.to_images(x.reshape(-1, x.shape[-1])))
        return h.reshape(*lead, self.out_dim)


class DeconvImage(nn.Module):
    """Features (..., channels[-1] * h * w) -> flat images (..., D): ConvFeatures' mirror image.

    Transposed convolutions run back through the encoder's channel list; the last one outputs the
    image channels with no activation (logits or means, as the likelihood needs)."""

    def __init__(self, layout: ImageLayout, channels: Sequence[int], activation: str):
        super().__init__()
        self.layout = layout
        self.sizes = feature_sizes(layout, channels)
        self.in_shape = (int(channels[-1]), *self.sizes[-1])
        self.in_dim = math.prod(self.in_shape)
        c_outs = [*reversed(channels[:-1]), layout.channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(reversed(channels), c_outs)):
            (h_in, w_in), (h_out, w_out) = self.sizes[-1 - i], self.sizes[-2 - i]
            pad = (h_out - _STRIDE * h_in, w_out - _STRIDE * w_in)  # 1 where the encoder floored an odd side
            layers.append(nn.ConvTranspose2d(int(c_in), int(c_out), _KERNEL, _STRIDE, _PADDING, output_padding=pad))
            if i < len(channels) - 1:
                layers.append(activation_layer(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        images = self.net(h.reshape(-1, *self.in_shape))
        return self.layout.to_flat(images).reshape(*lead, self.layout.dim)
