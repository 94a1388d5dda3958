"""Run specs: a run's model, guide, estimator, networks, data and training, by name; built into objects here."""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pyro_vae.errors import UserError
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.run_dir import CONFIG, RunDir


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


def make_component(registry: dict[str, type], name: str, what: str, options: dict[str, Any], *,
                   model=None, example: tuple[torch.Tensor, dict[str, Any]] | None = None):
    """Build registry[name] from the options its Config dataclass declares; lists become tuples.

    A class with the capability ``built_from_model = True`` (the auto guide) is built as
    ``cls(model, config, example=x, example_kwargs=kwargs)`` from ``model`` and ``example = (x, kwargs)``,
    a batch as the model is called with it in training."""
    cls = _pick(registry, name, what)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in fields}
    try:
        config = cls.Config(**kwargs)
        if getattr(cls, "built_from_model", False):
            if model is None or example is None:
                raise ValueError("it is built from the model and an example batch; pass model= and example=")
            return cls(model, config, example=example[0], example_kwargs=example[1])
        return cls(config)
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


def read_spec(run: RunDir) -> RunSpec:
    """The spec a run folder was made with (its config.json)."""
    try:
        return RunSpec.from_dict(run.read_json(CONFIG)["spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{run.path / CONFIG} is not a pyro-vae run config") from e
