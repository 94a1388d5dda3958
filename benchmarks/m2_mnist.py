"""Semi-supervised M2 on MNIST: test accuracy of q(y|x) with 100 / 600 / 1000 / 3000 labels, over label draws.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/m2_mnist.py [--epochs 50] [--labels 100,600,1000,3000]
        [--draws 0,1,2] [--tag NAME] [--table-only]

Each (label count, draw) trains M2 (Kingma et al. 2014) with ``EnumELBO`` through ``pyro_vae.fit``, with the
architecture of Pyro's semi-supervised VAE tutorial (one hidden layer of 500 softplus units, 50 latent
dims, batch 200, classification-loss weight 46) on the first 50 000 MNIST training points; the last
10 000 are a validation set whose accuracy is logged but never used to pick anything. Draw ``s`` picks
the labeled points with ``balanced_subset(labels, n, seed=s)`` and seeds the run with ``s``.

After every epoch the accuracy of the mode of q(y|x) on all 10 000 test points (and on the validation
points) is appended to ``benchmarks/results/m2_runs/<tag>/labels<n>_draw<s>.csv``; the reported figure
is the test accuracy after the last epoch. Each run checkpoints into ``--out`` every epoch, so a killed
benchmark continues where it stopped when started again with the same options (finished runs are
skipped). Writes ``benchmarks/results/m2_mnist_<tag>.md/.csv`` and a PNG of accuracy against epochs.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from pyro_vae.analysis.evaluation import classification_accuracy
from pyro_vae.data import ArrayDataset, PartiallyLabeled, load_dataset
from pyro_vae.estimators import EnumELBO
from pyro_vae.guides import M2Guide
from pyro_vae.models import M2
from pyro_vae.training.checkpoint import latest_checkpoint
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit
from pyro_vae.training.run_dir import RunDir

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
# Pyro's tutorial (mean of 5 label draws), for reference, not a target this script can tune towards
PYRO_TUTORIAL = {100: 93.19, 600: 94.37, 1000: 94.87, 3000: 95.82}
TRAIN_POINTS = 50_000  # as in Pyro's example: the last 10 000 training points validate
FIELDS = ["epoch", "step", "train_elbo", "seconds", "test_acc", "valid_acc", "wall_s", "load1"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--labels", default="100,600,1000,3000")
    p.add_argument("--draws", default="0,1,2", help="label draws (seeds)")
    p.add_argument("--lr", type=float, default=0.00042)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--aux-weight", type=float, default=46.0)
    p.add_argument("--labeled-every", type=int, default=None, metavar="K",
                   help="a labeled batch after every K unlabeled ones, cycling the labeled points "
                        "(default: each labeled point once per epoch, as Pyro's example)")
    p.add_argument("--binarize", default="dynamic", choices=("dynamic", "static"),
                   help="dynamic: a fresh Bernoulli draw of the pixels per batch (default); static: one draw")
    p.add_argument("--tag", default="default", help="name of this configuration (results subfolder)")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench-m2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table and plot from the CSVs")
    return p.parse_args(argv)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(float(v)) if k in ("epoch", "step") else float(v)) if v not in ("", None) else None
                 for k, v in r.items()} for r in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def one_run(a: argparse.Namespace, n: int, draw: int, train_all: ArrayDataset, test: ArrayDataset) -> list[dict]:
    """Train (or continue) the run for n labels and label draw ``draw``; its rows, one per epoch."""
    csv_path = RESULTS / "m2_runs" / a.tag / f"labels{n}_draw{draw}.csv"
    run = RunDir(a.out / a.tag / f"labels{n}-draw{draw}")
    rows = read_rows(csv_path)
    resume = (run.path / "checkpoint.pt").exists()
    done = int(latest_checkpoint(run.path)["epoch"]) if resume else 0
    rows = [r for r in rows if r["epoch"] <= done]
    if done >= a.epochs:
        return rows
    train = PartiallyLabeled(train_all.head(TRAIN_POINTS), n, seed=draw, labeled_every=a.labeled_every)
    valid = ArrayDataset(train_all.data[TRAIN_POINTS:], train_all.labels[TRAIN_POINTS:], binarize=a.binarize,
                         image_shape=train_all.image_shape)
    net = {"x_dim": train.dim, "latent_dim": 50, "hidden": (500,), "activation": "softplus", "num_classes": 10}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(draw)
        model, guide = M2(M2.Config(**net)), M2Guide(M2Guide.Config(**net, aux_weight=a.aux_weight))
    config = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=draw, device=a.device)
    run.create(fresh=not resume)
    t0 = time.perf_counter() - (rows[-1]["wall_s"] if rows else 0.0)

    def on_epoch(row: dict) -> None:
        rows.append({**{k: row[k] for k in ("epoch", "step", "train_elbo", "seconds")},
                     "test_acc": 100 * classification_accuracy(model, guide, test, device=a.device),
                     "valid_acc": 100 * classification_accuracy(model, guide, valid, device=a.device),
                     "wall_s": time.perf_counter() - t0,
                     "load1": os.getloadavg()[0]})  # the machine's cores are shared: how busy they were
        write_rows(csv_path, rows)
        print(f"labels {n} draw {draw} epoch {row['epoch']}: test {rows[-1]['test_acc']:.2f}% "
              f"valid {rows[-1]['valid_acc']:.2f}% ({rows[-1]['wall_s']:.0f} s)", flush=True)

    fit(model, guide, EnumELBO(), train, None, config, run_dir=run, resume=resume, quiet=True, on_epoch=on_epoch,
        run_config={"benchmark": vars(a) | {"out": str(a.out)}, "labels": n, "draw": draw})
    return rows


def table(a: argparse.Namespace, counts: list[int], draws: list[int]) -> None:
    lines = [f"Configuration `{a.tag}`: lr {a.lr}, batch {a.batch_size}, aux weight {a.aux_weight}, "
             f"binarize {a.binarize}, labeled batch after every {a.labeled_every or 'N_unlabeled / N_labeled'} "
             f"unlabeled ones, {a.epochs} epochs.", "",
             "| labels | draws done | test accuracy after the last epoch (%), mean ± sd | min / max | "
             "Pyro tutorial (%) | minutes per run |", "|---|---|---|---|---|---|"]
    out_rows, curves = [], {}
    for n in counts:
        finals, minutes = [], []
        for s in draws:
            rows = read_rows(RESULTS / "m2_runs" / a.tag / f"labels{n}_draw{s}.csv")
            curves[(n, s)] = rows
            at = [r for r in rows if r["epoch"] == a.epochs]  # a run continued past --epochs counts at --epochs
            if at:
                finals.append(at[0]["test_acc"])
                minutes.append(at[0]["wall_s"] / 60)
        if not finals:
            continue
        sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        mean = statistics.mean(finals)
        lines.append(f"| {n} | {len(finals)} | {mean:.2f} ± {sd:.2f} | {min(finals):.2f} / {max(finals):.2f} | "
                     f"{PYRO_TUTORIAL.get(n, float('nan')):.2f} | {statistics.mean(minutes):.1f} |")
        out_rows.append({"labels": n, "draws": len(finals), "mean": mean, "sd": sd, "min": min(finals),
                         "max": max(finals), "pyro_tutorial": PYRO_TUTORIAL.get(n), "minutes": statistics.mean(minutes)})
    command = shlex.join(["python3", "dev.py", "shell-cmd", ".venv/bin/python", "benchmarks/m2_mnist.py", *sys.argv[1:]])
    (RESULTS / f"m2_mnist_{a.tag}.md").write_text("\n".join(lines) + f"\n\nCommand: `{command}`\n")
    if out_rows:
        with open(RESULTS / f"m2_mnist_{a.tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
            w.writeheader()
            w.writerows(out_rows)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    colors = dict(zip(counts, ["C0", "C1", "C2", "C3", "C4", "C5"]))
    for (n, s), rows in curves.items():
        rows = [r for r in rows if r["epoch"] <= a.epochs]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["test_acc"] for r in rows], color=colors[n], alpha=0.8,
                    label=f"{n} labels" if s == draws[0] else None)
    for n in counts:
        if n in PYRO_TUTORIAL:
            ax.axhline(PYRO_TUTORIAL[n], color=colors[n], linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"M2 on MNIST, {a.tag}: one line per label draw; dotted: Pyro tutorial")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / f"m2_mnist_{a.tag}.png", dpi=100)
    print((RESULTS / f"m2_mnist_{a.tag}.md").read_text())


def run(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)  # the benchmark machine's cores are shared; one thread per run
    counts = [int(s) for s in a.labels.split(",")]
    draws = [int(s) for s in a.draws.split(",")]
    if not a.table_only:
        train_all, test = load_dataset("mnist", "data", binarize=a.binarize, seed=0)
        for n in counts:
            for s in draws:
                one_run(a, n, s, train_all, test)
    table(a, counts, draws)
    return 0


if __name__ == "__main__":
    sys.exit(run())
