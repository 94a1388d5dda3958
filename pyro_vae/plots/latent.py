"""Pictures of a guide's posterior and of the latent space: k-hat per point, marginals against the prior,
interpolations, traversals, KL per unit and the local fits of the inference gaps.

Like plots.py, every function reads latent site names from traces and never asks which model it holds.
Latent units are named ``site[i]``, i indexing the site's value flattened per data point.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: writing files never changes the user's backend
from torchvision.utils import make_grid

from pyro_vae.analysis.gaps import InferenceGaps
from pyro_vae.analysis.importance import KHAT_BAD, KHAT_GOOD, ImportanceDiagnostics
from pyro_vae.analysis.latent_stats import LatentHealth, per_point, posterior_means, real_sites, unflatten
from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.plots import run as plots
from pyro_vae.programs.labels import eval_kwargs, label_use, sample_kwargs
from pyro_vae.programs.sites import _trace, latent_sites, observed_sites
from pyro_vae.training.rng import program_device, seeded

Unit = tuple[str, int]  # (site, index in the site's flattened value)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _label_kwargs(model, n: int, label, device) -> dict:
    """Labels for decoding n points of class ``label`` where the model takes labels, none otherwise."""
    if label_use(model) is None or label is None:
        return {}
    return sample_kwargs(model, n, label=int(label), device=device)


def _data_site(model, x: torch.Tensor, **kwargs) -> str:
    """The model's observed site that holds x (not a label site)."""
    tr = _trace(model, x, **kwargs)
    names = observed_sites(tr)
    return next((n for n in names if tr.nodes[n]["value"] is x), names[0])


def khat_plot(diag: ImportanceDiagnostics, path: Path) -> Path:
    """k-hat of every point with the 0.5 and 0.7 thresholds of Yao et al. (2018)."""
    k = diag.khat
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    idx = np.arange(len(k))
    finite = np.isfinite(k)
    colors = np.where(k > KHAT_BAD, "C3", np.where(k > KHAT_GOOD, "C1", "C0"))
    ax.scatter(idx[finite], k[finite], c=colors[finite], s=14)
    ax.axhline(KHAT_GOOD, color="C1", ls="--", lw=1, label=f"{KHAT_GOOD}: IS works, slowly above")
    ax.axhline(KHAT_BAD, color="C3", ls="--", lw=1, label=f"{KHAT_BAD}: unreliable above")
    note = f"; {int((~finite).sum())} points with constant weights (q = p(z|x)) not shown" if (~finite).any() else ""
    ax.set_title(f"PSIS k-hat of q(z|x) per point (S={diag.num_samples}): mean "
                 f"{np.mean(k[finite]) if finite.any() else float('nan'):.2f}, "
                 f"{100 * np.mean(k > KHAT_BAD):.0f}% above {KHAT_BAD}{note}", fontsize=9)
    ax.set_xlabel("point")
    ax.set_ylabel("Pareto k-hat")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


@torch.no_grad()
def prior_draws(model, n: int = 5000, seed: int = 0) -> dict[str, np.ndarray]:
    """n draws z ~ p(z) per latent site, flattened per point: (n, F)."""
    with seeded(seed, program_device(model)):
        tr = _trace(model, None, batch_size=n, **sample_kwargs(model, n))
    return {s: per_point(tr.nodes[s]["value"], tr.nodes[s]["fn"].event_dim).double().cpu().numpy()
            for s in latent_sites(tr)}


