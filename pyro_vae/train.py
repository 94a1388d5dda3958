"""A trainer for any model/guide pair and any estimator: SVI, one scoped param store per run."""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, save_checkpoint
from .data import ArrayDataset
from .errors import UserError
from .runs import RunDir, TrainConfig
from .sites import check_data_fits, check_pairing


class TrainingDiverged(UserError):
    """The loss or the parameters stopped being finite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this machine has no usable CUDA device")
    return torch.device(name)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


@dataclass
class History:
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        return self.rows[-1]["epoch"] if self.rows else 0


@torch.no_grad()
def test_bound(svi: SVI, data: ArrayDataset, batch_size: int, device: torch.device, seed: int) -> float:
    """The estimator's bound on held-out data, nats per point (one pass, a fixed binarization draw)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for x, _ in data.batches(batch_size, shuffle=False, generator=gen, device=device):
        total += svi.evaluate_loss(x)
    return -total / len(data)


def fit(model: torch.nn.Module, guide: torch.nn.Module, estimator: Callable, train_data: ArrayDataset,
        test_data: ArrayDataset | None, config: TrainConfig, *, run_dir: RunDir | None = None,
        resume: bool = False, run_config: dict[str, Any] | None = None, quiet: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> History:
    """Train ``model`` and ``guide`` with ``SVI(model, guide, Adam, loss=estimator)``.

    The run works in a param store of its own, so two fits in one process never share parameters.
    With ``run_dir``, each epoch writes a checkpoint (model, guide, optimizer, epoch, RNG states,
    ``run_config``) and the metrics; ``resume=True`` continues from the last checkpoint there.
    """
    device = resolve_device(config.device)
    model.to(device)
    guide.to(device)
    history = History()
    data_gen = torch.Generator()
    optim = pyro.optim.Adam({"lr": config.lr})
    with pyro.get_param_store().scope():
        pyro.set_rng_seed(config.seed)
        data_gen.manual_seed(config.seed)
        probe, _ = next(train_data.batches(min(len(train_data), 64), shuffle=False,
                                           generator=torch.Generator().manual_seed(0), device=device))
        check_data_fits(model, probe)
        check_pairing(model, guide, probe)
        if test_data is not None:
            check_data_fits(model, next(test_data.batches(min(len(test_data), 64), shuffle=False,
                                                          generator=torch.Generator(), device=device))[0])
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
            set_rng_state(ckpt["rng"])
            data_gen.set_state(ckpt["data_rng"])
            history.rows = list(ckpt["metrics"])
        svi = SVI(model, guide, optim, loss=estimator)
        step = history.rows[-1]["step"] if history.rows else 0
        for epoch in range(history.epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            total, seen = 0.0, 0
            bar = tqdm(total=len(train_data), desc=f"epoch {epoch}/{config.epochs}", unit="img",
                       leave=False, disable=quiet, file=sys.stderr, mininterval=0.5)
            for x, _ in train_data.batches(config.batch_size, shuffle=True, generator=data_gen, device=device):
                loss = svi.step(x)
                step += 1
                if not math.isfinite(loss):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss became {loss} at epoch {epoch}, step {step}; stopped. "
                        + (f"The last good checkpoint is kept in {run_dir.path}" if run_dir else "")
                        + " (try a smaller --lr)")
                total += loss
                seen += x.shape[0]
                bar.update(x.shape[0])
                bar.set_postfix(loss=f"{total / seen:.2f}")
            bar.close()
            seconds = time.perf_counter() - t0
            if not _all_finite(model, guide):
                raise TrainingDiverged(f"parameters became non-finite in epoch {epoch}, step {step}; stopped, "
                                       "no checkpoint written over the last good one")
            row = {"epoch": epoch, "step": step, "train_elbo": -total / seen, "seconds": seconds,
                   "images_per_s": seen / seconds}
            if test_data is not None:
                # a fixed seed keeps the test bound comparable across epochs and untouched by training RNG
                state = rng_state()
                pyro.set_rng_seed(config.seed + 1)
                row["test_elbo"] = test_bound(svi, test_data, max(config.batch_size, 500), device, config.seed)
                set_rng_state(state)
            history.rows.append(row)
            if run_dir is not None:
                save_checkpoint(run_dir.path, {
                    "model": model.state_dict(), "guide": guide.state_dict(), "optimizer": optim.get_state(),
                    "epoch": epoch, "step": step, "rng": rng_state(), "data_rng": data_gen.get_state(),
                    "metrics": history.rows, "config": run_config or {}})
                run_dir.write_metrics(history.rows)
            if on_epoch is not None:
                on_epoch(row)
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                       file=sys.stdout)
    return history
