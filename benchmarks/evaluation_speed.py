"""The IS evaluation's speed: ``evaluate`` against the best hand-written evaluator, and both against the GEMM floor.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/evaluation_speed.py [--points 200] [--k 5000] [--repeats 5]

Burda et al.'s 1-layer VAE (784-200-200-50, tanh, Bernoulli decoder), the same weights for every contender
(``plain_pytorch.py`` copies the project's networks), on the first ``--points`` MNIST test images
(binarized once), importance-sampled log p(x) with K = ``--k`` draws. The cost of an evaluation does not
depend on what the weights are, so the networks are not trained. In one process, interleaved, ``--repeats``
rounds, each contender once per round in a shuffled order; reported: the median seconds, and ratios of
medians.

- ``evaluate``: the public function with its defaults (chunks of ``CHUNK`` particle-points);
- ``evaluate, chunks of 20000``: the same with the former default chunk;
- ``hand-written``: log p(x) in plain PyTorch (no Pyro): for each group of points, K draws in chunks of
  particles x points, logsumexp in float64. Its chunk shape (points per group, particles per chunk) is
  tuned first on this CPU: every shape of the grid is timed twice and the fastest is kept;
- ``GEMM floor``: only the matrix products of that hand-written evaluator at its tuned shape (encoder
  once per group, the decoder's three layers per chunk): no activations, no sampling, no log-densities.

Writes benchmarks/results/evaluation_speed.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_pytorch import PlainVAE, load_from_project  # noqa: E402

from pyro_vae.analysis.evaluation import CHUNK, evaluate  # noqa: E402
from pyro_vae.data import ArrayDataset, load_dataset  # noqa: E402
from pyro_vae.guides.diagonal_normal import DiagonalNormalGuide  # noqa: E402
from pyro_vae.models.bernoulli_vae import BernoulliVAE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (points per group, particles per chunk) of the hand-written evaluator's grid
GRID = [(1, 500), (1, 1000), (1, 2500), (2, 1000), (5, 400), (10, 100), (10, 200), (10, 500), (20, 250),
        (50, 100), (100, 50), (100, 200)]


@torch.no_grad()
def hand_written(plain: PlainVAE, x: torch.Tensor, k: int, points: int, particles: int) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], points):
        xs = x[i:i + points]
        q = plain._q(xs)
        lse = torch.full((xs.shape[0],), -math.inf, dtype=torch.float64)
        done = 0
        while done < k:
            n = min(particles, k - done)
            z = q.rsample((n,))
            lw = plain._log_prior(z) + plain._log_px_z(xs, z) - q.log_prob(z).sum(-1)
            lse = torch.logaddexp(lse, torch.logsumexp(lw.double(), 0))
            done += n
        out.append(lse - math.log(k))
    return torch.cat(out)


@torch.no_grad()
def gemm_floor(plain: PlainVAE, x: torch.Tensor, k: int, points: int, particles: int) -> None:
    enc = [m for m in plain.encoder.modules() if isinstance(m, torch.nn.Linear)]
    dec = [m for m in plain.decoder.modules() if isinstance(m, torch.nn.Linear)]
    for i in range(0, x.shape[0], points):
        h = x[i:i + points]
        for m in enc:
            h = torch.addmm(m.bias, h, m.weight.t())
        z = torch.empty(min(particles, k) * h.shape[0], dec[0].in_features)
        done = 0
        while done < k:
            n = min(particles, k - done)
            a = z[: n * h.shape[0]]
            for m in dec:
                a = torch.addmm(m.bias, a, m.weight.t())
            done += n


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default="data")
    p.add_argument("--also-chunks", default="", help="comma-separated chunk sizes to time as extra contenders")
    p.add_argument("--out", default=str(RESULTS / "evaluation_speed"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    _, test = load_dataset(a.dataset, a.data_root)
    images = test.head(a.points)
    x = next(images.batches(a.points, shuffle=False, generator=torch.Generator().manual_seed(0)))[0]
    data = ArrayDataset(x, binarize="none")  # the same binarized images for every contender
    torch.manual_seed(0)
    model, guide = BernoulliVAE(), DiagonalNormalGuide()
    plain = load_from_project(PlainVAE(), model, guide).eval()

    tune_k = min(a.k, 1000)
    tuning = {shape: min(timed(lambda s=shape: hand_written(plain, x, tune_k, *s)) for _ in range(2)) for shape in GRID}
    best = min(tuning, key=tuning.get)

    results: dict[str, dict] = {}
    contenders = {
        "evaluate": lambda: evaluate(model, guide, data, num_samples=a.k, quiet=True).log_likelihood,
        "evaluate, chunks of 20000": lambda: evaluate(model, guide, data, num_samples=a.k, quiet=True,
                                                      max_particles_per_chunk=20000).log_likelihood,
        **{f"evaluate, chunks of {c}": (lambda c=c: evaluate(model, guide, data, num_samples=a.k, quiet=True,
                                                              max_particles_per_chunk=c).log_likelihood)
           for c in map(int, filter(None, a.also_chunks.split(",")))},
        "hand-written": lambda: hand_written(plain, x, a.k, *best).numpy(),
        "GEMM floor": lambda: gemm_floor(plain, x, a.k, *best),
    }
    times = {name: [] for name in contenders}
    order = list(contenders)
    rng = random.Random(0)
    for _ in range(a.repeats):
        rng.shuffle(order)
        for name in order:
            t = time.perf_counter()
            out = contenders[name]()
            times[name].append(time.perf_counter() - t)
            if out is not None:
                results[name] = {"mean_log_likelihood": float(np.mean(out))}
    med = {name: statistics.median(v) for name, v in times.items()}
    ev, hw, floor = med["evaluate"], med["hand-written"], med["GEMM floor"]
    summary = {
        "points": a.points, "k": a.k, "repeats": a.repeats, "threads": a.threads, "chunk": CHUNK,
        "hand_written_shape": {"points": best[0], "particles": best[1]},
        "tuning_seconds_at_k": tune_k, "tuning": {f"{pt}x{pa}": s for (pt, pa), s in tuning.items()},
        "seconds": times, "median_seconds": med, "log_likelihood": results,
        "evaluate_over_hand_written": ev / hw, "hand_written_over_gemm_floor": hw / floor,
        "evaluate_over_gemm_floor": ev / floor,
        "old_chunk_over_evaluate": med["evaluate, chunks of 20000"] / ev,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    command = "python3 dev.py shell-cmd .venv/bin/python benchmarks/evaluation_speed.py " + " ".join(sys.argv[1:])
    lines = [f"IS log p(x), K = {a.k}, {a.points} MNIST test images, Burda's 1-layer VAE, {a.threads} thread(s), "
             f"{a.repeats} interleaved rounds (median seconds). Hand-written evaluator's tuned shape: "
             f"{best[0]} points x {best[1]} particles per chunk.", "",
             "| contender | median s | ratio to hand-written | mean log p(x) |", "|---|---|---|---|"]
    for name in contenders:
        ll = results.get(name, {}).get("mean_log_likelihood")
        lines.append(f"| {name} | {med[name]:.2f} | {med[name] / hw:.2f} | {'' if ll is None else f'{ll:.2f}'} |")
    lines += ["", f"- `evaluate` / hand-written: **{ev / hw:.2f}**; hand-written / GEMM floor: **{hw / floor:.2f}**; "
              f"the former 20 000-particle chunks / `evaluate`: {summary['old_chunk_over_evaluate']:.2f}.",
              "- hand-written shapes tried (seconds at K = " + str(tune_k) + "): "
              + ", ".join(f"{pt}x{pa} {s:.2f}" for (pt, pa), s in sorted(tuning.items(), key=lambda kv: kv[1])),
              "", f"Command: `{command}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    names = list(contenders)
    ax.barh(names, [med[n] for n in names], color=[{"evaluate": "C0", "hand-written": "C2", "GEMM floor": "C7"}.get(n, "C1")
                                                    for n in names])
    for i, n in enumerate(names):
        ax.plot(times[n], [i] * len(times[n]), "k.", markersize=4)
    ax.set_xlabel("seconds (bars: median; dots: rounds)")
    ax.set_title(f"IS log p(x), K={a.k}, {a.points} points, {a.threads} thread(s)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