def marginals_plot(diag: ImportanceDiagnostics, prior: dict[str, np.ndarray], units: list[Unit], path: Path,
                   point: int = 0, gaps: InferenceGaps | None = None) -> Path:
    """One point's marginals along a few units: q(z|x), q reweighted by its PSIS weights (~ p(z|x)), the
    prior, and the local fit q* of the inference gaps where given."""
    weights = diag.smoothed_weights()[point]
    fig = Figure(figsize=(3.2 * len(units), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(units)))
    for ax, (site, i) in zip(axes, units):
        z = diag.latents[site][point, :, i]
        p = prior[site][:, i]
        lo, hi = min(np.percentile(p, 0.5), z.min()), max(np.percentile(p, 99.5), z.max())
        bins = np.linspace(lo, hi, 60)
        ax.hist(p, bins=bins, density=True, histtype="stepfilled", color="0.85", label="prior p(z)")
        ax.hist(z, bins=bins, density=True, histtype="step", color="C0", lw=1.5, label="q(z|x)")
        ax.hist(z, bins=bins, weights=weights, density=True, histtype="step", color="C3", lw=1.5,
                label="q reweighted (PSIS) ~ p(z|x)")
        # q* of a constrained site is Gaussian in its unconstrained space, not in z: no such curve for it
        if (gaps is not None and point < len(gaps.points) and site in gaps.local_loc
                and site not in gaps.local_transformed):
            loc = gaps.local_loc[site].reshape(len(gaps.points), -1)[point, i]
            scale = gaps.local_scale[site].reshape(len(gaps.points), -1)[point, i]
            grid = np.linspace(lo, hi, 400)
            ax.plot(grid, np.exp(-0.5 * ((grid - loc) / scale) ** 2) / (scale * np.sqrt(2 * np.pi)), color="C2",
                    lw=1.2, ls="--", label="local q*(z|x)")
        ax.set_title(f"{site}[{i}]", fontsize=9)
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Posterior marginals of point {int(diag.points[point])} (k-hat {diag.khat[point]:.2f})",
                 fontsize=10)
    return _save(fig, path)


