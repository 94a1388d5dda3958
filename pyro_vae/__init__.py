"""pyro-vae: variational autoencoders written as Pyro programs.

The public API. Models (``pyro_vae.models``), guides (``pyro_vae.guides``) and estimators
(``pyro_vae.estimators``) are packages of their own, each with its registry (``MODELS``, ``GUIDES``,
``ESTIMATORS``), re-exported here. Everything a notebook needs is importable from this module; the
subpackages (``data``, ``training``, ``analysis``, ``plots``, ``cli``) hold the implementation.

Names that pull in ArviZ or Matplotlib are imported on first use, so ``import pyro_vae`` stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pyro_vae.analysis.evaluation import Evaluation, evaluate
from pyro_vae.data import ArrayDataset, load_dataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.estimators._weights import log_weights
from pyro_vae.guides import GUIDES
from pyro_vae.models import MODELS
from pyro_vae.nets import mlp, split_loc_scale
from pyro_vae.programs.sites import check_pairing
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import History, fit

# name -> module, imported when the name is first read
_LAZY = {
    "importance_diagnostics": "pyro_vae.analysis.importance",
    "point_posterior": "pyro_vae.analysis.importance",
    "KHAT_GOOD": "pyro_vae.analysis.importance",
    "KHAT_BAD": "pyro_vae.analysis.importance",
    "inference_gaps": "pyro_vae.analysis.gaps",
    "latent_health": "pyro_vae.analysis.latent_stats",
    "active_units": "pyro_vae.analysis.latent_stats",
    "gradient_snr": "pyro_vae.analysis.snr",
    "codes": "pyro_vae.analysis.generation",
    "decode": "pyro_vae.analysis.generation",
    "fit_gaussian": "pyro_vae.analysis.generation",
    "prior_latents": "pyro_vae.analysis.generation",
    "generation_report": "pyro_vae.analysis.generation",
    "posterior_means": "pyro_vae.plots.run",
    "diagnose": "pyro_vae.cli.diagnose",
    "compare": "pyro_vae.cli.compare",
    "parse_estimators": "pyro_vae.cli.compare",
    "RunSpec": "pyro_vae.cli.runs",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from pyro_vae.analysis.gaps import inference_gaps
    from pyro_vae.analysis.generation import codes, decode, fit_gaussian, generation_report, prior_latents
    from pyro_vae.analysis.importance import KHAT_BAD, KHAT_GOOD, importance_diagnostics, point_posterior
    from pyro_vae.analysis.latent_stats import active_units, latent_health
    from pyro_vae.analysis.snr import gradient_snr
    from pyro_vae.cli.compare import compare, parse_estimators
    from pyro_vae.cli.diagnose import diagnose
    from pyro_vae.cli.runs import RunSpec
    from pyro_vae.plots.run import posterior_means


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ArrayDataset", "ESTIMATORS", "Evaluation", "GUIDES", "History", "KHAT_BAD", "KHAT_GOOD",
           "MODELS", "RunSpec", "TrainConfig", "UserError", "active_units", "check_pairing", "codes",
           "compare", "decode", "diagnose", "evaluate", "fit", "fit_gaussian", "generation_report",
           "gradient_snr", "importance_diagnostics", "inference_gaps", "latent_health", "load_dataset",
           "log_weights", "mlp", "parse_estimators", "point_posterior", "posterior_means", "prior_latents", "split_loc_scale"]
__version__ = "0.1.0"
