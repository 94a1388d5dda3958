"""What beta does: beta-VAE with beta = 1 and beta = 4 on an MNIST subset, KL, active units and traversals.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/beta_vae_mnist.py [--betas 1,4] [--epochs 5]

Each beta trains `pyro-vae train --model beta-vae --beta B --estimator analytic-kl --latent-dim 10` on the
first 10,000 training images, then runs `pyro-vae diagnose`. Writes benchmarks/results/beta_vae_mnist.md
and each run's latent traversal plot (every row moves one unit of point 0's posterior mean over [-3, 3]).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pyro_vae.cli import main as cli

ROOT = Path(__file__).resolve().parent


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--betas", default="1,4")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-beta")
    a = p.parse_args()
    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    lines = ["| beta | test ELBO (unweighted) | IS log p(x) | KL (nats) | active units | mean k-hat |",
             "|---|---|---|---|---|---|"]
    t0 = time.perf_counter()
    for beta in tqdm(a.betas.split(","), desc="betas"):
        run_dir = a.out / f"beta{beta}"
        code = cli(["train", "--model", "beta-vae", "--beta", beta, "--estimator", "analytic-kl", "--latent-dim", "10",
                    "--epochs", str(a.epochs), "--train-points", "10000", "--test-points", "1000",
                    "--eval-samples", "100", "--eval-points", "500", "--out", str(run_dir), "--quiet"])
        code = code or cli(["diagnose", str(run_dir), "--points", "50", "--samples", "200", "--gap-points", "10",
                            "--gap-steps", "100", "--quiet"])
        if code:
            return code
        ev = json.loads((run_dir / "evaluation.json").read_text())
        s = json.loads((run_dir / "diagnostics" / "summary.json").read_text())
        units, imp = s["latents"], s["importance"]
        lines.append(f"| {beta} | {ev['elbo']:.2f} ± {ev['elbo_se']:.2f} | {ev['log_likelihood']:.2f} | "
                     f"{units['kl']:.2f} | {units['active_units']} of {units['total_units']} | "
                     f"{imp['khat_mean']:.2f} |")
        shutil.copy(run_dir / "diagnostics" / "plots" / "traversals.png",
                    results / f"beta_vae_mnist_traversals_beta{beta}.png")
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/beta_vae_mnist.py", *sys.argv[1:]])
    (results / "beta_vae_mnist.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`; wall time "
                                               f"{(time.perf_counter() - t0) / 60:.1f} min.\n")
    print((results / "beta_vae_mnist.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run())
