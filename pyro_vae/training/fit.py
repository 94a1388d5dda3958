"""A trainer for any model/guide pair and any estimator: SVI, one scoped param store per run."""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm import tqdm

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.programs.labels import check_labels, eval_kwargs, train_kwargs
from pyro_vae.programs.sites import check_data_fits, check_pairing
from pyro_vae.training import distributed as dist
from pyro_vae.training.checkpoint import latest_checkpoint, save_checkpoint
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.device import resolve_device
from pyro_vae.training.optim import SharedAdam
from pyro_vae.training.replay import Replayed, ReplaySVI
from pyro_vae.training.rng import rng_state, set_rng_state
from pyro_vae.training.run_dir import RunDir


class TrainingDiverged(UserError):
    """The loss or the parameters stopped being finite."""


def announce_step(step: int, *programs) -> None:
    """Tell each program that defines ``set_step(step)`` how many optimizer steps are done (e.g. KL warm-up)."""
    for p in programs:
        hook = getattr(p, "set_step", None)
        if callable(hook):
            hook(step)


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


@dataclass
class History:
    """One row per finished epoch: epoch, step, train_elbo, seconds, images_per_s[, test_elbo]."""

    rows: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def test_bound(svi: SVI, data: ArrayDataset, batch_size: int, device: torch.device, seed: int,
               world: dist.World = dist.SINGLE) -> float:
    """The estimator's bound on held-out data, nats per point (one pass, a fixed binarization draw)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for x, y in data.batches(batch_size, shuffle=False, generator=gen, device=device):
        x, y = dist.shard(world, x, y)
        if x.shape[0]:
            total += svi.evaluate_loss(x, **eval_kwargs(svi.model, y))
    return -dist.sum_scalars(world, [total])[0] / len(data)


class Interrupted(Exception):
    """Ctrl-C during training; a consistent checkpoint was written first when the run has a folder."""


class _SigintFlag:
    """The first Ctrl-C asks the loop to stop after the current step; a second one stops at once.

    Under torchrun every worker gets the terminal's SIGINT and the agent's copy of it, so there a
    second signal is not taken as "stop at once" (the ranks must stop together, at a step boundary)."""

    def __init__(self, hard_stop: bool = True) -> None:
        self.raised = False
        self.hard_stop = hard_stop
        self._old = None

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised and self.hard_stop:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


@dataclass
class _Position:
    """Where training stands, as saved in a checkpoint: mid-epoch when ``batch`` > 0."""

    epoch: int = 1          # the epoch in progress
    batch: int = 0          # batches of it already done
    step: int = 0
    total: float = 0.0      # running loss and images of the epoch in progress
    seen: int = 0
    seconds: float = 0.0
    epoch_rng: torch.Tensor | None = None  # the data generator's state when this epoch began


def fit(model: torch.nn.Module, guide: torch.nn.Module, estimator: Callable, train_data: ArrayDataset,
        test_data: ArrayDataset | None, config: TrainConfig, *, run_dir: RunDir | None = None,
        resume: bool = False, run_config: dict[str, Any] | None = None, quiet: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, world: dist.World = dist.SINGLE) -> History:
    """Train ``model`` and ``guide`` with ``SVI(model, guide, Adam, loss=estimator)``.

    With ``config.replay`` (the default) the loss is recorded once per batch shape and replayed
    (``pyro_vae.replay``) and Adam steps all parameters in one call (``pyro_vae.optim.SharedAdam``):
    the same losses and updates to float tolerance, at the speed of hand-written PyTorch.

    The run works in a param store of its own, so two fits in one process never share parameters.
    With ``run_dir``, a checkpoint (model, guide, optimizer, position, RNG states, metrics,
    ``run_config``) is written after every epoch, and every ``config.checkpoint_every`` steps if set;
    ``resume=True`` continues from the last one and ends bit-identical (on the CPU) to a run that was
    never stopped. Ctrl-C writes a checkpoint and raises ``Interrupted``.

    With a ``world`` of several processes (``pyro_vae.distributed``), each rank trains on its slice of
    every batch, gradients are summed across ranks before each step, and only rank 0 writes.
    """
    device = dist.device_for(world, resolve_device(config.device))
    dist.check_batch(world, config.batch_size, len(train_data))
    quiet = quiet or not world.main
    model.to(device)
    guide.to(device)
    history = History()
    data_gen = torch.Generator()
    clip = {"clip_args": {"clip_norm": config.clip_norm}} if config.clip_norm else {}
    # the fast path (SharedAdam + a replayed loss) makes the same updates as SVI + pyro.optim.Adam
    optim = SharedAdam({"lr": config.lr}, **clip) if config.replay else pyro.optim.Adam({"lr": config.lr}, **clip)
    pos = _Position()
    rank_rngs = None

    def save() -> None:
        if run_dir is None:
            return
        if not _all_finite(model, guide):  # every rank holds the same parameters, so all stop together
            raise TrainingDiverged(f"parameters became non-finite at epoch {pos.epoch}, step {pos.step}; "
                                   f"stopped, the last good checkpoint in {run_dir.path} is kept")
        nonlocal rank_rngs
        rank_rngs = dist.gather_objects(world, rng_state(device)) if world.active else None
        failed = None
        if world.main:
            try:
                _write()
            except Exception as e:  # the other ranks must learn of it, or they wait for rank 0 forever
                failed = e
        if dist.sum_scalars(world, [float(failed is not None)])[0]:
            raise failed if failed is not None else UserError("rank 0 could not write the checkpoint; stopped")

    def _write() -> None:
        save_checkpoint(run_dir.path, {
            "model": model.state_dict(), "guide": guide.state_dict(), "optimizer": optim.get_state(),
            "epoch": pos.epoch, "batch": pos.batch, "step": pos.step, "partial": [pos.total, pos.seen, pos.seconds],
            "epoch_rng": pos.epoch_rng, "rng": rng_state(device), "data_rng": data_gen.get_state(),
            "metrics": history.rows, "config": run_config or {}, "world_size": world.size,
            **({"rank_rng": rank_rngs} if world.active else {})})
        run_dir.write_metrics(history.rows)

    with pyro.get_param_store().scope(), _SigintFlag(hard_stop=not world.active) as sigint:
        pyro.set_rng_seed(config.seed + world.rank)  # a stream of model draws per rank
        data_gen.manual_seed(config.seed)  # one data order and binarization, the same on every rank
        check_labels(model, train_data.labels, "the training data", training=True)
        probe, probe_y = next(train_data.batches(min(len(train_data), 64), shuffle=False,
                                                 generator=torch.Generator().manual_seed(0), device=device))
        probe_kw = train_kwargs(model, probe_y)
        check_data_fits(model, probe, **probe_kw)
        check_pairing(model, guide, probe, **probe_kw)
        if test_data is not None:
            check_labels(model, test_data.labels, "the test data")
            tx, ty = next(test_data.batches(min(len(test_data), 64), shuffle=False,
                                            generator=torch.Generator(), device=device))
            check_data_fits(model, tx, **eval_kwargs(model, ty))
        with torch.no_grad():
            # lazy set-up inside an estimator (e.g. Pyro guessing max_plate_nesting) may draw random
            # numbers: do it now, so a resumed run's restored RNG stream is not consumed by it
            announce_step(0, model, guide)
            estimator(model, guide, probe, **probe_kw)
        if resume:
            if run_dir is None:
                raise UserError("resume needs a run folder")
            ckpt = latest_checkpoint(run_dir.path)
            try:
                model.load_state_dict(ckpt["model"])
                guide.load_state_dict(ckpt["guide"])
            except RuntimeError as e:
                first = str(e).splitlines()[0]
                raise UserError(f"the checkpoint in {run_dir.path} does not fit this model/guide "
                                f"(was the config changed?): {first}") from e
            optim.set_state(ckpt["optimizer"])
            history.rows = list(ckpt["metrics"])
            if ckpt["batch"]:  # stopped mid-epoch: replay that epoch's data order up to where it was
                pos = _Position(ckpt["epoch"], ckpt["batch"], ckpt["step"], *ckpt["partial"], ckpt["epoch_rng"])
                data_gen.set_state(ckpt["epoch_rng"])
            else:
                pos = _Position(ckpt["epoch"] + 1, 0, ckpt["step"])
                data_gen.set_state(ckpt["data_rng"])
            rngs = ckpt.get("rank_rng")
            if rngs and world.rank < len(rngs):
                set_rng_state(rngs[world.rank], device)
            elif world.rank == 0:
                set_rng_state(ckpt["rng"], device)
            else:  # more ranks than the checkpoint has streams for: a new stream of its own
                set_rng_state(ckpt["rng"], device)
                pyro.set_rng_seed(int(np.random.SeedSequence([config.seed, world.rank, pos.step]).generate_state(1)[0]))
        if config.replay or world.active:
            loss = Replayed(estimator, compile=config.compile) if config.replay else estimator
            svi = ReplaySVI(model, guide, optim, loss, world=world)
        else:
            svi = SVI(model, guide, optim, loss=estimator)
        for epoch in range(pos.epoch, config.epochs + 1):
            if pos.batch == 0:
                pos = _Position(epoch, 0, pos.step, epoch_rng=data_gen.get_state())
            t0 = time.perf_counter() - pos.seconds
            bar = tqdm(total=len(train_data), initial=pos.seen, desc=f"epoch {epoch}/{config.epochs}", unit="img",
                       leave=False, disable=quiet, file=sys.stderr, mininterval=0.5)
            batches = train_data.batches(config.batch_size, shuffle=True, generator=data_gen, device=device)
            for i, (x, y) in enumerate(batches):
                if i < pos.batch:
                    continue  # drawn again only to advance the generator exactly as the first time
                n_global = x.shape[0]
                if n_global < world.size:
                    continue  # a last batch too small to give every rank a point (the same on every rank)
                announce_step(pos.step, model, guide)
                x, y = dist.shard(world, x, y)
                loss = svi.step(x, **train_kwargs(model, y))
                stop = sigint.raised
                if world.active:  # the batch's loss, and whether any rank was interrupted: decided together
                    loss, stopping = dist.sum_scalars(world, [loss, float(sigint.raised)])
                    stop = stopping > 0
                pos.step += 1
                if not math.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss} at epoch {epoch}, step {pos.step}; stopped. "
                        + (f"The last good checkpoint is kept in {run_dir.path}."
                           if run_dir and (run_dir.path / "checkpoint.pt").exists() else "No checkpoint was written.")
                        + " (try a smaller --lr or --clip-norm)")
                pos.batch, pos.total, pos.seen = i + 1, pos.total + loss, pos.seen + n_global
                pos.seconds = time.perf_counter() - t0
                bar.update(n_global)
                bar.set_postfix(loss=f"{pos.total / pos.seen:.2f}", refresh=False)  # redrawn at tqdm's own pace
                if stop:
                    bar.close()
                    save()
                    where = f"epoch {epoch}, step {pos.step}"
                    raise Interrupted(f"interrupted at {where}; " + (
                        f"checkpoint saved, continue with --resume {run_dir.path}" if run_dir else "nothing saved"))
                if config.checkpoint_every and pos.step % config.checkpoint_every == 0 and pos.seen < len(train_data):
                    save()
            bar.close()
            row = {"epoch": epoch, "step": pos.step, "train_elbo": -pos.total / pos.seen, "seconds": pos.seconds,
                   "images_per_s": pos.seen / pos.seconds}
            if test_data is not None:
                # a fixed seed keeps the test bound comparable across epochs and untouched by training RNG
                state = rng_state(device)
                pyro.set_rng_seed(config.seed + 1)
                row["test_elbo"] = test_bound(svi, test_data, max(config.batch_size, 500), device, config.seed, world)
                set_rng_state(state, device)
            history.rows.append(row)
            pos = _Position(epoch, 0, pos.step)
            save()
            stop = dist.sum_scalars(world, [float(sigint.raised)])[0] > 0 if world.active else sigint.raised
            if stop and epoch < config.epochs:
                raise Interrupted(f"interrupted after epoch {epoch}; " + (
                    f"checkpoint saved, continue with --resume {run_dir.path}" if run_dir else "nothing saved"))
            if on_epoch is not None and world.main:
                on_epoch(row)
            if world.main:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                           file=sys.stdout)
    return history
