"""ELBO estimators: callables ``(model, guide, *args, **kwargs) -> loss`` that ``pyro.infer.SVI`` accepts.

The value of every estimator is the negative bound in nats summed over the data plate, so values
compare across estimators; the gradient is each estimator's own. One file per estimator, one line
per estimator in ``ESTIMATORS``.
"""
from .elbo import ELBO

ESTIMATORS = {"elbo": ELBO}

__all__ = ["ESTIMATORS", "ELBO"]
