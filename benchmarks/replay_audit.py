"""The fast path's cost of being safe: the audit's share of training time, and the step against plain PyTorch.

    python3 dev.py shell-cmd .venv/bin/python benchmarks/replay_audit.py [--steps 3000] [--batch 100]

Four ways of taking the same training steps (Burda et al.'s 1-layer VAE, binarized MNIST, ELBO, Adam at
1e-3, Pyro's validation on as ``fit`` runs it), each with its own parameters, interleaved in chunks of
``--chunk`` steps so that every contender sees the same machine load and the same step numbers:

- ``plain``: the same VAE written in plain PyTorch (``plain_pytorch.py``), the reference;
- ``project, audit on``: ``fit``'s default step (``ReplaySVI`` over ``Replayed``, ``SharedAdam``), audited
  on its schedule (steps 2, 4, ..., 256, then every 512th, and the first replay of every recording);
- ``project, audit off``: the same with ``audit=None``;
- ``project, audit off, validation off``: and with Pyro's validation off (the graph then keeps only the
  NaN checks of Pyro's ELBO): the price of keeping validation's checks in the graph;
- ``eager``: Pyro's ``SVI`` with ``pyro.optim.Adam`` (what an audit runs once more).

Reported: wall time per step (median of the chunks), the ratios, the time spent in audits as measured by
``ReplaySVI.audit_seconds`` (its share of the audited contender's training time), and what the schedule
costs over the default run (80 epochs at batch 100: 48 000 steps) from the measured cost of one audit.
Writes benchmarks/results/replay_audit.md and .json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_pytorch import PlainVAE, load_from_project  # noqa: E402

from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.estimators import ESTIMATORS  # noqa: E402
from pyro_vae.guides.diagonal_normal import DiagonalNormalGuide  # noqa: E402
from pyro_vae.models.bernoulli_vae import BernoulliVAE  # noqa: E402
from pyro_vae.training.optim import SharedAdam  # noqa: E402
from pyro_vae.training.replay import Replayed  # noqa: E402
from pyro_vae.training.replay_key import signature  # noqa: E402
from pyro_vae.training.replay_svi import DEFAULT_AUDIT, ReplaySVI  # noqa: E402

ROOT = Path(__file__).resolve().parent
KINDS = ("plain", "project, audit on", "project, audit off", "project, audit off, validation off", "eager")


class Contender:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        torch.manual_seed(0)
        self.model, self.guide = BernoulliVAE(), DiagonalNormalGuide()
        self.scope: dict = {"params": {}, "constraints": {}}
        self.rng = torch.get_rng_state()  # a stream of its own: the contenders take turns
        self.svi = None
        if kind == "plain":
            self.plain = load_from_project(PlainVAE(), self.model, self.guide)
            self.opt = torch.optim.Adam(self.plain.parameters(), lr=1e-3)
        elif kind == "eager":
            self.svi = SVI(self.model, self.guide, pyro.optim.Adam({"lr": 1e-3}), loss=ESTIMATORS["elbo"]())
        else:
            audit = DEFAULT_AUDIT if kind == "project, audit on" else None
            self.svi = ReplaySVI(self.model, self.guide, SharedAdam({"lr": 1e-3}), Replayed(ESTIMATORS["elbo"]()),
                                 audit=audit)

    def run(self, batches: list[torch.Tensor], start: int, n: int) -> None:
        torch.set_rng_state(self.rng)
        self._run(batches, start, n)
        self.rng = torch.get_rng_state()

    def _run(self, batches: list[torch.Tensor], start: int, n: int) -> None:
        if self.kind == "plain":
            for i in range(start, start + n):
                self.opt.zero_grad()
                loss = self.plain.loss("elbo", 1, batches[i % len(batches)])
                loss.backward()
                self.opt.step()
                loss.item()
            return
        validate = not self.kind.endswith("validation off")
        with pyro.get_param_store().scope(self.scope), pyro.validation_enabled(validate):
            for i in range(start, start + n):
                self.svi.step(batches[i % len(batches)])


def _signature_seconds(c: Contender, x: torch.Tensor, n: int = 2000) -> float:
    """What computing (and hashing) the signature of one step costs, median of 5 blocks."""
    leaves, spec = pytree.tree_flatten(((x,), {}))
    blocks = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            hash(signature(c.model, c.guide, c.svi.loss.estimator, leaves, spec, []))
        blocks.append((time.perf_counter() - t) / n)
    return statistics.median(blocks)


def audits_in(steps: int) -> int:
    return sum(DEFAULT_AUDIT.due(n) for n in range(1, steps + 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=str(ROOT / "results" / "replay_audit"))
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train, _ = load_dataset("mnist", a.data_root)
    gen = torch.Generator().manual_seed(0)
    batches = [x for x, _ in train.batches(a.batch, shuffle=True, generator=gen)][:50]
    contenders = [Contender(k) for k in KINDS]
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for start in range(0, a.steps, a.chunk):
        for c in contenders:
            t = time.perf_counter()
            c.run(batches, start, a.chunk)
            times[c.kind].append((time.perf_counter() - t) / a.chunk)
        print(f"step {start + a.chunk}/{a.steps}", file=sys.stderr, end="\r")
    on, off = contenders[1].svi, contenders[2].svi
    assert on.loss.fallback_reason is None and off.loss.fallback_reason is None, "a contender fell back to eager"
    same = all(torch.equal(x, y) for x, y in zip(
        [*contenders[1].model.state_dict().values(), *contenders[1].guide.state_dict().values()],
        [*contenders[2].model.state_dict().values(), *contenders[2].guide.state_dict().values()]))
    signature_s = _signature_seconds(contenders[2], batches[0])
    total = {k: sum(v) * a.chunk for k, v in times.items()}
    step = {k: statistics.median(v) for k, v in times.items()}
    per_audit = on.audit_seconds / max(audits_in(a.steps), 1)
    default_steps = 80 * 60000 // 100
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, pyro {pyro.__version__}",
        "steps": a.steps, "batch": a.batch, "chunk": a.chunk, "audits": audits_in(a.steps),
        "ms_per_step_median": {k: 1e3 * v for k, v in step.items()},
        "total_seconds": total,
        "ratio_to_plain": {k: step["plain"] / v for k, v in step.items()},
        "audit_on_over_off_total": total["project, audit on"] / total["project, audit off"],
        "audit_seconds": on.audit_seconds,
        "audit_share_of_training": on.audit_seconds / total["project, audit on"],
        "seconds_per_audit": per_audit, "audit_in_replayed_steps": per_audit / step["project, audit off"],
        "default_run_audits": audits_in(default_steps),
        "default_run_audit_share": audits_in(default_steps) * per_audit / (default_steps * step["project, audit off"]),
        "audit_on_equals_off_bitwise": same,
        "signature_seconds": signature_s, "signature_in_replayed_steps": signature_s / step["project, audit off"],
        "validation_checks_cost": step["project, audit off"] / step["project, audit off, validation off"] - 1,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    cmd = "python3 dev.py shell-cmd .venv/bin/python benchmarks/replay_audit.py " + " ".join(sys.argv[1:])
    lines = [
        "# The fast path's audit: cost", "", f"`{cmd.strip()}`", "", f"{result['machine']}; {a.steps} steps at "
        f"batch {a.batch}, interleaved in chunks of {a.chunk}; Pyro validation on (as `fit` runs).", "",
        "| path | ms/step (median chunk) | total s | plain / path |", "|---|---|---|---|",
        *(f"| {k} | {1e3 * step[k]:.3f} | {total[k]:.2f} | {step['plain'] / step[k]:.3f} |" for k in KINDS), "",
        f"- audits in the run: {result['audits']}; time in audits {on.audit_seconds:.3f} s = "
        f"**{100 * result['audit_share_of_training']:.2f}%** of the audited run's training time; one audit costs "
        f"{1e3 * per_audit:.2f} ms = {result['audit_in_replayed_steps']:.2f} replayed steps.",
        f"- whole run, audit on / audit off: **{result['audit_on_over_off_total']:.4f}** (wall time; the machine's "
        f"load moves this by more than the audit costs); parameters equal bit for bit with and without the audit: "
        f"{same}.",
        f"- the default run (80 epochs, batch 100, {default_steps} steps) has {result['default_run_audits']} audits: "
        f"**{100 * result['default_run_audit_share']:.2f}%** of its training time at this cost per audit.",
        f"- the signature of a step (computed on every step): {1e6 * signature_s:.1f} us = "
        f"{100 * result['signature_in_replayed_steps']:.2f}% of a replayed step.",
        f"- keeping Pyro's validation in the graph (support, argument and NaN checks) costs "
        f"{100 * result['validation_checks_cost']:+.1f}% per step (audit off, validation on against off).",
    ]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
