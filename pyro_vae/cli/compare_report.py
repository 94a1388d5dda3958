"""The report of a comparison: compare.md (tables, plots linked), compare.csv (one row per run and per estimator)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.analysis.paired import Interval, how_combined, mean_interval, nll_summary, paired_difference
from pyro_vae.cli.compare_run import Job, per_point_log_likelihood

COLUMNS = ["kind", "estimator", "seed", "seeds", "nll", "nll_se_seeds", "nll_se_points", "nll_low", "nll_high",
           "dnll", "dnll_low", "dnll_high", "dnll_excludes_0", "test_elbo", "test_elbo_se", "kl", "active_units",
           "epochs", "steps", "train_seconds", "evals", "seconds_per_epoch", "images_per_s", "encoder_snr",
           "decoder_snr", "snr_repeats"]
MEANS = ["kl", "active_units", "epochs", "steps", "train_seconds", "evals", "seconds_per_epoch", "images_per_s",
         "encoder_snr", "decoder_snr"]
PLOTS = {"nll": "test NLL with 95% intervals, seeds as dots",
         "paired": "paired NLL differences against the baseline, 95% intervals",
         "bound_vs_time": "test bound and IS log-likelihood against training seconds, mean over seeds, band: range "
                          "over seeds",
         "snr_vs_k": "encoder gradient SNR against K, mean over seeds"}


def budget_text(train) -> str:
    if train.max_seconds is not None:
        return f"{train.max_seconds:g} s of training per run" + (
            f" (at most {train.epochs} epochs)" if train.epochs < 10**6 else "")
    if train.max_evals is not None:
        return f"{train.max_evals:,} model-and-guide evaluations (particles x points) per run" + (
            f" (at most {train.epochs} epochs)" if train.epochs < 10**6 else "")
    return f"{train.epochs} epochs"


def _diff(interval: Interval | None, prefix: str = "dnll") -> dict[str, Any]:
    if interval is None:
        return {}
    return {prefix: interval.mean, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high,
            f"{prefix}_excludes_0": interval.excludes_zero}


def summarize(planned: list[Job], results: list[dict], baseline: str) -> tuple[list[dict], list[dict]]:
    """(estimator rows, run rows): seed means, intervals and paired differences, as compare.csv holds them."""
    labels = list(dict.fromkeys(j.label for j in planned))
    by_label = {label: [(j, r) for j, r in zip(planned, results) if j.label == label] for label in labels}
    lls = {label: [per_point_log_likelihood(j.folder) for j, _ in runs] for label, runs in by_label.items()}
    sizes = {len(a) for arrays in lls.values() for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"the runs were evaluated on different numbers of test points: {sorted(sizes)}")
    est_rows, run_rows = [], []
    for label, runs in by_label.items():
        summary = nll_summary(lls[label])
        paired = None if label == baseline else paired_difference(lls[label], lls[baseline])
        elbo = mean_interval([r["test_elbo"] for _, r in runs], "seeds")
        row = {"kind": "estimator", "estimator": label, "seed": "", "seeds": len(runs), "nll": summary.mean,
               "nll_se_seeds": summary.seed_se, "nll_se_points": summary.point_se,
               "nll_low": summary.interval.low, "nll_high": summary.interval.high, **_diff(paired),
               "test_elbo": elbo.mean, "test_elbo_se": elbo.se,
               **{k: float(np.mean([r[k] for _, r in runs])) for k in MEANS},
               "_per_seed": summary.per_seed, "_interval": summary.interval, "_paired": paired,
               "_curves": [r["curve"] for _, r in runs],
               "_snr_k": {k: float(np.mean([r["snr_k"][k] for _, r in runs])) for k in runs[0][1]["snr_k"]}}
        est_rows.append(row)
        for (job, r), ll, ll_base in zip(runs, lls[label], lls[baseline]):
            one = mean_interval(-ll, "points")
            run_rows.append({"kind": "run", "estimator": label, "seed": job.seed, "seeds": 1, "nll": r["nll"],
                             "nll_se_points": r["nll_se"], "nll_low": one.low, "nll_high": one.high,
                             **(_diff(paired_difference([ll], [ll_base])) if label != baseline else {}),
                             "test_elbo": r["test_elbo"], "test_elbo_se": r["test_elbo_se"],
                             "snr_repeats": r.get("snr_repeats"), **{k: r[k] for k in MEANS}})
    return est_rows, run_rows


def _f(value, digits: int = 2) -> str:
    return "—" if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def _count(n: float) -> str:
    """1800 -> '1.8k', 5.4e7 -> '54M': evaluation counts at a glance."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _interval(i: Interval | None) -> str:
    if i is None:
        return "baseline"
    if not math.isfinite(i.low):
        return f"{i.mean:+.2f}"
    return f"{i.mean:+.2f} [{i.low:+.2f}, {i.high:+.2f}]" + (" **≠ 0**" if i.excludes_zero else "")


