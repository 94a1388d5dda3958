"""The inference gap of an amortized guide, split as in Cremer, Li & Duvenaud (2018), "Inference Suboptimality
in Variational Autoencoders":

    log p(x) - L[q]  =  (L[q*] - L[q])  +  (log p(x) - L[q*])
      inference gap     amortization gap    approximation gap

q(z|x) is the amortized guide (one encoder for all points); q*(z|x_n) is the best member of the
variational family fitted to each point on its own, found here by optimizing free per-point parameters.
The amortization gap is what the encoder loses by sharing its parameters; the approximation gap is what
the family itself cannot express.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from tqdm import tqdm

from pyro_vae.analysis.importance import check_proposal
from pyro_vae.analysis.latent_stats import is_real
from pyro_vae.errors import UserError
from pyro_vae.estimators._weights import log_weights, particle_traces
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.programs.sites import _trace, latent_sites


class LocalGaussian(nn.Module):
    """q*(z|x_n) = prod over latent sites of Normal(loc_n, diag scale_n^2): free parameters for each of the B
    points of one batch, shaped like each site's value, and no encoder. A guide for that batch only.

    A plain nn.Module, never in Pyro's param store, so fitting it touches nothing global.
    """

    def __init__(self, init: dict[str, tuple[torch.Tensor, torch.Tensor, int]]):
        super().__init__()
        self.sites = list(init)
        # ParameterDict keys cannot hold every site name (dots), so parameters are indexed by position
        self.locs = nn.ParameterList([nn.Parameter(loc.detach().clone()) for loc, _, _ in init.values()])
        self.log_scales = nn.ParameterList([nn.Parameter(scale.detach().clamp_min(1e-6).log())
                                            for _, scale, _ in init.values()])
        self.event_dims = [e for _, _, e in init.values()]

    @property
    def loc(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.sites, self.locs))

    @property
    def scale(self) -> dict[str, torch.Tensor]:
        return {n: s.exp() for n, s in zip(self.sites, self.log_scales)}

    def forward(self, x: torch.Tensor, **kwargs) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            for name, loc, log_scale, event_dim in zip(self.sites, self.locs, self.log_scales, self.event_dims):
                pyro.sample(name, dist.Normal(loc, log_scale.exp()).to_event(event_dim))


@torch.no_grad()
def gaussian_start(model, guide, x: torch.Tensor, num_draws: int = 256, **kwargs) -> dict[str, tuple]:
    """Per latent site (loc, scale, event_dim) of a mean-field Gaussian matching the guide at x: the guide's own
    mean and standard deviation where it has them (Normal, MultivariateNormal), else moments of its draws."""
    guide_tr, model_tr = _trace(guide, x, **kwargs), _trace(model, x, **kwargs)
    init, moments = {}, []
    for name in latent_sites(guide_tr):
        support = model_tr.nodes[name]["fn"].support
        if not is_real(support):
            raise UserError(f"the local q*(z|x) is Gaussian, but the model's latent {name!r} has support {support}; "
                            "the inference gaps need real-valued latents")
        fn = guide_tr.nodes[name]["fn"]
        try:
            init[name] = (fn.mean, fn.variance.sqrt(), fn.event_dim)
        except NotImplementedError:  # a flow: no closed-form moments
            moments.append(name)
    if moments:
        _, tr = particle_traces(model, guide, num_draws, x, **kwargs)
        for name in moments:
            v = tr.nodes[name]["value"]
            init[name] = (v.mean(0), v.std(0), tr.nodes[name]["fn"].event_dim)
    return init


@torch.no_grad()
def bounds(model, guide, x: torch.Tensor, num_samples: int, max_particles_per_chunk: int = 20000,
           **kwargs) -> tuple[np.ndarray, ...]:
    """Per point, from ``num_samples`` draws of ``guide``: the ELBO (mean log-weight), its Monte Carlo standard
    error, the importance-sampled log p(x) (Burda et al. 2016) and the weights' effective sample size."""
    chunk = max(1, max_particles_per_chunk // x.shape[0])
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    squares, lse, lse2 = torch.zeros_like(total), torch.full_like(total, -math.inf), torch.full_like(total, -math.inf)
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        lw = log_weights(model, guide, k, x, **kwargs)[0].double()
        total += lw.sum(0)
        squares += (lw ** 2).sum(0)
        lse = torch.logaddexp(lse, torch.logsumexp(lw, 0))
        lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * lw, 0))
        done += k
    mean = total / num_samples
    var = (squares / num_samples - mean ** 2).clamp_min(0) * num_samples / max(1, num_samples - 1)
    return tuple(t.cpu().numpy() for t in (mean, (var / num_samples).sqrt(), lse - math.log(num_samples),
                                           (2 * lse - lse2).exp()))


