"""A trainer for any model/guide pair and any estimator: SVI, one scoped param store per run."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.infer import SVI
from tqdm import tqdm

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.programs.labels import check_labels, eval_kwargs, train_kwargs
from pyro_vae.programs.sites import check_data_fits, check_pairing
from pyro_vae.training import distributed as dist
from pyro_vae.training.budget import Budget
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.device import resolve_device
from pyro_vae.training.optim import SharedAdam
from pyro_vae.training.replay import Replayed, ReplaySVI
from pyro_vae.training.replay_svi import DEFAULT_AUDIT
from pyro_vae.training.rng import rng_state, set_rng_state
from pyro_vae.training.run_dir import RunDir
from pyro_vae.training.state import Position, Run, restore, save, write_fast_path
from pyro_vae.training.stops import Interrupted, SigintFlag, TrainingDiverged

__all__ = ["TIMING", "History", "Interrupted", "TrainingDiverged", "announce_step", "fit", "test_bound"]


# the columns of a history row that are wall clock, so differ between any two runs of the same training
TIMING = ("seconds", "images_per_s", "train_seconds")


@dataclass
class History:
    """One row per finished epoch: epoch, step, train_elbo, seconds, images_per_s, train_seconds, evals[, test_elbo]."""

    rows: list[dict[str, Any]] = field(default_factory=list)


def fit(model: torch.nn.Module, guide: torch.nn.Module, estimator: Callable, train_data: ArrayDataset,
        test_data: ArrayDataset | None, config: TrainConfig, *, run_dir: RunDir | None = None,
        resume: bool = False, run_config: dict[str, Any] | None = None, quiet: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None, world: dist.World = dist.SINGLE) -> History:
    """Train ``model`` and ``guide`` with ``SVI(model, guide, Adam, loss=estimator)``.

    With ``config.replay`` (the default) the loss is recorded once per input signature and replayed
    (``pyro_vae.training.replay``) and Adam steps all parameters in one call
    (``pyro_vae.training.optim.SharedAdam``): the same losses and updates as eager SVI, at the speed
    of hand-written PyTorch.

    The run works in a param store of its own, so two fits in one process never share parameters.
    With ``run_dir``, a checkpoint (model, guide, optimizer, position, RNG states, metrics,
    ``run_config``) is written after every epoch, and every ``config.checkpoint_every`` steps if set;
    ``resume=True`` continues from the last one and ends bit-identical (on the CPU) to a run that was
    never stopped. Ctrl-C writes a checkpoint and raises ``Interrupted``. ``quiet`` prints nothing.
    ``config.max_seconds`` / ``config.max_evals`` stop the run after the step that spends that budget
    (``pyro_vae.training.budget``); the run then ends like a last epoch (its row, test bound, checkpoint).

    With a ``world`` of several processes (``pyro_vae.training.distributed``), each rank trains on its
    slice of every batch, gradients are summed across ranks before each step, and only rank 0 writes.
    """
    device = dist.device_for(world, resolve_device(config.device))
    dist.check_batch(world, config.batch_size, len(train_data))
    quiet = quiet or not world.main
    model.to(device)
    guide.to(device)
    clip = {"clip_args": {"clip_norm": config.clip_norm}} if config.clip_norm else {}
    # the fast path (SharedAdam + a replayed loss) makes the same updates as SVI + pyro.optim.Adam
    optim = SharedAdam({"lr": config.lr}, **clip) if config.replay else pyro.optim.Adam({"lr": config.lr}, **clip)
    run = Run(model, guide, optim, config, world, run_dir, run_config or {}, device,
              budget=Budget(config, estimator, min_points=world.size))
    with pyro.get_param_store().scope(), SigintFlag(hard_stop=not world.active) as sigint:
        pyro.set_rng_seed(config.seed + world.rank)  # a stream of model draws per rank
        run.data_gen.manual_seed(config.seed)  # one data order and binarization, the same on every rank
        _check_programs(model, guide, estimator, train_data, test_data, device)
        if resume:
            restore(run)
        svi = _make_svi(run, estimator)
        for epoch in range(run.pos.epoch, config.epochs + 1):
            if run.budget.done:
                break
            _train_epoch(run, svi, train_data, epoch, device, sigint, quiet)
            row = _end_epoch(run, svi, test_data, device)
            save(run)
            if _stopping(run, sigint) and epoch < config.epochs and not run.budget.done:
                raise Interrupted(f"interrupted after epoch {epoch}; " + _where_saved(run))
            if on_epoch is not None and world.main:
                on_epoch(row)
            if not quiet:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                           file=sys.stdout)
    return History(run.history)


def _check_programs(model, guide, estimator, train_data: ArrayDataset, test_data: ArrayDataset | None,
                    device: torch.device) -> None:
    """Refuse, before any training, labels, data and site pairings that do not fit the programs."""
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
        with poutine.trace(param_only=True) as capture:
            estimator(model, guide, probe, **probe_kw)
    if not capture.trace.nodes:
        raise UserError(f"neither {type(model).__name__} nor {type(guide).__name__} registers a parameter with Pyro, "
                        "so there is nothing to train: make them PyroModules, or call pyro.module(name, net) in "
                        "forward for a plain torch.nn.Module")


def _make_svi(run: Run, estimator: Callable) -> SVI:
    """SVI over the replayed loss, audited (the default), or Pyro's own SVI with ``replay=False``.

    A resumed run whose fast path had switched to eager stays eager."""
    config = run.config
    if not (config.replay or run.world.active):
        return SVI(run.model, run.guide, run.optim, loss=estimator)
    loss = Replayed(estimator, compile=config.compile) if config.replay else estimator
    svi = ReplaySVI(run.model, run.guide, run.optim, loss, world=run.world,
                    audit=DEFAULT_AUDIT if config.audit else None)
    svi.steps_done = run.pos.step
    if config.replay and run.fast_path:
        last = run.fast_path[-1]
        loss.give_up(f"it switched to eager at step {last['step']} before the run was resumed ({last['reason']})",
                     step=run.pos.step + 1)
        loss.events.clear()  # already on record
    return svi


def _note_fast_path(run: Run, svi: SVI) -> None:
    """Record in the run (and its folder) when the fast path has just switched to eager."""
    events = getattr(svi.loss, "events", None)
    if events:
        run.fast_path += events
        events.clear()
        write_fast_path(run)


def _train_epoch(run: Run, svi: SVI, data: ArrayDataset, epoch: int, device: torch.device, sigint: SigintFlag,
                 quiet: bool) -> None:
    """The optimizer steps of one epoch, from ``run.pos`` (mid-epoch after a resume) to its end."""
    pos, world, budget = run.pos, run.world, run.budget
    if pos.batch == 0:
        pos = run.pos = Position(epoch, 0, pos.step, epoch_rng=run.data_gen.get_state())
    t0 = time.perf_counter() - pos.seconds
    budget.start()
    bar = tqdm(total=len(data), initial=pos.seen, desc=budget.label(epoch, run.config.epochs), unit="img",
               leave=False, disable=quiet, file=sys.stderr, mininterval=0.5)
    batches = data.batches(run.config.batch_size, shuffle=True, generator=run.data_gen, device=device)
    with bar:
        for i, (x, y) in enumerate(batches):
            if i < pos.batch:
                continue  # drawn again only to advance the generator exactly as the first time
            n_global = x.shape[0]
            if n_global < world.size:
                continue  # a last batch too small to give every rank a point (the same on every rank)
            x, y = budget.trim(x, y)  # an evals budget cuts its last batch to the points it has left
            n_global = x.shape[0]
            announce_step(pos.step, run.model, run.guide)
            x, y = dist.shard(world, x, y)
            loss = svi.step(x, **train_kwargs(run.model, y))
            _note_fast_path(run, svi)
            stop = sigint.raised
            if world.active:  # the batch's loss, and whether any rank was interrupted: decided together
                loss, stopping = dist.sum_scalars(world, [loss, float(sigint.raised)])
                stop = stopping > 0
            pos.step += 1
            budget.spend(n_global)
            if not math.isfinite(loss):
                saved = run.run_dir is not None and (run.run_dir.path / "checkpoint.pt").exists()
                raise TrainingDiverged(
                    f"loss became {loss} at epoch {epoch}, step {pos.step}; stopped. "
                    + (f"The last good checkpoint is kept in {run.run_dir.path}." if saved
                       else "No checkpoint was written.") + " (try a smaller --lr or --clip-norm)")
            pos.batch, pos.total, pos.seen = i + 1, pos.total + loss, pos.seen + n_global
            pos.seconds = time.perf_counter() - t0
            bar.update(n_global)
            bar.set_postfix(loss=f"{pos.total / pos.seen:.2f}", refresh=False)  # redrawn at tqdm's own pace
            if stop:
                bar.close()
                save(run)
                raise Interrupted(f"interrupted at epoch {epoch}, step {pos.step}; " + _where_saved(run))
            if budget.done:  # ends like a last epoch: its row, test bound and checkpoint follow
                return
            every = run.config.checkpoint_every
            if every and pos.step % every == 0 and pos.seen < len(data):
                save(run)


def _end_epoch(run: Run, svi: SVI, test_data: ArrayDataset | None, device: torch.device) -> dict[str, Any]:
    """The finished epoch's row of the history, with the test bound when there are test data."""
    pos, config = run.pos, run.config
    row = {"epoch": pos.epoch, "step": pos.step, "train_elbo": -pos.total / pos.seen, "seconds": pos.seconds,
           "images_per_s": pos.seen / pos.seconds, **run.budget.row()}
    if test_data is not None:
        # a fixed seed keeps the test bound comparable across epochs and untouched by training RNG
        state = rng_state(device)
        pyro.set_rng_seed(config.seed + 1)
        row["test_elbo"] = test_bound(svi, test_data, max(config.batch_size, 500), device, config.seed, run.world)
        set_rng_state(state, device)
    run.history.append(row)
    run.pos = Position(pos.epoch, 0, pos.step)
    return row


def _stopping(run: Run, sigint: SigintFlag) -> bool:
    """Whether Ctrl-C was pressed (on any rank: the ranks stop together)."""
    if run.world.active:
        return dist.sum_scalars(run.world, [float(sigint.raised)])[0] > 0
    return sigint.raised


def _where_saved(run: Run) -> str:
    return f"checkpoint saved, continue with --resume {run.run_dir.path}" if run.run_dir else "nothing saved"


def announce_step(step: int, *programs) -> None:
    """Tell each program that defines ``set_step(step)`` how many optimizer steps are done (e.g. KL warm-up)."""
    for p in programs:
        hook = getattr(p, "set_step", None)
        if callable(hook):
            hook(step)


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
