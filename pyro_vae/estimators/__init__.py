"""ELBO estimators: callables ``(model, guide, *args, **kwargs) -> loss`` that ``pyro.infer.SVI`` accepts.

The value of every estimator is the negative bound in nats summed over the data plate, so values
compare across estimators; the gradient is each estimator's own. One file per estimator, one line
per estimator in ``ESTIMATORS``. ``value_from_log_weights`` says whether the value is a function of
the importance log-weights log p(x,z) - log q(z|x) alone (then it equals log p(x) exactly when the
guide is the exact posterior). ``replay_unsafe`` (a reason, or None) marks an estimator with Python
state that changes between steps, which the replayed training path must run eagerly.
"""
from .analytic_kl import AnalyticKL
from .dreg import DReG
from .elbo import ELBO
from .enum_elbo import EnumELBO
from .iwae import IWAE
from .renyi import Renyi
from .rws import RWS
from .stl import STL
from .tracegraph import TraceGraph
from .vimco import VIMCO

ESTIMATORS = {
    "elbo": ELBO,
    "analytic-kl": AnalyticKL,
    "enum-elbo": EnumELBO,
    "iwae": IWAE,
    "dreg": DReG,
    "stl": STL,
    "renyi": Renyi,
    "tracegraph": TraceGraph,
    "vimco": VIMCO,
    "rws": RWS,
}

__all__ = ["ESTIMATORS", "AnalyticKL", "DReG", "ELBO", "EnumELBO", "IWAE", "RWS", "Renyi", "STL", "TraceGraph", "VIMCO"]
