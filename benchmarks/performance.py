"""Performance: the project's training and evaluation paths against the same computation in plain PyTorch.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/performance.py [--device cuda] [--quick]

Every figure is a ratio to a plain-PyTorch reference of the same model (``plain_pytorch.py``: the same
networks, weights and random draws), measured in the same process, interleaved, median over repeats.
Training rows: images/s of a full optimizer step for each estimator and batch size, Burda et al.'s
1-layer architecture on binarized MNIST. At batch 128 the ELBO row is also taken apart: Pyro's SVI
with validation on (Pyro's default), validation off, SharedAdam, and the replayed loss. Evaluation:
importance-sampled log p(x) with K = 5000 over the 10k test set, wall time and peak memory (each
evaluator in a process of its own), plus cost against K. Writes benchmarks/results/performance.{md,csv}
and plots.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_pytorch import PlainVAE, load_from_project  # noqa: E402

from pyro_vae.analysis.evaluation import evaluate  # noqa: E402
from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.estimators import ESTIMATORS  # noqa: E402
from pyro_vae.guides.diagonal_normal import DiagonalNormalGuide  # noqa: E402
from pyro_vae.models.bernoulli_vae import BernoulliVAE  # noqa: E402
from pyro_vae.training.optim import SharedAdam  # noqa: E402
from pyro_vae.training.replay import Replayed, ReplaySVI  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CONFIGS = [("elbo", 1), ("analytic-kl", 1), ("iwae", 5), ("iwae", 50), ("dreg", 5), ("dreg", 50)]
BATCHES = (20, 128, 1024)
ABLATION = ("eager", "eager, validation off", "+ SharedAdam", "project", "project + torch.compile",
            "plain + torch.compile")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
                f"pyro {pyro.__version__}")
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, pyro {pyro.__version__}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One way of taking a training step, with its own parameter store scope."""

    def __init__(self, kind: str, estimator: str, k: int, device: torch.device, seed: int = 0) -> None:
        self.kind = kind
        torch.manual_seed(seed)
        model, guide = BernoulliVAE().to(device), DiagonalNormalGuide().to(device)
        self.model, self.guide = model, guide
        opts = {"num_particles": k} if estimator in ("iwae", "dreg") else {}
        if kind.startswith("plain"):
            self.plain = load_from_project(PlainVAE().to(device), model, guide)
            self.opt = torch.optim.Adam(self.plain.parameters(), lr=1e-3)
            self.loss = lambda x: self.plain.loss(estimator, k, x)
            if kind == "plain + torch.compile":
                # per-compile option, not the process-wide inductor config: the eager kernels' random numbers
                self.loss = torch.compile(self.loss, options={"fallback_random": True})
            return
        est = ESTIMATORS[estimator](**opts)
        if kind.startswith("eager"):
            self.svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=est)
        elif kind == "+ SharedAdam":
            self.svi = ReplaySVI(model, guide, SharedAdam({"lr": 1e-3}), est)
        else:
            self.svi = ReplaySVI(model, guide, SharedAdam({"lr": 1e-3}), Replayed(est, compile="compile" in kind))
        self.validate = kind == "eager"
        self.scope = {"params": {}, "constraints": {}}

    def run(self, batches: list[torch.Tensor], n: int) -> None:
        if self.kind.startswith("plain"):
            for i in range(n):
                self.opt.zero_grad()
                loss = self.loss(batches[i % len(batches)])
                loss.backward()
                self.opt.step()
                loss.item()
            return
        with pyro.get_param_store().scope(self.scope), pyro.validation_enabled(self.validate):
            for i in range(n):
                self.svi.step(batches[i % len(batches)])


