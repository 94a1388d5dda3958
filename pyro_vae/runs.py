"""Run specs (what to build) and run folders (what a run wrote): config.json, metrics.jsonl, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write
from .errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVALUATION = "evaluation.json"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 80
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: once per epoch
    clip_norm: float | None = None       # clip each parameter's gradient norm (Pyro's clip_args)
    replay: bool = True                  # replay the loss recorded per input shape (pyro_vae.replay); False: eager
    compile: bool = False                # also torch.compile the recorded graph (needs replay)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not (float(self.lr) > 0):
            raise UserError(f"lr must be positive, got {self.lr}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise UserError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        for name in ("checkpoint_every", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {value}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"unknown device {self.device!r}; use auto, cpu or cuda")
        if self.compile and not self.replay:
            raise UserError("--compile compiles the replayed graph; it cannot be combined with --eager")


@dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run's model, guide, estimator and data: names and options only."""

    model: str = "vae"
    guide: str = "diagonal-normal"
    estimator: str = "elbo"
    estimator_options: dict[str, Any] = field(default_factory=dict)
    # shape options go to every component whose config has a field of that name (x_dim, latent_dim, hidden...)
    network: dict[str, Any] = field(default_factory=lambda: {"latent_dim": 50, "hidden": [200, 200], "activation": "tanh"})
    data: dict[str, Any] = field(default_factory=lambda: {"name": "mnist", "root": "data", "binarize": "dynamic"})
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _pick(registry: dict[str, type], name: str, what: str) -> type:
    if name not in registry:
        raise UserError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def make_component(registry: dict[str, type], name: str, what: str, options: dict[str, Any]):
    """Build registry[name] from the options its Config dataclass declares; lists become tuples."""
    cls = _pick(registry, name, what)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in fields}
    try:
        return cls(cls.Config(**kwargs))
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {what} {name!r}: {e}") from e


def make_estimator(registry: dict[str, type], name: str, options: dict[str, Any]):
    cls = _pick(registry, name, "estimator")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"estimator {name!r} has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(sorted(known)) or 'none'}")
    try:
        return cls(**options)
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"bad options for estimator {name!r}: {e}") from e


def versions(device: torch.device) -> dict[str, str]:
    import numpy
    import pyro
    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
           "numpy": numpy.__version__, "device": str(device), "machine": platform.machine()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


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

    def spec(self) -> RunSpec:
        try:
            return RunSpec.from_dict(self.read_json(CONFIG)["spec"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{self.path / CONFIG} is not a pyro-vae run config") from e

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the whole metrics file; rows come from the checkpointed history, so none are duplicated."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / METRICS, lambda p: p.write_text(text))

    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(exist_ok=True)
        return p
