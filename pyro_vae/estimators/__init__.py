"""ELBO estimators: callables ``(model, guide, *args, **kwargs) -> loss`` that ``pyro.infer.SVI`` accepts.

The value of every estimator is the negative bound in nats summed over the data plate, so values
compare across estimators; the gradient is each estimator's own. One file per estimator, one line
per estimator in ``ESTIMATORS``. ``value_from_log_weights`` says whether the value is a function of
the importance log-weights log p(x,z) - log q(z|x) alone (then it equals log p(x) exactly when the
guide is the exact posterior).
"""
from .analytic_kl import AnalyticKL
from .dreg import DReG
from .elbo import ELBO
from .enum_elbo import EnumELBO
from .iwae import IWAE
from .renyi import Renyi
from .stl import STL

ESTIMATORS = {
    "elbo": ELBO,
    "analytic-kl": AnalyticKL,
    "enum-elbo": EnumELBO,
    "iwae": IWAE,
    "dreg": DReG,
    "stl": STL,
    "renyi": Renyi,
}

__all__ = ["ESTIMATORS", "AnalyticKL", "DReG", "ELBO", "EnumELBO", "IWAE", "Renyi", "STL"]
