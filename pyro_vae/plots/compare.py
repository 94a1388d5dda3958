"""Plots of a comparison: test NLL with intervals, paired differences, bounds against training time, SNR against K."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: writing files never changes the user's backend


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _yerr(interval) -> tuple[float, float]:
    if not math.isfinite(interval.low):
        return 0.0, 0.0  # one value: no spread to show
    return interval.mean - interval.low, interval.high - interval.mean


def plot_nll(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    x = np.arange(len(rows))
    for i, r in enumerate(rows):
        lo, hi = _yerr(r["_interval"])
        ax.errorbar([i], [r["nll"]], yerr=[[lo], [hi]], fmt="o", color="tab:blue", capsize=5, ms=7,
                    label="mean, 95% interval" if i == 0 else None)
        seeds = r["_per_seed"]
        if len(seeds) > 1:
            jitter = np.linspace(-0.12, 0.12, len(seeds))
            ax.plot(i + 0.25 + jitter, seeds, ".", color="tab:gray", label="one seed" if i == 0 else None)
    ax.set_xticks(x, [r["estimator"] for r in rows], rotation=30)
    over = rows[0]["_interval"].over
    ax.set_ylabel("test NLL, nats (lower is better)")
    ax.set_title(f"Test NLL (IS); interval over {over}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_paired(rows: list[dict], baseline: str, path: Path) -> None:
    others = [r for r in rows if r["_paired"] is not None]
    fig = Figure(figsize=(6.5, 1.4 + 0.45 * max(1, len(others))))
    ax = fig.subplots()
    for i, r in enumerate(others):
        d = r["_paired"]
        color = "tab:gray" if not d.excludes_zero else ("tab:green" if d.mean < 0 else "tab:red")
        lo, hi = _yerr(d)
        ax.errorbar([d.mean], [i], xerr=[[lo], [hi]], fmt="o", color=color, capsize=5)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(others)), [r["estimator"] for r in others])
    ax.set_ylim(-0.7, len(others) - 0.3)
    ax.invert_yaxis()
    over = others[0]["_paired"].over if others else "seeds"
    ax.set_xlabel(f"NLL(estimator) − NLL({baseline}), nats; negative: better")
    ax.set_title(f"Paired differences vs {baseline}, 95% interval over {over}\n"
                 "green/red: interval excludes 0 (better/worse), gray: it does not", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def _mean_curve(curves: list[list[dict]], key: str):
    """(seconds, mean, low, high) over seeds, or None without data.

    The seeds' rows are aligned by epoch, and their last rows with each other (under a seconds or evals
    budget the seeds may finish different numbers of epochs, but all end at the budget): the point is the
    mean over seeds of the seconds and of the value, the band the range of the value over seeds."""
    series = []
    for c in curves:
        pts = [(p["train_seconds"], p[key]) for p in c
               if p.get(key) is not None and p.get("train_seconds") is not None and math.isfinite(p[key])]
        if pts:
            series.append(np.array(pts, dtype=np.float64))
    if not series:
        return None
    n = min(len(s) for s in series)
    aligned = np.stack([np.concatenate([s[:n - 1], s[-1:]]) for s in series])  # (seeds, n, 2)
    t, ys = aligned[..., 0].mean(0), aligned[..., 1]
    if len(series) == 1:
        return t, ys[0], None, None
    return t, ys.mean(0), ys.min(0), ys.max(0)


def plot_time(rows: list[dict], path: Path) -> bool:
    keys = [("test_bound", "test bound of the run's own estimator"),
            ("log_likelihood", "IS log-likelihood (few points, small K)")]
    keys = [k for k in keys if any(_mean_curve(r["_curves"], k[0]) is not None for r in rows)]
    if not keys:
        return False
    fig = Figure(figsize=(6.5 * len(keys), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    for ax, (key, title) in zip(axes, keys):
        for i, r in enumerate(rows):
            got = _mean_curve(r["_curves"], key)
            if got is None:
                continue
            t, mean, low, high = got
            color = f"C{i % 10}"
            ax.plot(t, mean, marker="." if len(t) <= 15 else None, color=color, label=r["estimator"])
            if low is not None:
                ax.fill_between(t, low, high, color=color, alpha=0.2, lw=0)
        ax.set_xlabel("training seconds (wall clock of the steps)")
        ax.set_ylabel("nats per image (higher is better)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Mean over seeds at each epoch and at the end of the budget; band: range over seeds",
                 fontsize=10)
    _save(fig, path)
    return True


def plot_snr(rows: list[dict], path: Path) -> bool:
    with_k = [r for r in rows if r["_snr_k"]]
    if not with_k:
        return False
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for r in with_k:
        ks = sorted(r["_snr_k"], key=int)
        ax.plot([int(k) for k in ks], [r["_snr_k"][k] for k in ks], marker="o", label=f"{r['estimator']} (trained)")
    ax.set_xscale("log")
    ax.set_xlabel("K (particles in the gradient estimate)")
    ax.set_ylabel("encoder gradient SNR, mean over parameters")
    ax.set_title("Gradient SNR vs K (Rainforth et al. 2018), mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_comparison(rows: list[dict], baseline: str, folder: Path) -> list[str]:
    """Write the comparison's plots into ``folder``; returns the names (without .png) of those written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    plot_nll(rows, folder / "nll.png")
    written.append("nll")
    if len(rows) > 1:
        plot_paired(rows, baseline, folder / "paired.png")
        written.append("paired")
    if plot_time(rows, folder / "bound_vs_time.png"):
        written.append("bound_vs_time")
    if plot_snr(rows, folder / "snr_vs_k.png"):
        written.append("snr_vs_k")
    return written
