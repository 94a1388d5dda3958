"""Estimator benchmark: dynamic-binarized MNIST, Burda et al.'s 1-layer architecture, one fixed budget for all.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/estimators_mnist.py [--epochs 10] [--eval-points 2000]

Runs `pyro-vae compare` for elbo, iwae k=5, iwae k=50, dreg k=5 and dreg k=50 with the same seed,
data, architecture and budget, then copies the table and plots to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from pyro_vae.cli import main as cli

ROOT = Path(__file__).resolve().parent
ESTIMATORS = "elbo,iwae:k=5,iwae:k=50,dreg:k=5,dreg:k=50"


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--eval-points", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--estimators", default=ESTIMATORS)
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-estimators")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    t0 = time.perf_counter()
    code = cli(["compare", "--estimators", a.estimators, "--epochs", str(a.epochs), "--eval-points",
                str(a.eval_points), "--eval-samples", str(a.eval_samples), "--snr-repeats", "20",
                "--device", a.device, "--out", str(a.out), "--quiet"])
    if code:
        return code
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    table = (a.out / "compare.md").read_text()
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/estimators_mnist.py", *sys.argv[1:]])
    (results / "estimators_mnist.md").write_text(
        f"{table}\nCommand: `{command}`; wall time {time.perf_counter() - t0:.0f} s.\n")
    shutil.copy(a.out / "compare.csv", results / "estimators_mnist.csv")
    for png in (a.out / "plots").glob("*.png"):
        shutil.copy(png, results / f"estimators_mnist_{png.name}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
