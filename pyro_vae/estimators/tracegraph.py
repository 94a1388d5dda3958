"""The ELBO with Rao-Blackwellized score-function gradients and baselines (Pyro's TraceGraph_ELBO, NVIL)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar
from weakref import WeakKeyDictionary

import torch
from pyro.distributions.util import detach
from pyro.infer.enum import get_importance_trace
from pyro.infer.tracegraph_elbo import TrackNonReparam
from pyro.infer.util import MultiFrameTensor
from pyro.ops.provenance import detach_provenance, get_provenance

from pyro_vae.errors import UserError
from pyro_vae.programs.sites import sample_sites

from ._checks import checked_call
from ._weights import _vectorized, check_num_particles, plate_nesting
from .elbo import kl_scaled_guide

_OPTIONS = {"nn_baseline", "nn_baseline_input", "use_decaying_avg_baseline", "baseline_beta", "baseline_value"}


@dataclass(frozen=True)
class TraceGraph:
    """Negative ELBO, -E_q[log p(x, z) - log q(z|x)], with the gradient of Pyro's ``TraceGraph_ELBO``.

    Gradient (Schulman et al. 2015, "Gradient Estimation Using Stochastic Computation Graphs"): a
    reparameterizable guide site gets its path derivative; a site z that is not (Bernoulli,
    Categorical, ...) gets the score-function term (c_z - b_z) d log q(z|.) / d phi, where the
    learning signal c_z holds only the log p and -log q terms downstream of z in the programs'
    dependency structure (Pyro's provenance tracking) and summed only over the plates z is in, so a
    data point's draw is scored by that point's cost alone (Rao-Blackwellization). The baseline b_z
    does not depend on the draw, so the gradient stays unbiased; it lowers the variance:

    - a site marked with Pyro's ``infer={"baseline": {...}}`` gets what it asks for:
      ``nn_baseline`` + ``nn_baseline_input`` (a network b(input), trained by least squares on c_z:
      NVIL, Mnih & Gregor 2014), ``baseline_value`` (a tensor, trained the same way where it has a
      graph), ``use_decaying_avg_baseline`` with ``baseline_beta``. An ``nn_baseline`` must be a
      module the optimizer reaches: a submodule of the guide (see ``guides/bernoulli.py``) or a module
      the guide registers with ``pyro.module``; then SVI's parameter capture steps it;
    - every other site gets a decaying average of its learning signal when ``average_baseline``
      (default): b <- beta b + (1 - beta) mean(c_z), one number per site, updated after each training
      call from the draws of that call (not under ``torch.no_grad``, so evaluation leaves it alone).

    Unlike Pyro's decaying average (one value per batch position, which breaks when the batch size
    changes), the average is one number per site, and its baseline broadcasts over the particles.
    With ``num_particles`` K > 1 the K draws are vectorized in a particle plate and averaged.

    The averages are Python-side state that changes every step, so the replayed training path runs
    this estimator eagerly (``replay_unsafe``); a resumed run starts its averages afresh (still
    unbiased). Requires nothing of the guide: global latents and scaled sites are fine, as for the ELBO.
    """

    num_particles: int = 1
    average_baseline: bool = True
    baseline_beta: float = 0.9
    value_from_log_weights: ClassVar[bool] = True
    replay_unsafe: ClassVar[str | None] = "tracegraph's decaying-average baselines change on every step"
    _averages: WeakKeyDictionary = field(init=False, repr=False, compare=False, default_factory=WeakKeyDictionary)
    _averages_by_id: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        if not 0.0 <= float(self.baseline_beta) < 1.0:
            raise ValueError(f"baseline_beta must be in [0, 1), got {self.baseline_beta}")

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        nesting = plate_nesting(model, *args, **kwargs)
        scaled = kl_scaled_guide(model, guide)

        def run(model_run, guide_run):  # the programs, watched on a first call by checked_call
            return self._loss(model_run, guide_run if scaled is guide else scaled, guide, nesting, args, kwargs)

        # checked_call refuses a model-side enumerated site (naming enum-elbo) on the first call
        return checked_call("tracegraph", model, guide, run, args, kwargs, honours_baselines=True)

    def _loss(self, model, guide, owner, nesting: int, args: tuple, kwargs: dict) -> torch.Tensor:
        k = self.num_particles
        dim = -nesting - 1
        with TrackNonReparam():
            model_tr, guide_tr = get_importance_trace(
                "flat", nesting + 1, _vectorized(model, k, dim), _vectorized(guide, k, dim), args, kwargs)
        model_sites, guide_sites = sample_sites(model_tr), sample_sites(guide_tr)
        elbo = sum(s["log_prob_sum"] for s in model_sites.values()) - sum(s["log_prob_sum"] for s in guide_sites.values())
        value = -detach_provenance(torch.as_tensor(elbo)).detach() / k
        if not torch.is_grad_enabled():
            return value
        # the surrogate: log p, the path terms of log q, and a score-function term per non-reparameterized site
        surrogate = sum(s["log_prob_sum"] for s in model_sites.values())
        costs: dict[str, MultiFrameTensor] = defaultdict(MultiFrameTensor)
        for sign, sites in ((1.0, model_sites), (-1.0, guide_sites)):
            for site in sites.values():
                for name in get_provenance(site["log_prob_sum"]):  # the non-reparameterized draws it depends on
                    costs[name].add((site["cond_indep_stack"], sign * site["log_prob"]))
        for site in guide_sites.values():
            entropy = site["score_parts"].entropy_term
            if torch.is_tensor(entropy):
                surrogate = surrogate - entropy.sum()
        baseline_loss = 0.0
        for name, cost in costs.items():
            site = guide_tr.nodes[name]
            signal = cost.sum_to(site["cond_indep_stack"])
            baseline, loss = self._baseline(owner, name, site, signal)
            baseline_loss = baseline_loss + loss
            surrogate = surrogate + (site["score_parts"].score_function * (signal - baseline).detach()).sum()
        surrogate_loss = detach_provenance((baseline_loss - surrogate) / k)
        return value + (surrogate_loss - surrogate_loss.detach())

    def _baseline(self, guide, name: str, site: dict, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_z, its least-squares loss) for one site's learning signal c_z."""
        options = dict(site["infer"].get("baseline", {}))
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise UserError(f"site {name!r}: unknown baseline option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(_OPTIONS))}")
        net, value = options.get("nn_baseline"), options.get("baseline_value")
        if net is not None and value is not None:
            raise UserError(f"site {name!r} sets both nn_baseline and baseline_value; choose one")
        if net is not None and "nn_baseline_input" not in options:
            raise UserError(f"site {name!r} sets nn_baseline without nn_baseline_input")
        average = options.get("use_decaying_avg_baseline", False) if options else self.average_baseline
        baseline = torch.zeros((), dtype=signal.dtype, device=signal.device)
        if average:
            baseline = baseline + self._update_average(guide, name, signal, options.get("baseline_beta", self.baseline_beta))
        learned = net(detach(options["nn_baseline_input"])) if net is not None else value
        if learned is not None:
            baseline = baseline + learned
        try:
            fits = torch.broadcast_shapes(baseline.shape, signal.shape) == signal.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise UserError(f"the baseline of site {name!r} has shape {tuple(baseline.shape)}, which does not "
                            f"broadcast to its learning signal's {tuple(signal.shape)} (one value per data point)")
        loss = ((signal.detach() - baseline) ** 2).sum() if learned is not None else 0.0
        return baseline, loss

    def _update_average(self, guide, name: str, signal: torch.Tensor, beta: float) -> torch.Tensor:
        """The average before this call's draws (0 on the first call), then fold this call's mean in."""
        try:
            state = self._averages.setdefault(guide, {})
        except TypeError:  # a guide that cannot be weakly referenced: keep its averages by identity
            state = self._averages_by_id.setdefault(id(guide), {})
        mean = detach_provenance(signal.detach()).mean()
        old = state.get(name)
        state[name] = mean if old is None else beta * old + (1.0 - beta) * mean
        return torch.zeros_like(mean) if old is None else old
