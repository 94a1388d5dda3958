"""Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019), per data point and mini-batched."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro_vae.errors import UserError
from pyro_vae.programs.sites import latent_sites, observed_sites, sample_sites

from ._checks import warn_ignored_baselines
from ._weights import _FixedDraws, _site_log_prob, check_num_particles, estimator_log_weights, plate_nesting


def _is_point_mass(fn) -> bool:
    while True:
        if isinstance(fn, dist.Delta):
            return True
        if not hasattr(fn, "base_dist"):
            return False
        fn = fn.base_dist


def _refuse_point_masses(guide_tr) -> None:
    """A point mass's log q has no gradient in its parameters: wake-phi would never move the guide."""
    points = [n for n in latent_sites(guide_tr) if _is_point_mass(guide_tr.nodes[n]["fn"])]
    if points:
        raise UserError(f"rws trains the guide through d log q(z|x) / d phi at fixed draws; {', '.join(points)} "
                        f"is a point mass (Delta), which has none: use iwae or elbo")


@dataclass(frozen=True)
class RWS:
    """Negative IWAE bound as the value; the reweighted wake-sleep gradients.

    Bornschein & Bengio, "Reweighted Wake-Sleep", ICLR 2015; Le, Kosiorek, Siddharth, Teh & Wood,
    "Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow", UAI 2019. The K draws
    z_k ~ q(z|x) are held fixed (detached as they are drawn, so no gradient passes through a draw,
    even into a later site's distribution), w~_k are their normalized importance weights, and

    - wake-theta, the model's gradient: -sum_k w~_k d log p_theta(x, z_k) / d theta, which is the
      gradient of the negative IWAE bound;
    - wake-phi, the guide's gradient: -sum_k w~_k d log q_phi(z_k|x) / d phi, a self-normalized
      estimate of the gradient of KL(p(z|x) || q(z|x)); it needs no reparameterization, and is zero in
      expectation when q is the exact posterior;
    - with ``sleep_phi`` = s > 0, the guide's gradient is (1 - s) wake-phi + s sleep-phi, where sleep-phi
      is -sum_n d log q_phi(z_n | x_n) / d phi on one dream (z_n, x_n) ~ p_theta per data point
      (``model(None, batch_size=B)``); s = 0.5 is Bornschein & Bengio's "wake + sleep" update.

    Unlike Pyro's ``ReweightedWakeSleep``, the weights are normalized per data point, so mini-batches
    are fine and the value is the IWAE bound summed over the data plate, as for ``iwae``.

    Requires: every latent local to ``pyro.plate("data")``; unscaled sites; for ``sleep_phi``, a model
    with one observed site that the guide's first argument stands for. No Python state: the
    replayed training path records it.
    """

    num_particles: int = 5
    sleep_phi: float = 0.0
    value_from_log_weights: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        if not 0.0 <= float(self.sleep_phi) <= 1.0:
            raise ValueError(f"sleep_phi must be in [0, 1], got {self.sleep_phi}")

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        k = self.num_particles
        log_w, (model_tr, guide_tr) = estimator_log_weights("rws", model, guide, k, args, kwargs,
                                                            reparameterized=False, fixed_draws=True)
        warn_ignored_baselines("rws", guide, guide_tr, "its wake-phase guide gradient has no score term to centre")
        _refuse_point_masses(guide_tr)
        value = -(torch.logsumexp(log_w, 0) - math.log(k)).sum()
        if not log_w.requires_grad:
            return value
        nesting = plate_nesting(model, *args, **kwargs)
        log_q = sum(_site_log_prob(s, nesting, False) for s in sample_sites(guide_tr).values())
        log_p = log_w + log_q
        w = torch.softmax(log_w.detach(), 0)
        wake_phi = -(w * log_q).sum()
        surrogate = -(w * log_p).sum()
        if self.sleep_phi:
            wake_phi = (1.0 - self.sleep_phi) * wake_phi + self.sleep_phi * self._sleep_phi(
                model, guide, observed_sites(model_tr), log_w.shape[1], args, kwargs)
        surrogate = surrogate + wake_phi
        return value.detach() + (surrogate - surrogate.detach())

    @staticmethod
    def _sleep_phi(model, guide, observed: list[str], n: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """-sum_n log q(z_n | x_n) on n dreams (z_n, x_n) from the model, draws held fixed."""
        if len(observed) != 1:
            raise UserError(f"rws with sleep_phi needs a model with one observed site (the data the guide "
                            f"reads); {type(model).__name__} has {', '.join(observed) or 'none'}")
        with _FixedDraws():
            dream = poutine.trace(model).get_trace(None, *args[1:], batch_size=n, **kwargs)
        x = dream.nodes[observed[0]]["value"]
        guide_tr = poutine.trace(poutine.replay(guide, trace=dream)).get_trace(x, *args[1:], **kwargs)
        missing = [s for s in latent_sites(guide_tr) if s not in dream.nodes]
        if missing:
            raise UserError(f"rws with sleep_phi: the model's dream has no site {', '.join(missing)} for the guide")
        nesting = plate_nesting(model, *args, **kwargs)
        return -sum(_site_log_prob(s, nesting, False).sum() for s in sample_sites(guide_tr).values())
