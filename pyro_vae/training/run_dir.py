"""A run folder: config.json, metrics.jsonl, checkpoints, evaluation and plots of one run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pyro_vae.errors import UserError
from pyro_vae.training.checkpoint import atomic_write

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVALUATION = "evaluation.json"


class RunDir:
    """A run folder. Creating one checks that it is writable before any training starts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self, *, fresh: bool) -> "RunDir":
        if fresh and (self.path / "checkpoint.pt").exists():
            raise UserError(f"{self.path} already holds a run; use --resume {self.path} or another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror or e}") from e
        return self

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=float) + "\n"))
        return path

    def read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError) as e:
            raise UserError(f"{self.path} is not a run folder: no {name}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupted: {e}") from e
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from e

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the whole metrics file; rows come from the checkpointed history, so none are duplicated."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / METRICS, lambda p: p.write_text(text))

    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(exist_ok=True)
        return p