def _first_batch(data: ArrayDataset, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return next(data.head(n).batches(n, shuffle=False, generator=torch.Generator().manual_seed(0), device=device))


def _pairs(y: torch.Tensor | None, n: int, count: int) -> list[tuple[int, int]]:
    """Pairs of point indices, of different labels where there are labels."""
    pairs = []
    y = None if y is None else y.tolist()  # one copy, not a device sync per comparison
    for a in range(n):
        for b in range(a + 1, n):
            if len(pairs) < count and all(a not in p and b not in p for p in pairs) and (y is None or y[a] != y[b]):
                pairs.append((a, b))
    return pairs


@torch.no_grad()
def interpolation(model, guide, data: ArrayDataset, path: Path, pairs: int = 4, steps: int = 10,
                  device="cpu") -> Path:
    """Decode along the straight line between two test points' posterior means, E_q[z|x_a] -> E_q[z|x_b];
    each row starts and ends with the two inputs themselves. Only real-valued latents are interpolated; the
    model draws any other (a discrete class) from its prior."""
    x, y = _first_batch(data, min(len(data), 40), device)
    kw = eval_kwargs(model, y)
    real = real_sites(model, x, **kw)
    means = {s: v for s, v in posterior_means(guide, x, **kw).items() if s in real}
    data_site = _data_site(model, x, **kw)
    t = torch.linspace(0, 1, steps, device=x.device, dtype=x.dtype)
    rows = []
    for a, b in _pairs(y, x.shape[0], pairs):
        line = {}
        for site, (m, event_dim) in means.items():
            flat = per_point(m, event_dim)
            path_ab = (1 - t)[:, None] * flat[a] + t[:, None] * flat[b]
            line[site] = unflatten(path_ab, m, event_dim)
        kw = _label_kwargs(model, steps, None if y is None else y[a], x.device)
        decoded = plots.decode(model, line, steps, [data_site], **kw)
        rows.append(torch.cat([x[a:a + 1], decoded.reshape(steps, -1), x[b:b + 1]]))
    imgs = plots._images(torch.cat(rows), data.image_shape)
    return plots._save_grid(imgs, steps + 2, "Interpolation between posterior means (ends: the inputs)", path)


@torch.no_grad()
def traversals(model, guide, data: ArrayDataset, units: list[Unit], path: Path, point: int = 0,
               values: tuple[float, float] = (-3.0, 3.0), steps: int = 9, device="cpu") -> Path:
    """Decode E_q[z|x] of one test point with one unit at a time set to each of ``steps`` values in ``values``:
    one row per unit, which shows what that unit encodes (a flat row: an inactive unit). ``units`` must be
    in real-valued sites; the model draws any latent that is not from its prior."""
    x, y = _first_batch(data, point + 1, device)
    kw = eval_kwargs(model, None if y is None else y[point:point + 1])
    real = real_sites(model, x[point:point + 1], **kw)
    means = {s: v for s, v in posterior_means(guide, x[point:point + 1], **kw).items() if s in real}
    data_site = _data_site(model, x[point:point + 1], **kw)
    grid_values = torch.linspace(values[0], values[1], steps, dtype=x.dtype)
    rows = []
    for site, i in units:
        latents = {}
        for s, (m, event_dim) in means.items():
            flat = per_point(m, event_dim).expand(steps, -1).clone()
            if s == site:
                flat[:, i] = grid_values.to(flat.device)
            latents[s] = unflatten(flat, m, event_dim)
        label = None if y is None else y[point]
        kw = _label_kwargs(model, steps, label, x.device)
        rows.append(plots.decode(model, latents, steps, [data_site], **kw).reshape(steps, -1))
    imgs = plots._images(torch.cat(rows), data.image_shape)
    grid = make_grid(imgs, nrow=steps, padding=2, pad_value=1.0)
    fig = Figure(figsize=(steps * 0.6 + 1.3, len(units) * 0.6 + 0.9))
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    cell_h, cell_w = grid.shape[1] / len(units), grid.shape[2] / steps
    ax.set_yticks([(r + 0.5) * cell_h for r in range(len(units))], [f"{s}[{i}]" for s, i in units], fontsize=8)
    ticks = [0, steps // 2, steps - 1]
    ax.set_xticks([(c + 0.5) * cell_w for c in ticks], [f"{float(grid_values[c]):g}" for c in ticks], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(f"Traversals of point {point}: one unit set to [{values[0]:g}, {values[1]:g}]", fontsize=9)
    return _save(fig, path)


def kl_plot(health: LatentHealth, path: Path) -> Path:
    """KL(q(z_d|x) || p(z_d)) per unit, averaged over x, coloured by activity (Burda et al. 2016)."""
    rows = health.rows()
    fig = Figure(figsize=(max(5.0, 0.14 * len(rows) + 1.5), 3.6))
    ax = fig.subplots()
    kl = np.array([r["kl"] for r in rows])
    active = np.array([r["active"] for r in rows])
    idx = np.arange(len(rows))
    ax.bar(idx[active], kl[active], color="C0", label="active")
    ax.bar(idx[~active], kl[~active], color="C7", label="inactive")
    ax.set_xlabel("latent unit (" + ", ".join(dict.fromkeys(r["site"] for r in rows)) + ")")
    ax.set_ylabel("KL to the prior (nats)")
    ax.set_title(f"KL per latent unit: {health.active} of {health.total} units active "
                 f"(Cov_x E_q[z_d|x] > {health.threshold} Var_p(z_d))", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def gaps_plot(gaps: InferenceGaps, path: Path) -> Path:
    """The local fits' ELBO during optimization against L[q] and log p(x), and each point's two gaps."""
    s = gaps.summary()
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    if len(gaps.history):
        ax1.plot(np.arange(1, len(gaps.history) + 1), gaps.history, color="C2", lw=1, label="L[q*] during fit")
    ax1.axhline(s["elbo_amortized"], color="C0", ls="--", label=f"L[q] = {s['elbo_amortized']:.2f}")
    ax1.axhline(s["elbo_local"], color="C2", ls=":", label=f"L[q*] = {s['elbo_local']:.2f}")
    ax1.axhline(s["log_likelihood"], color="C3", ls="--", label=f"log p(x) = {s['log_likelihood']:.2f}")
    span = s["log_likelihood"] - s["elbo_amortized"]
    ax1.set_ylim(s["elbo_amortized"] - max(1.0, span), s["log_likelihood"] + 0.3 * max(1.0, span))
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("nats per point (mean)")
    ax1.set_title(f"Local Gaussian fits q*(z|x), {s['num_points']} points", fontsize=9)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.scatter(gaps.amortization_gap, gaps.approximation_gap, s=12, color="C4")
    ax2.axvline(0, color="0.5", lw=0.8)
    ax2.axhline(0, color="0.5", lw=0.8)
    ax2.set_xlabel("amortization gap L[q*] - L[q] (nats)")
    ax2.set_ylabel("approximation gap log p(x) - L[q*]")
    ax2.set_title(f"Per point: mean amortization {s['amortization_gap']:.2f}, approximation "
                  f"{s['approximation_gap']:.2f}", fontsize=9)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def top_units(health: LatentHealth, n: int, sites: list[str] | None = None) -> list[Unit]:
    """The n units of largest KL (the most informative ones first; NaN KLs last), of ``sites`` only if given."""
    rows = [r for r in health.rows() if sites is None or r["site"] in sites]
    rows = sorted(rows, key=lambda r: -r["kl"] if np.isfinite(r["kl"]) else np.inf)
    return [(r["site"], r["unit"]) for r in rows[:n]]
