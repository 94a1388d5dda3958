"""Epoch-by-epoch test accuracy of Pyro's example and of pyro-vae's M2 runs, from their CSVs.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/m2_side_by_side.py --labels 3000 --draw 0 \\
        --pyro pyro_labels3000_seed0_samelabels,pyro_labels3000_seed0_samelabels_binarized --ours matched

``--pyro`` names CSVs in ``benchmarks/results/m2_anchor/`` (written by ``m2_pyro_example.py``), ``--ours``
configuration tags of ``m2_mnist.py`` (``benchmarks/results/m2_runs/<tag>/labels<n>_draw<s>.csv``). Writes
``benchmarks/results/m2_side_by_side_labels<n>.md`` and ``.png``. Nothing is trained here.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

from matplotlib.figure import Figure

RESULTS = Path(__file__).resolve().parent / "results"


def read(path: Path) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(float(r["epoch"])): float(r["test_acc"]) for r in csv.DictReader(f)}


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", type=int, required=True)
    p.add_argument("--draw", type=int, default=0)
    p.add_argument("--pyro", default="", help="comma-separated CSV names in results/m2_anchor (no .csv), each NAME or NAME=LABEL")
    p.add_argument("--ours", default="", help="comma-separated m2_mnist.py tags, each TAG or TAG=LABEL")
    p.add_argument("--epochs", type=int, default=None, help="only the first N epochs")
    a = p.parse_args()
    series = {}
    for item in filter(None, a.pyro.split(",")):
        name, _, label = item.partition("=")
        series[f"Pyro example: {label or name}"] = read(RESULTS / "m2_anchor" / f"{name}.csv")
    for item in filter(None, a.ours.split(",")):
        tag, _, label = item.partition("=")
        series[f"pyro-vae: {label or tag}"] = read(RESULTS / "m2_runs" / tag / f"labels{a.labels}_draw{a.draw}.csv")
    last = max(max(s) for s in series.values())
    epochs = range(1, min(last, a.epochs or last) + 1)
    lines = ["| epoch | " + " | ".join(series) + " |", "|---" * (len(series) + 1) + "|"]
    for e in epochs:
        lines.append(f"| {e} | " + " | ".join(f"{s[e]:.2f}" if e in s else "" for s in series.values()) + " |")
    command = shlex.join(["python3", "dev.py", "shell-cmd", ".venv/bin/python", "benchmarks/m2_side_by_side.py", *sys.argv[1:]])
    out = RESULTS / f"m2_side_by_side_labels{a.labels}"
    out.with_suffix(".md").write_text(f"Test accuracy (%) after each epoch, {a.labels} labels, draw {a.draw}.\n\n"
                                      + "\n".join(lines) + f"\n\nCommand: `{command}`\n")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, s in series.items():
        xs = [e for e in epochs if e in s]
        ax.plot(xs, [s[e] for e in xs], marker="o" if name.startswith("Pyro") else "s",
                linestyle="--" if name.startswith("Pyro") else "-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"M2, {a.labels} labels (draw {a.draw}): Pyro's example beside pyro-vae")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run())
