"""One run's training state: where it stands (``Position``) and what it holds (``Run``), as a checkpoint.

``save`` writes everything a resumed run needs to continue bit-identically (on the CPU) to a run that
was never stopped; ``restore`` reads it back into a freshly set-up ``Run``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch

from pyro_vae.errors import UserError
from pyro_vae.training import distributed as dist
from pyro_vae.training.budget import Budget
from pyro_vae.training.checkpoint import atomic_write, latest_checkpoint, save_checkpoint
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.rng import rng_state, set_rng_state
from pyro_vae.training.run_dir import RunDir
from pyro_vae.training.stops import TrainingDiverged

FAST_PATH = "fast_path.jsonl"  # in the run folder: a line each time the fast path switched to eager


@dataclass
class Position:
    """Where training stands, as saved in a checkpoint: mid-epoch when ``batch`` > 0."""

    epoch: int = 1          # the epoch in progress
    batch: int = 0          # batches of it already done
    step: int = 0           # optimizer steps done
    total: float = 0.0      # running loss and images of the epoch in progress
    seen: int = 0
    seconds: float = 0.0
    epoch_rng: torch.Tensor | None = None  # the data generator's state when this epoch began


@dataclass
class Run:
    """What one ``fit`` holds while it trains, besides the data: programs, optimizer, data order, results."""

    model: torch.nn.Module
    guide: torch.nn.Module
    optim: Any
    config: TrainConfig
    world: dist.World
    run_dir: RunDir | None
    run_config: dict[str, Any]
    device: torch.device = torch.device("cpu")  # whose CUDA random stream is saved with the others
    data_gen: torch.Generator = field(default_factory=torch.Generator)
    history: list[dict[str, Any]] = field(default_factory=list)
    pos: Position = field(default_factory=Position)
    # the fast path's switches to eager, {"step", "reason"}: a resumed run stays eager after one
    fast_path: list[dict[str, Any]] = field(default_factory=list)
    budget: Budget | None = None  # config.max_seconds / max_evals, and what the run has consumed


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def save(run: Run) -> None:
    """Write a checkpoint and the metrics (rank 0); every rank stops together if that fails."""
    if run.run_dir is None:
        return
    if not _all_finite(run.model, run.guide):  # every rank holds the same parameters, so all stop together
        raise TrainingDiverged(f"parameters became non-finite at epoch {run.pos.epoch}, step {run.pos.step}; "
                               f"stopped, the last good checkpoint in {run.run_dir.path} is kept")
    rank_rngs = dist.gather_objects(run.world, rng_state(run.device)) if run.world.active else None
    failed = None
    if run.world.main:
        try:
            _write(run, rank_rngs)
        except Exception as e:  # the other ranks must learn of it, or they wait for rank 0 forever
            failed = e
    if dist.sum_scalars(run.world, [float(failed is not None)])[0]:
        raise failed if failed is not None else UserError("rank 0 could not write the checkpoint; stopped")


def _write(run: Run, rank_rngs: list | None) -> None:
    pos = run.pos
    save_checkpoint(run.run_dir.path, {
        "model": run.model.state_dict(), "guide": run.guide.state_dict(), "optimizer": run.optim.get_state(),
        "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "partial": [pos.total, pos.seen, pos.seconds],
        "epoch_rng": pos.epoch_rng, "rng": rng_state(run.device), "data_rng": run.data_gen.get_state(),
        "metrics": run.history, "config": run.run_config, "world_size": run.world.size,
        "fast_path": run.fast_path, **({"budget": run.budget.state()} if run.budget else {}), **({"rank_rng": rank_rngs} if run.world.active else {})})
    run.run_dir.write_metrics(run.history)
    write_fast_path(run)


def write_fast_path(run: Run) -> None:
    """Rewrite the run folder's record of the fast path's switches to eager (rank 0; none: no file)."""
    if run.run_dir is None or not run.world.main or not run.fast_path:
        return
    text = "".join(json.dumps(e) + "\n" for e in run.fast_path)
    atomic_write(run.run_dir.path / FAST_PATH, lambda p: p.write_text(text))


def restore(run: Run) -> None:
    """Continue ``run`` from its folder's latest checkpoint: parameters, optimizer, position, every RNG."""
    if run.run_dir is None:
        raise UserError("resume needs a run folder")
    ckpt = latest_checkpoint(run.run_dir.path)
    try:
        run.model.load_state_dict(ckpt["model"])
        run.guide.load_state_dict(ckpt["guide"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"the checkpoint in {run.run_dir.path} does not fit this model/guide "
                        f"(was the config changed?): {first}") from e
    run.optim.set_state(ckpt["optimizer"])
    run.history = list(ckpt["metrics"])
    run.fast_path = list(ckpt.get("fast_path", []))
    if run.budget is not None:
        run.budget.restore(ckpt.get("budget"))
    if ckpt["batch"]:  # stopped mid-epoch: draw that epoch's data order again up to where it was
        run.pos = Position(ckpt["epoch"], ckpt["batch"], ckpt["step"], *ckpt["partial"], ckpt["epoch_rng"])
        run.data_gen.set_state(ckpt["epoch_rng"])
    else:
        run.pos = Position(ckpt["epoch"] + 1, 0, ckpt["step"])
        run.data_gen.set_state(ckpt["data_rng"])
    rngs, rank = ckpt.get("rank_rng"), run.world.rank
    if rngs and rank < len(rngs):
        set_rng_state(rngs[rank], run.device)
    elif rank == 0:
        set_rng_state(ckpt["rng"], run.device)
    else:  # more ranks than the checkpoint has streams for: a new stream of its own
        set_rng_state(ckpt["rng"], run.device)
        pyro.set_rng_seed(int(np.random.SeedSequence([run.config.seed, rank, run.pos.step]).generate_state(1)[0]))
