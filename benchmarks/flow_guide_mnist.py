"""Flow guide benchmark: the diagonal-normal guide against the IAF guide on MNIST, on one budget, two ways.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/flow_guide_mnist.py [--epochs 20] [--train-points 20000]

About 5 minutes on 2 CPU cores with the defaults.

1. Joint training: `pyro-vae train --guide G` for each guide, with the same seed, data subset,
   architecture (the model's and the encoder's: Burda et al.'s 1-layer, 50 latents) and budget; the
   IAF guide adds two conditional IAF steps (Kingma et al. 2016) after the encoder. Each guide trains
   its own model, so a difference mixes a better model with a tighter bound.
2. Same model: the model trained in 1 with the diagonal-normal guide is frozen, and a fresh guide of
   each kind is fitted to it for ``--refit-epochs`` epochs. Only the bound differs, so the ELBO
   difference is the flow's tightening on that model (which was shaped around a diagonal guide,
   Cremer et al. 2018, so this favours the diagonal guide if anything).

All scores are on the same test points with the same dynamic-binarization draw, so per-point
differences are paired. Writes benchmarks/results/flow_guide_mnist.md/.csv and flow_guide_mnist.png.
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
import pyro.poutine as poutine
import torch
from matplotlib.figure import Figure
from pyro.infer import SVI
from tqdm import tqdm

from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.cli import main as cli
from pyro_vae.cli.experiment import load_data, load_run
from pyro_vae.cli.runs import make_component
from pyro_vae.estimators import ELBO
from pyro_vae.guides import GUIDES as GUIDE_CLASSES

ROOT = Path(__file__).resolve().parent
GUIDES = ("diagonal-normal", "iaf")


def _mean_se(a: np.ndarray) -> tuple[float, float]:
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def _joint(a) -> tuple[list[dict], dict, dict]:
    rows, curves, per_point = [], {}, {}
    for guide in tqdm(GUIDES, desc="joint training"):
        run_dir = a.out / guide
        t0 = time.perf_counter()
        code = cli(["train", "--guide", guide, "--epochs", str(a.epochs), "--train-points", str(a.train_points),
                    "--test-points", str(a.test_points), "--eval-samples", str(a.eval_samples),
                    "--eval-points", str(a.test_points), "--seed", str(a.seed), "--device", a.device,
                    "--out", str(run_dir), "--quiet"])
        if code:
            raise SystemExit(code)
        summary = json.loads((run_dir / "evaluation.json").read_text())
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((run_dir / "config.json").read_text())
        curves[guide] = [(m["epoch"], m["test_elbo"]) for m in metrics]
        per_point[guide] = dict(np.load(run_dir / "evaluation.npz"))
        rows.append({"stage": "joint", "guide": guide, "epochs": a.epochs, "train_points": a.train_points,
                     "test_points": summary["num_points"], "eval_samples": summary["num_samples"],
                     "test_elbo": summary["elbo"], "test_elbo_se": summary["elbo_se"],
                     "test_nll": summary["nll"], "test_nll_se": summary["log_likelihood_se"],
                     "gap": summary["log_likelihood"] - summary["elbo"],
                     "s_per_epoch": float(np.mean([m["seconds"] for m in metrics])),
                     "minutes": (time.perf_counter() - t0) / 60, "device": config["versions"]["device"]})
    return rows, curves, per_point


def _refit(a) -> tuple[list[dict], dict]:
    """Fresh guides fitted to the frozen model of the diagonal-normal run."""
    run, spec, model, _, test, device = load_run(a.out / "diagonal-normal", a.device)
    train, _ = load_data(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = poutine.block(model, hide_types=["param"])  # SVI then optimizes the guide's parameters only
    options = {**spec.network, "x_dim": train.dim}
    rows, per_point = [], {}
    for guide_name in tqdm(GUIDES, desc="refit guides on a frozen model"):
        torch.manual_seed(a.seed)
        guide = make_component(GUIDE_CLASSES, guide_name, "guide", options).to(device)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(a.seed)
        with pyro.get_param_store().scope():
            pyro.set_rng_seed(a.seed)
            svi = SVI(frozen, guide, pyro.optim.Adam({"lr": spec.train.lr}), loss=ELBO())
            for _ in range(a.refit_epochs):
                for x, _ in train.batches(spec.train.batch_size, shuffle=True, generator=gen, device=device):
                    svi.step(x)
        seconds = time.perf_counter() - t0
        result = evaluate(model, guide, test, num_samples=a.eval_samples, device=device, seed=a.seed, quiet=True)
        s = result.summary()
        per_point[guide_name] = {"elbo": result.elbo, "log_likelihood": result.log_likelihood}
        rows.append({"stage": "same model", "guide": guide_name, "epochs": a.refit_epochs,
                     "train_points": len(train), "test_points": s["num_points"], "eval_samples": s["num_samples"],
                     "test_elbo": s["elbo"], "test_elbo_se": s["elbo_se"], "test_nll": s["nll"],
                     "test_nll_se": s["log_likelihood_se"], "gap": s["log_likelihood"] - s["elbo"],
                     "s_per_epoch": seconds / a.refit_epochs, "minutes": seconds / 60, "device": str(device)})
    return rows, per_point


def _table(rows: list[dict]) -> list[str]:
    out = ["| guide | test ELBO | test NLL (IS) | NLL - (-ELBO) gap | s/epoch |", "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['guide']} | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} | "
                   f"{r['test_nll']:.2f} ± {r['test_nll_se']:.2f} | {r['gap']:.2f} | {r['s_per_epoch']:.1f} |")
    return out


def _paired(per_point: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    iaf, diag = per_point["iaf"], per_point["diagonal-normal"]
    return _mean_se(iaf["elbo"] - diag["elbo"]), _mean_se(iaf["log_likelihood"] - diag["log_likelihood"])


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--refit-epochs", type=int, default=10, help="epochs to fit each guide to the frozen model")
    p.add_argument("--train-points", type=int, default=20000)
    p.add_argument("--test-points", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-flow")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small matrices gain little from more, and on a "
                        "busy machine extra threads mostly wait for each other)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t_all = time.perf_counter()
    joint_rows, curves, joint_points = _joint(a)
    refit_rows, refit_points = _refit(a)
    (je, jl), (re_, rl) = _paired(joint_points), _paired(refit_points)

    results = ROOT / "results"
    results.mkdir(exist_ok=True)
    with open(results / "flow_guide_mnist.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(joint_rows[0]))
        w.writeheader()
        w.writerows(joint_rows + refit_rows)
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/flow_guide_mnist.py", *sys.argv[1:]])
    gaps = {r["guide"]: r["gap"] for r in joint_rows}
    lines = [
        f"Model `vae` (50 latents, 200-200 tanh), estimator `elbo`, batch 100, Adam lr 1e-3, seed {a.seed}, "
        f"{a.threads} CPU thread(s); the first {a.train_points} MNIST training images (dynamic binarization). "
        f"Test: the first {joint_rows[0]['test_points']} test images, IS with K={a.eval_samples}. Nats per "
        "image; ± is one standard error over test points; differences are paired over the same test points.", "",
        f"## 1. Joint training ({a.epochs} epochs): each guide trains its own model", "", *_table(joint_rows), "",
        f"iaf minus diagonal-normal: ELBO {je[0]:+.2f} ± {je[1]:.2f}, IS log-likelihood {jl[0]:+.2f} ± {jl[1]:.2f}. "
        "The IS-minus-ELBO gap, the bound's looseness on its own model, is "
        + ("smaller" if gaps["iaf"] < gaps["diagonal-normal"] else "not smaller")
        + f" for iaf ({gaps['iaf']:.2f} vs {gaps['diagonal-normal']:.2f}).", "",
        f"## 2. Same model: fresh guides fitted for {a.refit_epochs} epochs to the frozen model of run 1's "
        "diagonal-normal pair", "", *_table(refit_rows), "",
        f"iaf minus diagonal-normal on the same model: ELBO {re_[0]:+.2f} ± {re_[1]:.2f} "
        f"({'tighter' if re_[0] > 2 * re_[1] else 'looser' if re_[0] < -2 * re_[1] else 'no difference'} at 2 SE), "
        f"IS log-likelihood {rl[0]:+.2f} ± {rl[1]:.2f} (the same model, so only the proposal differs).", "",
        f"Command: `{command}`; wall time {time.perf_counter() - t_all:.0f} s on {joint_rows[0]['device']}.", ""]
    (results / "flow_guide_mnist.md").write_text("\n".join(lines))

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for guide, points in curves.items():
        ax1.plot(*zip(*points), marker="o", markersize=3, label=guide)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test ELBO (nats per image)")
    ax1.set_title("Joint training: test ELBO per epoch")
    ax1.grid(alpha=0.3)
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend()
    x = np.arange(2)
    for offset, (label, values) in ((-0.2, ("joint training", (je, jl))), (0.2, ("same model", (re_, rl)))):
        ax2.bar(x + offset, [v[0] for v in values], width=0.4, yerr=[v[1] for v in values], capsize=5, label=label)
    ax2.set_xticks(x, ["test ELBO", "test log-likelihood (IS)"])
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_ylabel("iaf minus diagonal-normal (nats per image)")
    ax2.set_title("Paired differences (± 1 SE)")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(results / "flow_guide_mnist.png", dpi=100)
    print((results / "flow_guide_mnist.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run())
