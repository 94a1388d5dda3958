"""Train several estimators with the same seed, data, architecture and budget, and compare them."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure  # no pyplot: writing files never changes the user's backend

from pyro_vae.analysis.latent_stats import active_units, mean_kl
from pyro_vae.analysis.snr import gradient_snr
from pyro_vae.cli.runs import RunSpec, make_estimator
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.training.run_dir import RunDir

OPTION_ALIASES = {"k": "num_particles", "particles": "num_particles"}
SNR_KS = (1, 5, 50)
# The gradient SNR's repeats scale with the training budget: its gradient draws cost at most SNR_SHARE of
# the training's (counted in particle-points, forward and backward alike), within [SNR_MIN, SNR_MAX].
SNR_SHARE, SNR_MIN, SNR_MAX = 0.1, 10, 50


def auto_snr_repeats(trained_images: int, batch: int, k: int, has_k: bool) -> int:
    """Repeats for the gradient SNR so that its draws cost about SNR_SHARE of the training's.

    Training evaluated trained_images x k particle-points; one repeat of the SNR evaluates ``batch``
    points at the estimator's k and, for estimators with particles, at each K of SNR_KS as well.
    Deterministic: the same run spec always gets the same repeats."""
    trained = trained_images * k
    per_repeat = batch * (k + (sum(SNR_KS) if has_k else 0))
    return int(min(SNR_MAX, max(SNR_MIN, SNR_SHARE * trained // per_repeat)))


def parse_estimators(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """'elbo,iwae:k=5,renyi:alpha=0.5:k=5' -> [(label, name, options), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *opts = item.split(":")
        if name not in ESTIMATORS:
            raise UserError(f"unknown estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
        options: dict[str, Any] = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep:
                raise UserError(f"estimator option {opt!r} in {item!r} is not key=value")
            try:
                options[OPTION_ALIASES.get(key, key)] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                raise UserError(f"estimator option {opt!r} in {item!r} needs a number") from None
        make_estimator(ESTIMATORS, name, options)  # validate now, before any training
        out.append((item.replace(":", "-").replace("=", ""), name, options))
    if not out:
        raise UserError("--estimators needs at least one estimator, e.g. elbo,iwae:k=5")
    if len({label for label, _, _ in out}) != len(out):
        raise UserError("--estimators lists the same estimator twice")
    return out


def compare(base: RunSpec, estimators: list[tuple[str, str, dict[str, Any]]], out: Path, *,
            eval_samples: int, eval_points: int | None, snr_repeats: int | None = None,
            quiet: bool = False) -> list[dict]:
    from pyro_vae.cli.experiment import check_spec, train_run_objects

    specs = [dataclasses.replace(base, estimator=name, estimator_options=options) for _, name, options in estimators]
    for spec in specs:  # every run's needs, before the first one trains or a folder is made
        check_spec(spec, eval_points=eval_points)
    RunDir(out).create(fresh=False)
    rows = []
    for label, name, options in estimators:
        spec = dataclasses.replace(base, estimator=name, estimator_options=options)
        run, model, guide, test, history, summary = train_run_objects(
            spec, out / label, eval_samples=eval_samples, eval_points=eval_points, quiet=quiet)
        if summary.get("log_likelihood") is None:
            raise UserError(f"compare ranks estimators by the IS log-likelihood: {summary['not_estimated']}")
        device = next(model.parameters()).device
        x, y = next(test.batches(min(100, len(test)), shuffle=False, generator=torch.Generator().manual_seed(0),
                                 device=device))
        kw = eval_kwargs(model, y)
        est = make_estimator(ESTIMATORS, name, options)
        has_k = "num_particles" in ESTIMATORS[name].__dataclass_fields__
        trained = round(sum(r["images_per_s"] * r["seconds"] for r in history.rows))
        repeats = snr_repeats or auto_snr_repeats(trained, x.shape[0], getattr(est, "num_particles", 1), has_k)
        curve = {}
        if has_k:
            for k in SNR_KS:
                other = make_estimator(ESTIMATORS, name, {**options, "num_particles": k})
                curve[k] = gradient_snr(model, guide, other, x, repeats, **kw)
        # the curve already holds the estimator itself where its K is one of SNR_KS
        snr = curve.get(est.num_particles) if has_k else None
        snr = snr or gradient_snr(model, guide, est, x, repeats, **kw)
        snr_k = {k: v["encoder"] for k, v in curve.items()}
        rows.append({
            "estimator": label,
            "test_elbo": summary["elbo"], "test_elbo_se": summary["elbo_se"],
            "nll": summary["nll"], "nll_se": summary["log_likelihood_se"],
            "kl": mean_kl(model, guide, test, device=device),
            "active_units": active_units(guide, test, device=device, model=model)[0],
            "seconds_per_epoch": sum(r["seconds"] for r in history.rows) / len(history.rows),
            "images_per_s": sum(r["images_per_s"] for r in history.rows) / len(history.rows),
            "encoder_snr": snr["encoder"], "decoder_snr": snr["decoder"], "snr_repeats": repeats,
            "_curve": [(r["epoch"], r.get("test_elbo", math.nan)) for r in history.rows],
            "_snr_k": snr_k,
        })
    write_table(rows, out, base, eval_samples, eval_points)
    plot_comparison(rows, out)
    return rows


COLUMNS = ["estimator", "test_elbo", "test_elbo_se", "nll", "nll_se", "kl", "active_units",
           "seconds_per_epoch", "images_per_s", "encoder_snr", "decoder_snr", "snr_repeats"]


def write_table(rows: list[dict], out: Path, base: RunSpec, eval_samples: int, eval_points: int | None) -> None:
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    t = base.train
    lines = [f"Budget: {t.epochs} epochs, batch {t.batch_size}, Adam lr {t.lr}, seed {t.seed}; data "
             f"{base.data.get('name')} ({base.data.get('binarize')}); test NLL by IS with K={eval_samples} on "
             f"{eval_points or 'all'} test points. Nats per image; ± is one standard error over test points. "
             f"Gradient SNR from {', '.join(sorted({str(r['snr_repeats']) for r in rows}))} gradient draws on "
             "one test batch.", "",
             "| estimator | test ELBO | test NLL | KL | active units | s/epoch | images/s | encoder SNR | decoder SNR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} | {r['nll']:.2f} ± "
                     f"{r['nll_se']:.2f} | {r['kl']:.2f} | {r['active_units']} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['encoder_snr']:.3f} | {r['decoder_snr']:.3f} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")


def plot_comparison(rows: list[dict], out: Path) -> None:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for r in rows:
        ep, val = zip(*r["_curve"])
        ax.plot(ep, val, marker=".", label=r["estimator"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test bound of the training estimator (nats)")
    ax.set_title("Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "learning_curves.png", dpi=100)

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    labels = [r["estimator"] for r in rows]
    se = [r["nll_se"] if math.isfinite(r["nll_se"]) else 0.0 for r in rows]  # one test point: no spread
    ax.bar(labels, [r["nll"] for r in rows], yerr=se, capsize=4, color="tab:blue")
    lo = min(r["nll"] - 3 * s for r, s in zip(rows, se))
    hi = max(r["nll"] + 3 * s for r, s in zip(rows, se))
    ax.set_ylim(lo - 0.1 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
    ax.set_ylabel("test NLL, nats (lower is better)")
    ax.set_title("Test negative log-likelihood (IS), ± 1 s.e.")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(plots / "nll.png", dpi=100)

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for r in rows:
        if r["_snr_k"]:
            ks = sorted(r["_snr_k"])
            ax.plot(ks, [r["_snr_k"][k] for k in ks], marker="o", label=f"{r['estimator']} (trained model)")
    ax.set_xscale("log")
    ax.set_xlabel("K (particles in the gradient estimate)")
    ax.set_ylabel("encoder gradient SNR, mean over parameters")
    ax.set_title("Gradient SNR vs K (Rainforth et al. 2018)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "snr_vs_k.png", dpi=100)


def command(a: argparse.Namespace) -> None:
    from pyro_vae.cli.parser import spec_from_args
    from pyro_vae.training import distributed

    distributed.refuse("compare")
    estimators = parse_estimators(a.estimators)
    for label, name, options in estimators:
        note = getattr(make_estimator(ESTIMATORS, name, options), "note", None)
        if note:
            print(f"pyro-vae: note: {label}: {note}", file=sys.stderr)
    spec = spec_from_args(a)
    out = a.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(spec, estimators, out, eval_samples=a.eval_samples, eval_points=a.eval_points,
            snr_repeats=a.snr_repeats, quiet=a.quiet)
    print((out / "compare.md").read_text(), end="")
    print(f"table: {out / 'compare.md'} and {out / 'compare.csv'}; plots: {out / 'plots'}")
