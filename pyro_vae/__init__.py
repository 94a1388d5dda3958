"""pyro-vae: variational autoencoders written as Pyro programs.

Models (``pyro_vae.models``) and guides (``pyro_vae.guides``) are PyroModules whose ``forward`` is a
Pyro program; estimators (``pyro_vae.estimators``) are losses that ``pyro.infer.SVI`` accepts.
"""
from .data import ArrayDataset, load_dataset
from .errors import UserError
from .estimators import ESTIMATORS
from .evaluation import Evaluation, evaluate, log_weights
from .runs import RunSpec, TrainConfig
from .sites import check_pairing
from .train import fit

__all__ = ["ArrayDataset", "ESTIMATORS", "Evaluation", "RunSpec", "TrainConfig", "UserError",
           "check_pairing", "evaluate", "fit", "load_dataset", "log_weights"]
__version__ = "0.1.0"