@dataclass(frozen=True)
class InferenceGaps:
    """Per-point bounds of the amortized guide q and the local Gaussian q*, and the gaps between them."""

    points: np.ndarray
    elbo_amortized: np.ndarray          # L[q], mean log-weight of num_samples draws from q
    elbo_amortized_se: np.ndarray       # its Monte Carlo standard error
    elbo_local: np.ndarray              # L[q*]
    elbo_local_se: np.ndarray
    log_likelihood_amortized: np.ndarray  # IS log p(x) with q as the proposal
    log_likelihood_local: np.ndarray      # ... with q*
    ess_amortized: np.ndarray           # effective sample size of q's weights
    ess_local: np.ndarray               # ... of q*'s
    history: np.ndarray                 # (steps,) mean ELBO estimate of q* at each Adam step
    local_loc: dict[str, np.ndarray]
    local_scale: dict[str, np.ndarray]
    steps: int
    particles: int
    num_samples: int

    @property
    def local_proposal_better(self) -> np.ndarray:
        return self.ess_local >= self.ess_amortized

    @property
    def log_likelihood(self) -> np.ndarray:
        """Per point, the IS estimate of the better proposal, the one with the larger ESS (usually q*). Choosing
        by the larger estimate instead would favour whichever happened to overshoot."""
        return np.where(self.local_proposal_better, self.log_likelihood_local, self.log_likelihood_amortized)

    @property
    def amortization_gap(self) -> np.ndarray:
        return self.elbo_local - self.elbo_amortized

    @property
    def approximation_gap(self) -> np.ndarray:
        return self.log_likelihood - self.elbo_local

    @property
    def inference_gap(self) -> np.ndarray:
        return self.log_likelihood - self.elbo_amortized

    def summary(self) -> dict:
        def mean_se(a):
            return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
        out = {"num_points": int(len(self.points)), "steps": self.steps, "particles": self.particles,
               "num_samples": self.num_samples}
        for name in ("elbo_amortized", "elbo_local", "log_likelihood", "amortization_gap", "approximation_gap",
                     "inference_gap"):
            out[name], out[f"{name}_se"] = mean_se(getattr(self, name))
        out["share_local_proposal_better"] = float(np.mean(self.local_proposal_better))
        return out

    def rows(self) -> list[dict]:
        return [{"point": int(p), "elbo_amortized": float(self.elbo_amortized[i]),
                 "elbo_amortized_se": float(self.elbo_amortized_se[i]), "elbo_local": float(self.elbo_local[i]),
                 "elbo_local_se": float(self.elbo_local_se[i]), "log_likelihood": float(self.log_likelihood[i]),
                 "amortization_gap": float(self.amortization_gap[i]),
                 "approximation_gap": float(self.approximation_gap[i])}
                for i, p in enumerate(self.points)]


def inference_gaps(model, guide, x: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 300,
                   particles: int = 16, lr: float = 0.01, num_samples: int = 1000, points: np.ndarray | None = None,
                   max_particles_per_chunk: int = 20000, quiet: bool = True) -> InferenceGaps:
    """Fit a local mean-field Gaussian q*(z|x_n) to every row of ``x`` at once and measure the gaps.

    q* starts at the guide's output for each point (its loc and scale, or a moment match of its draws for a
    guide that is not Gaussian) and is fitted by Adam (learning rate ``lr`` decaying linearly to 0, as Adam
    otherwise keeps stepping ~lr around the optimum whatever the gradient's size) for
    ``steps`` steps on the ELBO with ``particles`` draws per point, all points in one vectorized batch. The
    gradient is the path derivative of Roeder et al. (2017), "Sticking the landing", which vanishes at the
    exact posterior, so a q* already at the optimum stays there. The model's parameters are frozen: only
    q*'s enter the gradient. L[q], L[q*] and log p(x) are then estimated with ``num_samples`` fresh draws.

    The amortization gap is >= 0 when q's family is mean-field Gaussian like q*'s; for a richer guide (full
    covariance, a flow) q may beat q* and the "gap" can be negative. Requires real-valued latents, all
    inside the data plate at dim -1.
    """
    if steps < 0 or particles <= 0 or num_samples <= 0 or not lr > 0:
        raise UserError("inference gaps need steps >= 0, particles > 0, num_samples > 0 and lr > 0")
    check_proposal(guide)
    kw = eval_kwargs(model, y)
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        local = LocalGaussian(gaussian_start(model, guide, x, **kw))
        params = list(local.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / max(1, steps))
        history = np.zeros(steps)
        for t in tqdm(range(steps), desc=f"local q*(z|x) ({x.shape[0]} points)", unit="step", disable=quiet):
            lw = log_weights(model, local, particles, x, stop_guide_params=True, **kw)[0]
            elbo = lw.mean(0)
            grads = torch.autograd.grad(-elbo.sum(), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            sched.step()
            history[t] = float(elbo.detach().mean())
        for p in params:
            p.requires_grad_(False)
        elbo_q, se_q, ll_q, ess_q = bounds(model, guide, x, num_samples, max_particles_per_chunk, **kw)
        elbo_l, se_l, ll_l, ess_l = bounds(model, local, x, num_samples, max_particles_per_chunk, **kw)
    return InferenceGaps(
        points=np.arange(x.shape[0]) if points is None else np.asarray(points),
        elbo_amortized=elbo_q, elbo_amortized_se=se_q, elbo_local=elbo_l, elbo_local_se=se_l,
        log_likelihood_amortized=ll_q, log_likelihood_local=ll_l, ess_amortized=ess_q, ess_local=ess_l,
        history=history,
        local_loc={n: v.detach().cpu().numpy() for n, v in local.loc.items()},
        local_scale={n: v.detach().cpu().numpy() for n, v in local.scale.items()},
        steps=steps, particles=particles, num_samples=num_samples)
