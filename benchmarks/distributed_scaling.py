"""Scaling: training and IS evaluation on 1 process against N processes (torchrun, gloo on CPU, NCCL on GPUs).

    python3 dev.py shell-cmd .venv/bin/python benchmarks/distributed_scaling.py [--processes 2] [--device cpu]

Each process gets one CPU thread (OMP_NUM_THREADS=1), so N processes use N cores; the one-process run
with N threads is listed too, as the other way to use the same cores. Training throughput is read
from the run's metrics (epochs after the first, which records the replayed graphs); evaluation time
from evaluation.json (the evaluation alone, no start-up). Scaling efficiency = speed-up / N.
Writes benchmarks/results/distributed_scaling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "pyro_vae"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "pyro_vae"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=Path("data"), help="MNIST cache folder")
    p.add_argument("--train-points", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-sizes", default="128,1024")
    p.add_argument("--eval-points", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=1000)
    a = p.parse_args()
    n = a.processes
    t0 = time.perf_counter()
    setups = [("1 process, 1 thread", 1, 1), (f"{n} processes, 1 thread each", n, 1),
              (f"1 process, {n} threads", 1, n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in [int(v) for v in a.batch_sizes.split(",")]:
            for name, procs, threads in setups:
                out = Path(tmp) / f"b{b}-{procs}-{threads}"
                run([*launcher(procs), "train", "--data-root", str(a.data), "--train-points", str(a.train_points),
                     "--test-points", str(a.eval_points), "--epochs", str(a.epochs), "--batch-size", str(b),
                     "--device", a.device, "--eval-samples", str(a.eval_samples), "--quiet", "--out", str(out)],
                    threads)
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                speed = statistics.median(r["images_per_s"] for r in metrics[1:])
                evaluation = json.loads((out / "evaluation.json").read_text())
                rows.append({"batch": b, "setup": name, "processes": procs, "threads": threads,
                             "train_images_per_s": speed, "eval_s": evaluation["seconds"],
                             "log_likelihood": evaluation["log_likelihood"]})
                shutil.rmtree(out)
    lines = ["# Scaling across processes\n",
             f"Device {a.device}; {a.train_points} MNIST training points, {a.epochs} epochs (the first, which records "
             f"the replayed graphs, is left out); IS evaluation with K={a.eval_samples} on {a.eval_points} test points.  ",
             f"Command: `python3 dev.py shell-cmd .venv/bin/python benchmarks/distributed_scaling.py "
             f"{' '.join(sys.argv[1:])}`; wall time {(time.perf_counter() - t0) / 60:.1f} min.\n",
             "| global batch | setup | train img/s | speed-up vs 1 process, 1 thread | scaling efficiency | "
             "eval s | eval speed-up | log p(x) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["processes"] == 1 and x["threads"] == 1)
        up, eup = r["train_images_per_s"] / base["train_images_per_s"], base["eval_s"] / r["eval_s"]
        cores = r["processes"] * r["threads"]
        lines.append(f"| {r['batch']} | {r['setup']} | {r['train_images_per_s']:.0f} | {up:.2f}x | "
                     f"{up / cores:.2f} | {r['eval_s']:.1f} | {eup:.2f}x | {r['log_likelihood']:.3f} |")
    lines.append(f"\nEach rank draws its latent samples from its own stream (seed + rank), so a {n}-process run trains "
                 f"other weights than the 1-process run and its log p(x) differs by more than rounding; a deterministic "
                 f"model ends where the 1-process run on the combined batch ends, and the evaluation of a given "
                 f"checkpoint is identical on 1 or {n} processes (both pinned by tests/test_distributed.py).")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("distributed_scaling.md" if a.device == "cpu" else "distributed_scaling_cuda.md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
