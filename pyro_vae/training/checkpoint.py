"""Checkpoints: written atomically, read with ``weights_only=True`` so a file can never run code."""
from __future__ import annotations

import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import UserError

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then move the temp file over ``path`` in one rename.

    A crash or a full disk leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically, keeping the one it replaces as ``checkpoint.prev.pt``.

    Order matters: the new file is complete on disk before anything is renamed, and the old latest
    becomes the previous one by a link, not a move, so at every instant ``checkpoint.pt`` is a whole
    checkpoint, old or new.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    prev_tmp = run_dir / f".{PREVIOUS}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if latest.exists():
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(latest, prev_tmp)
            except OSError:  # a file system without hard links
                shutil.copy2(latest, prev_tmp)
            os.replace(prev_tmp, previous)
        os.replace(tmp, latest)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        raise UserError(f"cannot write {latest}: {reason}; the last good checkpoint is kept") from e
    finally:
        tmp.unlink(missing_ok=True)
        prev_tmp.unlink(missing_ok=True)
    return latest


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint of plain tensors and containers; anything else is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds pickled objects, not only tensors "
                        "(a checkpoint from elsewhere may carry code)") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupted ({type(e).__name__}); "
                        f"the previous one, if any, is {path.with_name(PREVIOUS)}") from e
    if not isinstance(payload, dict) or "model" not in payload:
        raise UserError(f"{path} is not a pyro-vae checkpoint")
    return payload


def latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The newest readable checkpoint of a run; falls back to the previous one if the latest is damaged."""
    run_dir = Path(run_dir)
    try:
        return load_checkpoint(run_dir / LATEST)
    except UserError as first:
        if (run_dir / PREVIOUS).is_file():
            payload = load_checkpoint(run_dir / PREVIOUS)
            if (run_dir / LATEST).exists():
                # moved aside, so the next save cannot rotate the damaged file over the good previous one
                os.replace(run_dir / LATEST, run_dir / f"{LATEST}.damaged")
            print(f"pyro-vae: warning: {first}; using {run_dir / PREVIOUS} "
                  f"(the damaged file is kept as {LATEST}.damaged)", file=sys.stderr)
            return payload
        raise