def loss_agreement(estimator: str, k: int, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """The project's loss and the reference's on the same batch, weights and seed."""
    torch.manual_seed(0)
    model, guide = BernoulliVAE().to(device), DiagonalNormalGuide().to(device)
    plain = load_from_project(PlainVAE().to(device), model, guide)
    est = ESTIMATORS[estimator](**({"num_particles": k} if estimator in ("iwae", "dreg") else {}))
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        est(model, guide, x)  # lazy set-up (plate nesting) draws from the prior: not part of the loss
        torch.manual_seed(1)
        ours = float(est(model, guide, x).detach())
    torch.manual_seed(1)
    return ours, float(plain.loss(estimator, k, x).detach())


def training(data, device: torch.device, repeats: int, min_seconds: float, batches_sizes, configs,
             compile: bool = True, deadline: float = math.inf) -> list[dict]:
    """The training rows; ``compile=False`` leaves out the torch.compile contenders (their compilation
    takes most of a short run). Jobs not started by ``deadline`` (a time.perf_counter() value) are skipped."""
    rows = []
    jobs = [(e, k, b) for e, k in configs for b in batches_sizes]
    for estimator, k, b in tqdm(jobs, desc="training rows", file=sys.stderr):
        if time.perf_counter() > deadline:
            print(f"training rows: out of time, skipped {estimator} k={k} batch {b}", file=sys.stderr)
            continue
        gen = torch.Generator().manual_seed(0)
        batches = [x for x, _ in data.batches(b, shuffle=True, generator=gen, device=device)][:4]
        kinds = ["plain", *(ABLATION if (estimator, b) == ("elbo", 128) else
                            ("eager", "project", "project + torch.compile"))]
        if not compile:
            kinds = [kind for kind in kinds if "compile" not in kind]
        contenders = [Contender(kind, estimator, k, device) for kind in kinds]
        for c in contenders:
            c.run(batches, 3)  # first call eager, second recorded, third replayed
        sync(device)
        t0 = time.perf_counter()
        contenders[0].run(batches, 1)
        sync(device)
        n = max(2, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        times = {c.kind: [] for c in contenders}
        for _ in range(repeats):
            for c in contenders:
                sync(device)
                t = time.perf_counter()
                c.run(batches, n)
                sync(device)
                times[c.kind].append((time.perf_counter() - t) / n)
        ours, ref = loss_agreement(estimator, k, batches[0], device)
        plain_t = statistics.median(times["plain"])
        for kind, ts in times.items():
            t = statistics.median(ts)
            rows.append({"estimator": estimator, "k": k, "batch": b, "path": kind, "images_per_s": b / t,
                         "step_ms": 1e3 * t, "ratio_to_plain": plain_t / t, "steps_timed": n, "repeats": repeats,
                         "loss_project": ours, "loss_plain": ref})
    return rows


def _peak_rss_mb(reset: bool = False) -> float:
    """Peak resident memory of this process (VmHWM); ``reset`` starts a new peak from the current size."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def eval_worker(args) -> None:
    """One evaluator in a process of its own: prints JSON with its seconds, peak RSS and mean log p(x)."""
    device = torch.device(args.device)
    train, test = load_dataset(args.dataset, args.data_root)
    del train
    test = test.head(args.points) if args.points < len(test) else test
    torch.manual_seed(0)
    model, guide = BernoulliVAE().to(device), DiagonalNormalGuide().to(device)
    x0 = next(test.batches(100, shuffle=False, generator=torch.Generator().manual_seed(0), device=device))[0]
    evaluate(model, guide, test.head(1), num_samples=2, device=device, quiet=True)  # lazy set-up, warm-up
    before = _peak_rss_mb(reset=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t = time.perf_counter()
    if args.eval_worker == "project":
        ll = evaluate(model, guide, test, num_samples=args.k, batch_size=100, device=device, seed=0,
                      quiet=True).log_likelihood
    else:
        plain = load_from_project(PlainVAE().to(device), model, guide)
        gen = torch.Generator().manual_seed(0)
        parts = []
        for i, (x, _) in enumerate(test.batches(100, shuffle=False, generator=gen, device=device)):
            torch.manual_seed(int(np.random.SeedSequence([0, i]).generate_state(1)[0]))  # evaluate's seeding
            parts.append(plain.log_likelihood(x, args.k).cpu())
        ll = torch.cat(parts).numpy()
    sync(device)
    seconds = time.perf_counter() - t
    peak = _peak_rss_mb()
    out = {"seconds": seconds, "rss_peak_mb": peak, "rss_growth_mb": peak - before,
           "log_likelihood": float(np.mean(ll)), "first": float(ll[0]), "points": len(test), "k": args.k}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del x0
    print(json.dumps(out))


def run_eval(kind: str, k: int, points: int, a, timeout: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--eval-worker", kind, "--k", str(k), "--points", str(points),
           "--device", a.device, "--dataset", a.dataset, "--data-root", a.data_root]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
    return {"evaluator": kind, **json.loads(done.stdout.strip().splitlines()[-1])}


def evaluation(a) -> list[dict]:
    rows = []
    jobs = [(k, a.eval_points_sweep, r) for r in range(a.repeats_sweep) for k in a.k_sweep]
    jobs += [(a.eval_k, a.eval_points, r) for r in range(a.repeats_full)]
    for k, points, r in tqdm(jobs, desc="evaluation runs", file=sys.stderr):
        for kind in ("plain", "project"):
            rows.append({**run_eval(kind, k, points, a), "repeat": r})
    return rows


MEMORY = {"cuda_peak_mb": "peak CUDA memory allocated (torch.cuda.max_memory_allocated)",
          "rss_growth_mb": "growth of the process's peak RSS"}


def memory_key(rows: list[dict]) -> str:
    """What the memory figure of evaluation rows is: on a GPU the evaluation's tensors live in device memory,
    so host RSS says nothing about them and the CUDA allocator's peak is reported instead."""
    def has(r):
        v = r.get("cuda_peak_mb")
        return v is not None and v == v and v != ""
    return "cuda_peak_mb" if rows and all(has(r) for r in rows) else "rss_growth_mb"


def summarize_eval(rows: list[dict]) -> list[dict]:
    out = []
    for k, points in sorted({(r["k"], r["points"]) for r in rows}):
        sel = {kind: [r for r in rows if (r["k"], r["points"], r["evaluator"]) == (k, points, kind)]
               for kind in ("plain", "project")}
        med = {kind: statistics.median(r["seconds"] for r in rs) for kind, rs in sel.items()}
        key = memory_key([r for rs in sel.values() for r in rs])
        mem = {kind: max(r[key] for r in rs) for kind, rs in sel.items()}
        out.append({"k": k, "points": points, "plain_s": med["plain"], "project_s": med["project"],
                    "time_ratio": med["project"] / med["plain"], "memory": key, "plain_mem_mb": mem["plain"],
                    "project_mem_mb": mem["project"], "repeats": len(sel["plain"]),
                    "ll_plain": sel["plain"][0]["log_likelihood"], "ll_project": sel["project"][0]["log_likelihood"]})
    return out


def plots(train_rows: list[dict], eval_summary: list[dict], prefix: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{e}" + (f" k={k}" if e in ("iwae", "dreg") else "") for e, k in CONFIGS]
    width = 0.8 / len(BATCHES)
    for j, b in enumerate(BATCHES):
        vals = [next((r["ratio_to_plain"] for r in train_rows if (r["estimator"], r["k"], r["batch"], r["path"])
                      == (e, k, b, "project")), np.nan) for e, k in CONFIGS]
        ax.bar(np.arange(len(CONFIGS)) + j * width, vals, width, label=f"batch {b}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="r", lw=0.8, ls="--", label="target 0.95")
    ax.set_xticks(np.arange(len(CONFIGS)) + width, labels)
    ax.set_ylabel("training throughput / plain PyTorch")
    ax.set_title("Project training step (replayed loss + SharedAdam) vs plain PyTorch")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(f"{prefix}_training_ratio.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (e, k) in enumerate(CONFIGS):
        for path, style, marker in (("plain", "--", "s"), ("project", "-", "o")):
            ys = [next((r["images_per_s"] for r in train_rows if (r["estimator"], r["k"], r["batch"], r["path"])
                        == (e, k, b, path)), np.nan) for b in BATCHES]
            ax.plot(BATCHES, ys, style, marker=marker, color=f"C{i}", label=f"{e}{f' k={k}' if k > 1 else ''} {path}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("training images/s")
    ax.set_title("Training cost against batch size")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{prefix}_cost_vs_batch.png", dpi=120)
    plt.close(fig)

    sweep = [r for r in eval_summary if r["points"] == min(x["points"] for x in eval_summary)]
    if sweep:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
        ks = [r["k"] for r in sweep]
        for key, label in (("plain", "plain PyTorch"), ("project", "project")):
            a1.plot(ks, [1e3 * r[f"{key}_s"] / r["points"] for r in sweep], marker="o", label=label)
            a2.plot(ks, [r[f"{key}_mem_mb"] for r in sweep], marker="o", label=label)
        for ax in (a1, a2):
            ax.set_xscale("log")
            ax.set_xlabel("K (importance samples per point)")
            ax.legend(fontsize=8)
        a1.set_yscale("log")
        a1.set_ylabel("ms per data point")
        a1.set_title(f"IS log p(x) time against K ({sweep[0]['points']} points)")
        a2.set_ylabel("peak CUDA memory (MB)" if sweep[0]["memory"] == "cuda_peak_mb" else "peak RSS growth (MB)")
        a2.set_title("peak memory (chunks of 20k particles)")
        fig.tight_layout()
        fig.savefig(f"{prefix}_cost_vs_k.png", dpi=120)
        plt.close(fig)


def markdown(train_rows, eval_summary, device, command, wall) -> str:
    lines = ["# Performance against plain PyTorch\n", f"Machine: {machine(device)}.  ",
             f"Command: `{command}`; wall time {wall / 60:.1f} min.\n",
             "Ratios are plain-PyTorch time / project time (training: throughput ratio, higher is better), "
             "medians over interleaved repeats in one process.\n",
             "## Training (images/s, 1-layer Burda architecture, binarized MNIST)\n",
             "Project = the trainer's default path (replayed loss + SharedAdam); eager = `SVI` + `pyro.optim.Adam` "
             "with Pyro's default validation; compile = `--compile`. Epoch = 60k images at the project's speed.\n",
             "| estimator | batch | plain img/s | project img/s | ratio | epoch s | eager Pyro ratio | "
             "project + compile ratio | loss project | loss plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e, k in CONFIGS:
        for b in BATCHES:
            sel = {r["path"]: r for r in train_rows if (r["estimator"], r["k"], r["batch"]) == (e, k, b)}
            if not sel:
                continue
            p, o, g, c = sel["plain"], sel["project"], sel["eager"], sel.get("project + torch.compile")
            name = e + (f" k={k}" if e in ("iwae", "dreg") else "")
            compiled = f"{c['ratio_to_plain']:.3f}" if c else "not run"
            lines.append(f"| {name} | {b} | {p['images_per_s']:.0f} | {o['images_per_s']:.0f} | "
                         f"**{o['ratio_to_plain']:.3f}** | {60000 / o['images_per_s']:.1f} | {g['ratio_to_plain']:.3f} | "
                         f"{compiled} | {o['loss_project']:.4f} | {o['loss_plain']:.4f} |")
    abl = [r for r in train_rows if (r["estimator"], r["batch"]) == ("elbo", 128)]
    if abl:
        lines += ["", "## What each step bought (elbo, batch 128)\n", "| path | ms/step | ratio to plain |",
                  "|---|---|---|"]
        lines += [f"| {r['path']} | {r['step_ms']:.3f} | {r['ratio_to_plain']:.3f} |" for r in abl]
    pairs = [(e, k, b) for e, k in CONFIGS if e == "dreg" for b in BATCHES]
    dreg_vs_iwae = []
    for _, k, b in pairs:
        t = {e: next((r["step_ms"] for r in train_rows if (r["estimator"], r["k"], r["batch"], r["path"])
                      == (e, k, b, "project")), None) for e in ("iwae", "dreg")}
        if None not in t.values():
            dreg_vs_iwae.append(f"k={k}, batch {b}: {t['dreg'] / t['iwae']:.3f}")
    if dreg_vs_iwae:
        lines += ["", "dreg step time / iwae step time (project): " + "; ".join(dreg_vs_iwae) + "."]
    if eval_summary:
        memory = eval_summary[0]["memory"]
        lines += ["", "## Evaluation: importance-sampled log p(x)\n",
                  f"Each evaluator runs in a fresh process; memory (`{memory}`) is the {MEMORY[memory]} "
                  "during the evaluation.\n",
                  "| K | points | plain s | project s | time ratio (project/plain) | plain MB | project MB | "
                  "log p(x) plain | log p(x) project | repeats |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in eval_summary:
            lines.append(f"| {r['k']} | {r['points']} | {r['plain_s']:.2f} | {r['project_s']:.2f} | "
                         f"**{r['time_ratio']:.3f}** | {r['plain_mem_mb']:.0f} | {r['project_mem_mb']:.0f} | "
                         f"{r['ll_plain']:.4f} | {r['ll_project']:.4f} | {r['repeats']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default="mnist", help="a dataset name; the networks expect 784 values per point")
    p.add_argument("--data-root", default="data")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer rows, repeats and points")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.3, help="time each timed block at least this long")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--repeats-full", type=int, default=1)
    p.add_argument("--k-sweep", default="1,10,100,1000,5000")
    p.add_argument("--eval-points-sweep", type=int, default=500)
    p.add_argument("--repeats-sweep", type=int, default=3)
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--reuse-eval", action="store_true",
                   help="take the evaluation rows from the last run's results/performance_eval.csv")
    p.add_argument("--eval-worker", choices=("plain", "project"), help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=5000, help=argparse.SUPPRESS)
    p.add_argument("--points", type=int, default=10000, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.eval_worker:
        eval_worker(a)
        return 0
    a.k_sweep = [int(k) for k in a.k_sweep.split(",")]
    batches, configs = BATCHES, CONFIGS
    if a.quick:
        a.repeats, a.min_seconds, a.eval_points, a.eval_k, a.repeats_sweep = 3, 0.1, 500, 500, 1
        a.k_sweep, a.eval_points_sweep = [1, 100], 200
        batches, configs = (128,), [("elbo", 1), ("iwae", 5), ("dreg", 5)]
    device = torch.device(a.device)
    t0 = time.perf_counter()
    train, _ = load_dataset(a.dataset, a.data_root)
    train_rows = training(train, device, a.repeats, a.min_seconds, batches, configs)
    if a.reuse_eval:
        with open(RESULTS / "performance_eval.csv") as f:
            eval_rows = [{k: (v if k == "evaluator" else float(v) if v != "" else None) for k, v in r.items()}
                         for r in csv.DictReader(f)]
        for r in eval_rows:
            r["k"], r["points"] = int(r["k"]), int(r["points"])
    else:
        eval_rows = [] if a.skip_eval else evaluation(a)
    eval_summary = summarize_eval(eval_rows) if eval_rows else []
    RESULTS.mkdir(exist_ok=True)
    tag = "performance" if device.type == "cpu" else "performance_cuda"
    if a.quick:
        tag += "_quick"
    command = " ".join(["python3 dev.py shell-cmd .venv/bin/python benchmarks/performance.py", *sys.argv[1:]])
    md = markdown(train_rows, eval_summary, device, command, time.perf_counter() - t0)
    (RESULTS / f"{tag}.md").write_text(md)
    with open(RESULTS / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(train_rows[0]))
        w.writeheader()
        w.writerows(train_rows)
    if eval_rows and not a.reuse_eval:
        with open(RESULTS / f"{tag}_eval.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in eval_rows for k in r}))
            w.writeheader()
            w.writerows(eval_rows)
    plots(train_rows, eval_summary, RESULTS / tag)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
