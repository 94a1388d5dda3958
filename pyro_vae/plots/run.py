"""Pictures of a run. Every function takes a model/guide pair through its traces, never its class."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib
import pyro
import pyro.poutine as poutine
import torch
from matplotlib.figure import Figure  # no pyplot: writing files never changes the user's backend
from torchvision.utils import make_grid

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.programs.labels import eval_kwargs, sample_kwargs
from pyro_vae.programs.sites import _trace, latent_sites, latent_summary, mean_or_sample, observed_sites
from pyro_vae.training.rng import seeded


@torch.no_grad()
def posterior_means(guide, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """E_q[z | x] per latent site of the guide (a draw where the guide has no closed-form mean, the mode of a
    discrete site)."""
    tr = _trace(guide, x, **kwargs)
    return {n: latent_summary(tr.nodes[n]["fn"], tr.nodes[n]["value"]) for n in latent_sites(tr)}


@torch.no_grad()
def decode(model, latents: dict[str, torch.Tensor], n: int, observed: list[str], **kwargs) -> torch.Tensor:
    """The mean of the model's (first) observed site given values for its latents; prior draws for the rest.

    ``kwargs`` go to the model (e.g. ``y`` for a label-conditioned model)."""
    tr = _trace(poutine.condition(model, data=latents), None, batch_size=n, **kwargs)
    site = tr.nodes[observed[0]]
    return mean_or_sample(site["fn"], site["value"])


def _observed(model, x: torch.Tensor, **kwargs) -> list[str]:
    return observed_sites(_trace(model, x, **kwargs))


def is_image(shape: tuple[int, ...]) -> bool:
    """(H, W), (C, H, W) or (H, W, C) with C in 1, 3, 4: data the image grids can show."""
    return len(shape) == 2 or (len(shape) == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4)))


def _images(flat: torch.Tensor, image_shape: tuple[int, ...]) -> torch.Tensor:
    imgs = flat.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape)
    if imgs.dim() == 3:
        return imgs.unsqueeze(1)
    return imgs if image_shape[0] in (1, 3, 4) else imgs.permute(0, 3, 1, 2)  # channels last -> first


def _save_grid(imgs: torch.Tensor, nrow: int, title: str, path: Path) -> Path:
    grid = make_grid(imgs, nrow=nrow, padding=2, pad_value=1.0)
    fig = Figure(figsize=(nrow * 0.6 + 0.5, grid.shape[1] / grid.shape[2] * nrow * 0.6 + 0.8))
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def learning_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [r["epoch"] for r in rows]
    marker = {"marker": "o", "markersize": 3} if len(rows) <= 40 else {}
    series = [("train (running, dynamic binarization)", [r["train_elbo"] for r in rows])]
    if rows and "test_elbo" in rows[0]:
        series.append(("test", [r["test_elbo"] for r in rows]))
    for label, values in series:
        ax.plot(epochs, values, label=label, **marker)
    later = [v for _, values in series for v in values[max(1, len(values) // 20):]]
    if len(rows) > 3 and later:
        # the first epochs sit far below the rest; leaving them off the axis shows the part that matters
        lo, hi = min(later), max(later)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound (nats per image, higher is better)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def reconstructions(model, guide, data: ArrayDataset, path: Path, n: int = 16, device="cpu") -> Path:
    x, y = next(data.batches(n, shuffle=False, generator=torch.Generator().manual_seed(0), device=device))
    kw = eval_kwargs(model, y)
    recon = decode(model, posterior_means(guide, x, **kw), x.shape[0], _observed(model, x, **kw), **kw)
    imgs = torch.cat([_images(x, data.image_shape), _images(recon, data.image_shape)])
    return _save_grid(imgs, x.shape[0], "Inputs (top) and reconstructions from E_q[z|x] (bottom)", path)


def prior_samples(model, data: ArrayDataset, path: Path, n: int = 64, seed: int = 0, device="cpu",
                  label: int | None = None) -> Path:
    """Decoder means of n prior draws; for a label-conditioned model, of class ``label`` or of each class in turn."""
    x, y = next(data.batches(2, shuffle=False, generator=torch.Generator(), device=device))
    observed = _observed(model, x, **eval_kwargs(model, y))
    kw = sample_kwargs(model, n, label, device)
    with pyro.get_param_store().scope(), seeded(seed, device):  # the caller's streams are left as they were
        means = decode(model, {}, n, observed, **kw)
    if "y" in kw:
        title = f"Decoder means of {n} draws z ~ p(z), " + (f"label {label}" if label is not None
                                                          else "labels 0, 1, ... in turn along rows")
        nrow = 8 if label is not None else int(kw["y"].max()) + 1
    else:
        title, nrow = f"Decoder means of {n} draws z ~ p(z)", 8
    return _save_grid(_images(means, data.image_shape), nrow, title, path)


@torch.no_grad()
def latent_scatter(guide, data: ArrayDataset, path: Path, n: int = 5000, device="cpu", model=None) -> Path:
    """Test latents' posterior means in 2-D (PCA when there are more than 2 dims), coloured by label.

    Pass the ``model`` when it takes labels, so a label-conditioned guide gets them too."""
    gen = torch.Generator().manual_seed(0)
    zs, ys = [], []
    for x, y in data.head(min(n, len(data))).batches(500, shuffle=False, generator=gen, device=device):
        means = posterior_means(guide, x, **eval_kwargs(model, y))
        # continuous latents only: a discrete site's class index is not a coordinate
        zs.append(torch.cat([v.reshape(v.shape[0], -1) for v in means.values() if v.is_floating_point()], -1).cpu())
        # labels come back to the CPU with the latents: a CPU tensor cannot be indexed by a CUDA mask
        ys.append(y.cpu() if y is not None else torch.zeros(x.shape[0], dtype=torch.long))
    z, y = torch.cat(zs).double(), torch.cat(ys)
    if z.shape[1] > 2:
        zc = z - z.mean(0)
        _, s, v = torch.linalg.svd(zc, full_matrices=False)
        z2 = zc @ v[:2].T
        share = (s[:2] ** 2).sum() / (s ** 2).sum()
        xlabel, ylabel = "PC 1", "PC 2"
        title = f"Test posterior means, PCA of {z.shape[1]} dims ({100 * share:.0f}% of variance)"
    else:
        z2 = z if z.shape[1] == 2 else torch.cat([z, torch.zeros_like(z)], 1)
        xlabel, ylabel, title = "z1", "z2", "Test posterior means"
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    classes = sorted(set(y.tolist()))
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, c in enumerate(classes):
            pick = y == c
            ax.scatter(z2[pick, 0], z2[pick, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=str(c))
    if data.labels is not None and len(classes) <= 20:
        ax.legend(title="label", markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
