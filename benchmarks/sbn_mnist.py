"""Discrete-latent benchmark: a sigmoid belief net (200 binary latents) on binarized MNIST, one budget for all.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/sbn_mnist.py [--epochs 10] [--train-points 20000]

Model ``sbn`` (h ~ Bernoulli(sigmoid(b)), x | h ~ Bernoulli(logits = W h + c), 200 latents: the "SBN 200"
of Mnih & Gregor 2014), guide ``bernoulli`` with logits linear in x (their inference network), trained
with each estimator on the same seed, data and budget: tracegraph with NVIL's learned baseline (an MLP
784-100-1 owned by the guide, plus the decaying average), vimco and rws at K = 5 and 50, and iwae at
K = 5 with the straight-through ``relaxed-bernoulli`` guide (biased gradients). Then, on the same test
points and the same binarization draw: the test NLL by importance sampling, the ELBO from the same
draws, seconds per epoch, and the encoder's gradient SNR (Rainforth et al. 2018; over the encoder's
own parameters, not the baseline network's) on 100 test points.

One torch thread; the runs are sequential. Each finished run is kept in --out (``<label>.json`` and
``.npz``) and skipped when the script is started again, so an interrupted benchmark resumes.
Writes benchmarks/results/sbn_mnist.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.analysis.snr import gradient_samples, snr
from pyro_vae.data import load_dataset
from pyro_vae.estimators import IWAE, RWS, VIMCO, TraceGraph
from pyro_vae.guides import BernoulliGuide, RelaxedBernoulliGuide
from pyro_vae.models import SigmoidBeliefNet
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit

ROOT = Path(__file__).resolve().parent
RUNS = {  # label: (estimator, guide class, extra guide options)
    "tracegraph (NVIL)": (lambda: TraceGraph(), BernoulliGuide, {"baseline_hidden": (100,)}),
    "vimco k=5": (lambda: VIMCO(5), BernoulliGuide, {}),
    "vimco k=50": (lambda: VIMCO(50), BernoulliGuide, {}),
    "rws k=5": (lambda: RWS(5), BernoulliGuide, {}),
    "rws k=50": (lambda: RWS(50), BernoulliGuide, {}),
    "iwae k=5, relaxed guide": (lambda: IWAE(5), RelaxedBernoulliGuide, {}),
}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-")


def build(label: str, a):
    make_estimator, guide_cls, extra = RUNS[label]
    torch.manual_seed(a.seed)
    model = SigmoidBeliefNet(SigmoidBeliefNet.Config(x_dim=784, latent_dim=a.latents))
    guide = guide_cls(guide_cls.Config(x_dim=784, latent_dim=a.latents, hidden=(), **extra))
    return model, guide, make_estimator()


def train(label: str, a, train_data, test_curve):
    model, guide, estimator = build(label, a)
    t0 = time.perf_counter()
    history = fit(model, guide, estimator, train_data, test_curve,
                  TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device="cpu"), quiet=True)
    return model, guide, estimator, history, time.perf_counter() - t0


def snr_stats(model, guide, estimator, test_eval, a) -> dict:
    """Encoder (its own parameters, not a baseline network's) and decoder gradient SNR on 100 test images:
    the mean over parameters (as ``pyro_vae.gradient_snr``) and the median, which a few parameters with
    near-deterministic gradients (saturated units under rws) cannot dominate."""
    x, _ = next(test_eval.batches(100, shuffle=False, generator=torch.Generator().manual_seed(0)))
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(a.seed)
        g = gradient_samples(model, guide, estimator, x, a.snr_repeats)
    n_encoder = sum(p.numel() for p in guide.encoder.parameters())  # the guide's first parameters
    enc, dec = snr(g["encoder"][:, :n_encoder]), snr(g["decoder"])
    return {"encoder_snr": float(enc.mean()), "encoder_snr_median": float(enc.median()),
            "decoder_snr": float(dec.mean()), "decoder_snr_median": float(dec.median())}


def one_run(label: str, a, train_data, test_curve, test_eval) -> dict:
    model, guide, estimator, history, train_s = train(label, a, train_data, test_curve)
    t0 = time.perf_counter()
    result = evaluate(model, guide, test_eval, num_samples=a.eval_samples, seed=a.seed, quiet=True)
    eval_s = time.perf_counter() - t0
    s = result.summary()
    return {"label": label, "estimator": repr(estimator), "guide": type(guide).__name__,
            "nll": s["nll"], "nll_se": s["log_likelihood_se"], "elbo": s["elbo"], "elbo_se": s["elbo_se"],
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in history.rows])),
            "train_minutes": train_s / 60, "eval_minutes": eval_s / 60,
            **snr_stats(model, guide, estimator, test_eval, a),
            "curve": [(r["epoch"], r["test_elbo"]) for r in history.rows],
            "_log_likelihood": result.log_likelihood}


def refresh_snr(row: dict, a, train_data, test_curve, test_eval) -> dict:
    """Retrain a stored run (fixed seed, CPU: the same model) to measure its SNR statistics again."""
    model, guide, estimator, history, _ = train(row["label"], a, train_data, test_curve)
    curve = [[r["epoch"], r["test_elbo"]] for r in history.rows]
    if curve != [list(c) for c in row["curve"]]:
        raise SystemExit(f"{row['label']}: retraining did not reproduce the stored run's learning curve")
    return {**row, **snr_stats(model, guide, estimator, test_eval, a)}


def write_results(rows: list[dict], a, wall: float) -> None:
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    ref = rows[0]["_log_likelihood"]
    lines = [f"Budget: {a.epochs} epochs on the first {a.train_points} training images (dynamic binarization), "
             f"batch {a.batch_size}, Adam lr {a.lr}, seed {a.seed}, one torch thread on a shared 2-core CPU. "
             f"Test NLL by importance sampling with K = {a.eval_samples} on the first {a.eval_points} test images "
             f"(one binarization draw, the same for every run); ± is one standard error over the points; the "
             f"paired difference is against the first row on the same points. Gradient SNR: per parameter |mean| / "
             f"std over {a.snr_repeats} gradient draws of the training estimator on 100 test images, then the mean and "
             f"the median over the encoder's parameters (not a baseline network's) and over the decoder's.",
             "", "| run | test NLL | NLL − first row's (paired) | test ELBO (same draws) | s/epoch | encoder SNR, mean / median "
             "| decoder SNR, mean / median |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = np.asarray(r["_log_likelihood"]) - np.asarray(ref)
        paired = "" if r is rows[0] else f"{-d.mean():+.2f} ± {d.std(ddof=1) / math.sqrt(len(d)):.2f}"  # NLL = -ll
        lines.append(f"| {r['label']} | {r['nll']:.2f} ± {r['nll_se']:.2f} | {paired} | {r['elbo']:.2f} ± "
                     f"{r['elbo_se']:.2f} | {r['seconds_per_epoch']:.1f} | {r['encoder_snr']:.3g} / "
                     f"{r['encoder_snr_median']:.3g} | {r['decoder_snr']:.3g} / {r['decoder_snr_median']:.3g} |")
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/sbn_mnist.py", *sys.argv[1:]])
    lines += ["", f"Command: `{command}`; wall time of this invocation {wall / 60:.0f} min "
                  f"(runs already in {a.out} were reused)."]
    (results / "sbn_mnist.md").write_text("\n".join(lines) + "\n")
    columns = ["label", "estimator", "guide", "nll", "nll_se", "elbo", "elbo_se", "seconds_per_epoch",
               "train_minutes", "eval_minutes", "encoder_snr", "encoder_snr_median", "decoder_snr", "decoder_snr_median"]
    with open(results / "sbn_mnist.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for r in rows:
        ep, val = zip(*r["curve"])
        left.plot(ep, val, marker=".", label=r["label"])
    left.set_xlabel("epoch")
    left.set_ylabel("test bound of the training objective (nats)")
    left.set_title("Learning curves (1000 test images)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    labels = [r["label"].replace(", ", ",\n") for r in rows]
    right.bar(labels, [r["nll"] for r in rows], yerr=[r["nll_se"] for r in rows], capsize=4)
    lo, hi = min(r["nll"] for r in rows), max(r["nll"] for r in rows)
    right.set_ylim(lo - 0.3 * (hi - lo) - 1, hi + 0.3 * (hi - lo) + 1)
    right.set_ylabel("test NLL, nats (lower is better)")
    right.set_title(f"IS NLL, K={a.eval_samples}, ± 1 s.e.")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(results / "sbn_mnist.png", dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-points", type=int, default=20000)
    p.add_argument("--eval-points", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--latents", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr-repeats", type=int, default=20)
    p.add_argument("--only", default=None, help="comma-separated labels of RUNS to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-sbn")
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train, test = load_dataset("mnist", "data", binarize="dynamic", seed=a.seed)
    train, test_eval = train.head(a.train_points), test.head(a.eval_points)
    test_curve = test.head(1000)
    a.out.mkdir(parents=True, exist_ok=True)
    labels = list(RUNS) if a.only is None else [s.strip() for s in a.only.split(",")]
    rows = []
    for label in labels:
        path = a.out / f"{slug(label)}.json"
        if path.exists():
            row = json.loads(path.read_text())
            row["_log_likelihood"] = np.load(a.out / f"{slug(label)}.npz")["log_likelihood"]
            if "encoder_snr_median" not in row:  # stored by an earlier version of this script
                print(f"retraining {label} for its SNR statistics ...", flush=True)
                row = refresh_snr(row, a, train, test_curve, test_eval)
        else:
            print(f"training {label} ...", flush=True)
            row = one_run(label, a, train, test_curve, test_eval)
            np.savez(a.out / f"{slug(label)}.npz", log_likelihood=row["_log_likelihood"])
        path.write_text(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, indent=1))
        print(f"{label}: NLL {row['nll']:.2f} ± {row['nll_se']:.2f}, {row['seconds_per_epoch']:.1f} s/epoch", flush=True)
        rows.append(row)
    write_results(rows, a, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