def write_report(planned: list[Job], results: list[dict], out: Path, *, baseline: str, base) -> list[dict]:
    """compare.csv, compare.md and the plots; returns the estimator rows."""
    from pyro_vae.plots.compare import plot_comparison

    est_rows, run_rows = summarize(planned, results, baseline)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(est_rows + run_rows)
    written = plot_comparison(est_rows, baseline, out / "plots")
    t, job = base.train, planned[0]
    seeds = est_rows[0]["seeds"]
    points = results[0]["num_points"]
    seed_list = sorted({j.seed for j in planned})
    lines = [
        f"Budget: {budget_text(t)}, batch {t.batch_size}, Adam lr {t.lr}; {seeds} seed{'s' * (seeds > 1)} "
        f"({', '.join(map(str, seed_list))}); data {base.data.get('name')} ({base.data.get('binarize')}"
        + (f", first {base.data['train_points']} training points" if base.data.get("train_points") else "")
        + f"); test NLL by IS with K={job.eval_samples} on {points} test points. Nats per image.", "",
        how_combined(seeds, points), "",
        f"Δ NLL is NLL(estimator) − NLL({baseline}), paired on the same seed and test points: negative is better "
        "than the baseline; **≠ 0** marks a 95% interval that excludes 0.", "",
        "| estimator | test NLL | s.e. (seeds) | s.e. (points) | 95% interval | Δ NLL vs " + baseline
        + " [95%] | test ELBO | epochs | train s | evals | KL | active units | encoder SNR | decoder SNR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in est_rows:
        i = r["_interval"]
        lines.append(f"| {r['estimator']} | {r['nll']:.2f} | {_f(r['nll_se_seeds'])} | {_f(r['nll_se_points'])} | "
                     f"[{_f(i.low)}, {_f(i.high)}] | {_interval(r['_paired'])} | {r['test_elbo']:.2f} | "
                     f"{r['epochs']:.3g} | {r['train_seconds']:.1f} | {_count(r['evals'])} | {r['kl']:.2f} | "
                     f"{r['active_units']:.3g} | {r['encoder_snr']:.3f} | {r['decoder_snr']:.3f} |")
    lines += ["", "Runs (Δ NLL of one seed: paired over its test points):", "",
              "| estimator | seed | test NLL | Δ NLL vs " + baseline + " [95%] | test ELBO | epochs | steps | "
              "train s | evals | s/epoch | images/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run_rows:
        paired = None if "dnll" not in r else Interval(r["dnll"], math.nan, r["dnll_low"], r["dnll_high"], 0, "")
        lines.append(f"| {r['estimator']} | {r['seed']} | {r['nll']:.2f} ± {_f(r['nll_se_points'])} | "
                     f"{_interval(paired)} | {r['test_elbo']:.2f} ± {_f(r['test_elbo_se'])} | {r['epochs']} | "
                     f"{r['steps']} | {r['train_seconds']:.1f} | {_count(r['evals'])} | {r['seconds_per_epoch']:.2f} | "
                     f"{r['images_per_s']:.0f} |")
    repeats = sorted({str(r.get("snr_repeats", job.snr_repeats)) for r in results})
    lines += ["", "Train s: training wall clock (the steps; not the per-epoch test bound, checkpoints or "
              "evaluation). Evals: model-and-guide evaluations, particles × training points seen. Gradient SNR "
              f"from {', '.join(repeats)} gradient draws on one test batch.", "",
              "Plots:", ""]
    lines += [f"- [{name}](plots/{name}.png): {PLOTS[name]}" for name in written]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return est_rows
