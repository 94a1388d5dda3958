"""Checkpoints: written atomically, read with ``weights_only=True`` so a file can never run code."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

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
    """Write ``run_dir/checkpoint.pt``, keeping the one it replaces as ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    tmp_name = f".{LATEST}.new-{os.getpid()}"
    atomic_write(run_dir / tmp_name, lambda p: torch.save(payload, p))
    try:
        if latest.exists():
            os.replace(latest, previous)
        os.replace(run_dir / tmp_name, latest)
    except OSError as e:
        raise UserError(f"cannot write {latest}: {e.strerror or e}") from e
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
            import sys
            print(f"pyro-vae: warning: {first}; using {run_dir / PREVIOUS}", file=sys.stderr)
            return load_checkpoint(run_dir / PREVIOUS)
        raise
