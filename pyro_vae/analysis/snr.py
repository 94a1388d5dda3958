"""Gradient signal-to-noise ratio of an estimator (Rainforth et al. 2018)."""
from __future__ import annotations

from collections.abc import Callable

import pyro
import torch


def gradient_samples(model, guide, estimator: Callable, x: torch.Tensor, repeats: int,
                     *args, **kwargs) -> dict[str, torch.Tensor]:
    """``repeats`` independent gradient draws of ``estimator``'s loss on the fixed batch ``x``.

    Returns {"encoder": (R, P_guide), "decoder": (R, P_model)}: the guide's and the model's
    parameter gradients, flattened. Parameters the loss does not reach count as zero.
    """
    groups = {"encoder": [p for p in guide.parameters() if p.requires_grad],
              "decoder": [p for p in model.parameters() if p.requires_grad]}
    flat = [p for ps in groups.values() for p in ps]
    draws: list[torch.Tensor] = []
    with pyro.get_param_store().scope():
        for _ in range(repeats):
            loss = estimator(model, guide, x, *args, **kwargs)
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
            draws.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                    for p, g in zip(flat, grads)]).detach())
    g = torch.stack(draws)
    n_enc = sum(p.numel() for p in groups["encoder"])
    return {"encoder": g[:, :n_enc], "decoder": g[:, n_enc:]}


def snr(samples: torch.Tensor) -> torch.Tensor:
    """Per-parameter |E g| / std g over the repeats (dim 0); parameters with zero spread are left out."""
    mean, std = samples.mean(0), samples.std(0)
    keep = std > 0
    return mean[keep].abs() / std[keep]


def gradient_snr(model, guide, estimator: Callable, x: torch.Tensor, repeats: int = 100,
                 *args, **kwargs) -> dict[str, float]:
    """Mean per-parameter gradient SNR of the encoder (guide) and the decoder (model) under ``estimator``.

    Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018: with the
    IWAE gradient the encoder's SNR falls like 1/sqrt(K); with DReG it does not.
    """
    if repeats < 2:
        raise ValueError("repeats must be at least 2 to measure a spread")
    samples = gradient_samples(model, guide, estimator, x, repeats, *args, **kwargs)
    return {name: float(snr(g).mean()) if g.numel() else float("nan") for name, g in samples.items()}
