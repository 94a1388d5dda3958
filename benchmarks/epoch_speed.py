"""Whole training epochs through the public ``fit`` against a hand-written PyTorch epoch loop, alternated.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/epoch_speed.py [--train-points 10000] [--epochs 4]
        [--batch-sizes 20,100,128,1024] [--estimators elbo,analytic-kl,iwae:5,iwae:50,dreg:5,dreg:50]

For each (estimator, batch size): Burda et al.'s 1-layer VAE (784-200-200-50, tanh, Bernoulli decoder) on
the first ``--train-points`` MNIST training images, Adam lr 1e-3, trained twice from the same initial weights:

- ``fit``: ``pyro_vae.fit`` as a user calls it (the default fast path with its runtime audit, the progress
  bar, checks and bookkeeping; no test set, no run folder), ``--epochs`` epochs;
- ``hand-written``: the same networks in plain PyTorch (``plain_pytorch.py``), ``torch.optim.Adam`` (its
  defaults), the same pipeline as ``fit``'s (float32 images in memory, a fresh permutation each epoch, a
  fresh Bernoulli draw of every batch), ``loss.item()`` each step as any loop that logs its loss.

The two alternate epoch by epoch in one process: ``fit`` runs its epoch, then its ``on_epoch`` callback
runs one hand-written epoch, so both see the same machine load. ``fit``'s epoch is the wall clock from the
end of the previous callback to the start of the next (everything ``fit`` does in between); its first
epoch also counts from the call of ``fit`` (set-up, checks, the fast path's recording). Reported: images/s
of each, median over epochs 2.., the ratio ``fit`` / hand-written (above 1: ``fit`` is faster), and the
first epoch against the later ones. Writes benchmarks/results/epoch_speed.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_pytorch import PlainVAE, load_from_project  # noqa: E402

from pyro_vae import TrainConfig, fit  # noqa: E402
from pyro_vae.cli.runs import make_estimator  # noqa: E402
from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.estimators import ESTIMATORS  # noqa: E402
from pyro_vae.guides.diagonal_normal import DiagonalNormalGuide  # noqa: E402
from pyro_vae.models.bernoulli_vae import BernoulliVAE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def hand_written_epoch(plain: PlainVAE, opt: torch.optim.Optimizer, x: torch.Tensor, batch: int,
                       gen: torch.Generator, estimator: str, k: int) -> float:
    """One epoch; returns the mean loss per image."""
    order = torch.randperm(x.shape[0], generator=gen)
    total = 0.0
    for start in range(0, x.shape[0], batch):
        xb = torch.bernoulli(x[order[start:start + batch]], generator=gen)
        loss = plain.loss(estimator, k, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / x.shape[0]


def one(name: str, k: int, batch: int, train, epochs: int, lr: float) -> list[dict]:
    torch.manual_seed(0)
    model, guide = BernoulliVAE(), DiagonalNormalGuide()
    plain = load_from_project(PlainVAE(), model, guide)
    opt = torch.optim.Adam(plain.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    options = {"num_particles": k} if "num_particles" in ESTIMATORS[name].__dataclass_fields__ else {}
    estimator = make_estimator(ESTIMATORS, name, options)
    rows: list[dict] = []
    mark = {"t": time.perf_counter()}

    def on_epoch(row: dict) -> None:
        fit_s = time.perf_counter() - mark["t"]
        t = time.perf_counter()
        hand_loss = hand_written_epoch(plain, opt, train.data, batch, gen, name, k)
        hand_s = time.perf_counter() - t
        rows.append({"estimator": name, "k": k, "batch": batch, "epoch": row["epoch"], "fit_s": fit_s,
                     "fit_steps_s": row["seconds"], "hand_s": hand_s, "fit_loss": -row["train_elbo"],
                     "hand_loss": hand_loss, "images": len(train)})
        mark["t"] = time.perf_counter()

    fit(model, guide, estimator, train, None, TrainConfig(epochs=epochs, batch_size=batch, lr=lr), quiet=True,
        on_epoch=on_epoch)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-points", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-sizes", default="20,100,128,1024")
    p.add_argument("--estimators", default="elbo,analytic-kl,iwae:5,iwae:50,dreg:5,dreg:50")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=str(RESULTS / "epoch_speed"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train, _ = load_dataset(a.dataset, a.data_root)
    train = train.head(a.train_points)
    configs = []
    for item in a.estimators.split(","):
        name, _, k = item.partition(":")
        configs.append((name, int(k or 1)))
    rows = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        for name, k in configs:
            rows += one(name, k, batch, train, a.epochs, a.lr)
            r = rows[-1]
            print(f"{name} k={k} batch {batch}: epoch {r['epoch']} fit {r['fit_s']:.2f} s, hand {r['hand_s']:.2f} s",
                  file=sys.stderr, flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = []
    for key in dict.fromkeys((r["estimator"], r["k"], r["batch"]) for r in rows):
        sel = [r for r in rows if (r["estimator"], r["k"], r["batch"]) == key]
        later = sel[1:]
        n = sel[0]["images"]
        fit_ips = statistics.median(n / r["fit_s"] for r in later)
        hand_ips = statistics.median(n / r["hand_s"] for r in later)
        ratios = [r["hand_s"] / r["fit_s"] for r in later]
        summary.append({"key": key, "fit_ips": fit_ips, "hand_ips": hand_ips, "ratio": statistics.median(ratios),
                        "ratio_lo": min(ratios), "ratio_hi": max(ratios),
                        "first_over_later": sel[0]["fit_s"] / statistics.median(r["fit_s"] for r in later)})
    command = "python3 dev.py shell-cmd .venv/bin/python benchmarks/epoch_speed.py " + " ".join(sys.argv[1:])
    lines = [f"Whole epochs, {a.train_points} MNIST images, {a.epochs} epochs per run (epoch 1 excluded from the "
             f"ratios), {a.threads} thread(s), {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}. Ratio: hand-written epoch seconds / `fit` epoch seconds, median over epochs "
             "2.. (above 1: `fit` is faster); [min, max] over those epochs.", "",
             "| estimator | K | batch | `fit` img/s | hand-written img/s | ratio [min, max] | `fit` epoch 1 / later |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        name, k, batch = s["key"]
        lines.append(f"| {name} | {k} | {batch} | {s['fit_ips']:.0f} | {s['hand_ips']:.0f} | {s['ratio']:.2f} "
                     f"[{s['ratio_lo']:.2f}, {s['ratio_hi']:.2f}] | {s['first_over_later']:.2f} |")
    lines += ["", f"Command: `{command}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    labels = [f"{n}{'' if k == 1 else f' K={k}'}, b{b}" for n, k, b in (s["key"] for s in summary)]
    ax.barh(labels, [s["ratio"] for s in summary], xerr=[[s["ratio"] - s["ratio_lo"] for s in summary],
                                                        [s["ratio_hi"] - s["ratio"] for s in summary]])
    ax.axvline(1.0, color="k", linewidth=1)
    ax.set_xlabel("hand-written epoch s / fit epoch s (above 1: fit faster)")
    ax.set_title("Whole epochs: fit against a hand-written loop")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
