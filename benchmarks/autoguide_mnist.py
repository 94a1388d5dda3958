"""The auto guide against the hand-written guides on MNIST, on one budget.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/autoguide_mnist.py [--epochs 20] [--train-points 60000]

Two pairs, each trained with `pyro-vae train` (the CLI, so `--guide auto` is exercised end to end) with
the same seed, data, model, estimator and budget:

1. `vae` (Burda et al.'s 1-layer model, 50 latents): `--guide auto` against `--guide diagonal-normal`.
   Both are a 784-200-200 tanh MLP giving a diagonal Normal; the auto guide was built from the
   model's trace and nothing else.
2. `two-layer-vae` (Burda et al.'s 2-stochastic-layer model, z2 50 -> z1 100 -> x): `--guide auto`
   (q(z2|x) q(z1|x, z2), the model's order, each head on the shared 784-200-200 network) against
   the hand-written `two-layer` guide (q(z1|x) q(z2|z1), bottom-up).

Every run is scored on the same test points with the same binarization draw and the same K, so the
per-point differences are paired. Runs one training process at a time, with 1 torch thread.
Writes benchmarks/results/autoguide_mnist.md/.csv and autoguide_mnist.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_vae.cli import main as cli
from pyro_vae.training.checkpoint import LATEST, load_checkpoint

ROOT = Path(__file__).resolve().parent
PAIRS = (("vae", "diagonal-normal"), ("vae", "auto"), ("two-layer-vae", "two-layer"), ("two-layer-vae", "auto"))


def _mean_se(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def _train(a, model: str, guide: str) -> dict:
    run_dir = a.out / f"{model}--{guide}"
    if not (run_dir / "evaluation.json").exists():  # restartable: a finished run is kept
        code = cli(["train", "--model", model, "--guide", guide, "--epochs", str(a.epochs),
                    "--train-points", str(a.train_points), "--test-points", str(a.test_points),
                    "--eval-samples", str(a.eval_samples), "--eval-points", str(a.test_points),
                    "--seed", str(a.seed), "--device", a.device, "--out", str(run_dir), "--quiet"])
        if code:
            raise SystemExit(code)
    summary = json.loads((run_dir / "evaluation.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    guide_params = sum(v.numel() for v in load_checkpoint(run_dir / LATEST)["guide"].values())
    return {"model": model, "guide": guide, "epochs": a.epochs, "train_points": a.train_points,
            "test_points": summary["num_points"], "eval_samples": summary["num_samples"],
            "test_elbo": summary["elbo"], "test_elbo_se": summary["elbo_se"], "test_nll": summary["nll"],
            "test_nll_se": summary["log_likelihood_se"], "guide_params": guide_params,
            "s_per_epoch": float(np.mean([m["seconds"] for m in metrics])),
            "minutes": (sum(m["seconds"] for m in metrics) + summary.get("seconds", 0.0)) / 60,
            "curve": [(m["epoch"], m["test_elbo"]) for m in metrics],
            "per_point": dict(np.load(run_dir / "evaluation.npz"))}


def _plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    for i, model in enumerate(("vae", "two-layer-vae")):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in (r for r in rows if r["model"] == model):
            epochs, elbo = zip(*r["curve"])
            ax.plot(epochs, elbo, marker="o", ms=3, label=f"--guide {r['guide']}")
        ax.set_title(f"--model {model}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test ELBO (nats/image)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-points", type=int, default=60000)
    p.add_argument("--test-points", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/bench-autoguide"))
    p.add_argument("--results", type=Path, default=ROOT / "results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [_train(a, model, guide) for model, guide in PAIRS]
    a.results.mkdir(parents=True, exist_ok=True)
    keys = [k for k in rows[0] if k not in ("curve", "per_point")]
    with open(a.results / "autoguide_mnist.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: r[k] for k in keys} for r in rows)
    _plot(rows, a.results / "autoguide_mnist.png")
    lines = [f"Binarized MNIST (dynamic), the first {a.train_points} training images, {a.epochs} epochs, batch 100, "
             f"Adam lr 1e-3, estimator `elbo`, seed {a.seed}, {a.device}, 1 torch thread; the networks are the "
             "CLI's defaults (50 latents, 200-200 tanh). Test: the first "
             f"{rows[0]['test_points']} test images, IS log-likelihood with K = {rows[0]['eval_samples']}, the same "
             "binarization draw for every run. Nats per image; ± is one standard error over test points.", "",
             "| model | guide | test ELBO | test NLL (IS) | guide parameters | s/epoch | training + evaluation |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | `{r['guide']}` | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} | "
                     f"{r['test_nll']:.2f} ± {r['test_nll_se']:.2f} | {r['guide_params']:,} | {r['s_per_epoch']:.1f} | "
                     f"{r['minutes']:.1f} min |")
    lines.append("")
    for hand, auto in ((rows[0], rows[1]), (rows[2], rows[3])):
        d_ll = _mean_se(auto["per_point"]["log_likelihood"] - hand["per_point"]["log_likelihood"])
        d_elbo = _mean_se(auto["per_point"]["elbo"] - hand["per_point"]["elbo"])
        lines.append(f"- `{auto['model']}`, auto minus `{hand['guide']}` (paired over the same points): IS "
                     f"log-likelihood {d_ll[0]:+.2f} ± {d_ll[1]:.2f}, ELBO {d_elbo[0]:+.2f} ± {d_elbo[1]:.2f} nats: the "
                     + ("same NLL within 0.3 nats." if abs(d_ll[0]) <= 0.3 else
                        f"auto guide's NLL is {abs(d_ll[0]):.2f} nats {'lower' if d_ll[0] > 0 else 'HIGHER'}."))
    lines += ["", "![test ELBO by epoch](autoguide_mnist.png)", "",
              f"Command: `python3 dev.py shell-cmd .venv/bin/python benchmarks/autoguide_mnist.py "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}` (times on a CPU shared with other jobs; a "
              "finished run in --out is reused, not retrained)."]
    (a.results / "autoguide_mnist.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
