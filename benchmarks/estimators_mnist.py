"""Estimator benchmark through `pyro-vae compare`: MNIST, Burda et al.'s 1-layer architecture, 3 seeds, at equal
epochs and at equal wall clock.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/estimators_mnist.py [--epochs 5] [--seconds 60]
        [--train-points 5000] [--seeds 3] [--jobs 1] [--threads 1]

Runs `pyro-vae compare` twice with the same estimators, seeds, data and architecture: once with
`--budget epochs=E`, once with `--budget seconds=S` (training wall clock per run), then copies each
report (compare.md, compare.csv, plots) to benchmarks/results/estimators_mnist_{epochs,seconds}*.
Both comparisons are resumable: rerunning the same command skips the finished runs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from pyro_vae.cli import main as cli

ROOT = Path(__file__).resolve().parent
ESTIMATORS = "elbo,iwae:k=5,iwae:k=50,dreg:k=5,dreg:k=50,stl"


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="the equal-epochs budget (default: 5)")
    p.add_argument("--seconds", type=float, default=60.0, help="the equal-wall-clock budget per run (default: 60)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-points", type=int, default=5000, help="first N MNIST training images (default: 5000)")
    p.add_argument("--test-points", type=int, default=500)
    p.add_argument("--eval-points", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--snr-repeats", type=int, default=10)
    p.add_argument("--curve-points", type=int, default=100)
    p.add_argument("--curve-samples", type=int, default=50)
    p.add_argument("--estimators", default=ESTIMATORS)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-estimators")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: PyTorch's); on a busy machine 1 is much faster")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/estimators_mnist.py", *sys.argv[1:]])
    common = ["--estimators", a.estimators, "--seeds", str(a.seeds), "--train-points", str(a.train_points),
              "--test-points", str(a.test_points), "--eval-points", str(a.eval_points), "--eval-samples",
              str(a.eval_samples), "--snr-repeats", str(a.snr_repeats), "--curve-points", str(a.curve_points),
              "--curve-samples", str(a.curve_samples), "--jobs", str(a.jobs), "--device", a.device, "--quiet"]
    for kind, budget in (("epochs", f"epochs={a.epochs}"), ("seconds", f"seconds={a.seconds:g}")):
        out = a.out / kind
        t0 = time.perf_counter()
        code = cli(["compare", *common, "--budget", budget, "--out", str(out)])
        if code:
            return code
        name = f"estimators_mnist_{kind}"
        (results / f"{name}.md").write_text(
            (out / "compare.md").read_text().replace("](plots/", f"]({name}_")
            + f"\nCommand: `{command}` (this part: `--budget {budget}`); wall time {time.perf_counter() - t0:.0f} s "
            "(runs already finished by an earlier call are not retrained and not counted).\n")
        shutil.copy(out / "compare.csv", results / f"{name}.csv")
        for png in (out / "plots").glob("*.png"):
            shutil.copy(png, results / f"{name}_{png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
