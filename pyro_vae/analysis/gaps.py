"""The inference gap of an amortized guide, split as in Cremer, Li & Duvenaud (2018), "Inference Suboptimality
in Variational Autoencoders":

    log p(x) - L[q]  =  (L[q*] - L[q])  +  (log p(x) - L[q*])
      inference gap     amortization gap    approximation gap

q(z|x) is the amortized guide (one encoder for all points); q*(z|x_n) is the best member of the
variational family fitted to each point on its own, found here by optimizing free per-point parameters.
The amortization gap is what the encoder loses by sharing its parameters; the approximation gap is what
the family itself cannot express. log p(x) is estimated from both proposals' draws at once (multiple
importance sampling), so it is never a poor proposal's estimate alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from tqdm import tqdm

from pyro_vae.analysis.evaluation import CHUNK
from pyro_vae.analysis.importance import check_proposal
from pyro_vae.analysis.local_fit import LocalGaussian, gaussian_start
from pyro_vae.errors import UserError
from pyro_vae.estimators._weights import _site_log_prob, _vectorized, log_weights, plate_nesting
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.programs.sites import sample_sites

DISAGREE_Z = 3.0  # two IS estimates of one log p(x) "disagree" when this many standard errors apart


def _log_density(program, values: poutine.Trace, k: int, nesting: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """log r(z) per draw and point, (k, B), of the proposal ``program`` at the draws held in ``values``."""
    tr = poutine.trace(poutine.replay(_vectorized(program, k, -nesting - 1), trace=values)).get_trace(x, **kwargs)
    lp = sum(_site_log_prob(site, nesting, False) for site in sample_sites(tr).values())
    return torch.nan_to_num(lp, nan=-math.inf)  # a draw on the edge of the other proposal's support


@dataclass(frozen=True)
class _Draws:
    """What ``num_samples`` draws z_s from one proposal r say, per point: the ELBO of r and its Monte Carlo
    error, the IS log p(x) with r alone (and its error, ESS), and for the mixture m = q/2 + q*/2 the log
    weights log p(x, z_s) / m(z_s) and the control variate q*(z_s) / m(z_s) - 1, both (S, B)."""

    elbo: torch.Tensor
    elbo_se: torch.Tensor
    log_likelihood: torch.Tensor
    log_likelihood_se: torch.Tensor
    ess: torch.Tensor
    log_mixture_weights: torch.Tensor
    control: torch.Tensor


@torch.no_grad()
def _draw(model, proposal, other, x: torch.Tensor, num_samples: int, max_particles_per_chunk: int, *,
          proposal_is_local: bool, **kwargs) -> _Draws:
    chunk = max(1, max_particles_per_chunk // x.shape[0])
    nesting = plate_nesting(model, x, **kwargs)
    lws, mixed, controls = [], [], []
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        lw, (_, prop_tr) = log_weights(model, proposal, k, x, **kwargs)
        log_r = sum(_site_log_prob(site, nesting, False) for site in sample_sites(prop_tr).values())
        log_other = _log_density(other, prop_tr, k, nesting, x, **kwargs)
        lw, log_r, log_other = lw.double(), log_r.double(), log_other.double()
        log_m = torch.logaddexp(log_r, log_other) - math.log(2.0)
        log_local = log_r if proposal_is_local else log_other
        lws.append(lw)
        mixed.append(lw + log_r - log_m)
        controls.append(torch.exp(log_local - log_m) - 1.0)
        done += k
    lw = torch.cat(lws)
    s = num_samples
    mean = lw.mean(0)
    var = lw.var(0) if s > 1 else torch.zeros_like(mean)
    lse, lse2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
    # the delta method: sd(log mean w) ~ sd(w) / (sqrt(S) mean w), and mean(w^2) / mean(w)^2 = S / ESS
    ratio = (s * (lse2 - 2 * lse).exp() - 1).clamp_min(0) * s / max(1, s - 1)
    return _Draws(mean, (var / s).sqrt(), lse - math.log(s), (ratio / s).sqrt(), (2 * lse - lse2).exp(),
                  torch.cat(mixed), torch.cat(controls))


def mixture_log_likelihood(a: _Draws, b: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) per point from S draws of each of q and q*, weighted against the mixture m = q/2 + q*/2, with
    a control variate (Owen & Zhou 2000, "Safe and effective importance sampling"; the mixture weights are
    the balance heuristic of Veach & Guibas 1995):

        p^(x) = mean over the 2S draws of [p(x, z)/m(z) - beta h(z)],   h = q*/m - 1,   E_m[h] = 0,

    beta fitted by least squares over the draws. Each weight p/m is at most 2 p/q and 2 p/q*, so the
    mixture's tail is that of the better proposal at every z: one that misses posterior mass (a narrow
    encoder, a q* on one of two modes) cannot drag the estimate down as an estimate from it alone would.
    The control variate makes the estimate exact when the posterior is q or q* (p/m is then linear in h);
    with the best beta its variance is at most that of IS with either proposal alone and its S draws
    (Owen & Zhou, theorem 2). It is consistent: the fitted beta's bias is O(1/S). Where the fitted correction would make p^ <= 0, the plain mixture
    estimate is taken. Returns log p^(x) and its standard error (delta method over the residuals)."""
    log_y = torch.cat([a.log_mixture_weights, b.log_mixture_weights])
    h = torch.cat([a.control, b.control])
    top = log_y.max(0).values
    y = (log_y - top).exp()
    hc = h - h.mean(0)
    var_h = (hc ** 2).mean(0)
    beta = torch.where(var_h > 1e-12, (hc * (y - y.mean(0))).mean(0) / var_h.clamp_min(1e-300), 0.0)
    corrected = y.mean(0) - beta * h.mean(0)
    ok = corrected > 0
    beta = torch.where(ok, beta, 0.0)
    p = torch.where(ok, corrected, y.mean(0))
    residual = y - beta * h
    se = residual.std(0) / math.sqrt(y.shape[0]) / p
    return p.log() + top, se


@dataclass(frozen=True)
class InferenceGaps:
    """Per-point bounds of the amortized guide q and the local Gaussian q*, and the gaps between them."""

    points: np.ndarray
    elbo_amortized: np.ndarray          # L[q], mean log-weight of num_samples draws from q
    elbo_amortized_se: np.ndarray       # its Monte Carlo standard error
    elbo_local: np.ndarray              # L[q*]
    elbo_local_se: np.ndarray
    log_likelihood: np.ndarray          # log p(x) from both proposals' draws (``mixture_log_likelihood``)
    log_likelihood_se: np.ndarray       # its Monte Carlo standard error (delta method)
    log_likelihood_amortized: np.ndarray  # IS log p(x) with q alone as the proposal
    log_likelihood_amortized_se: np.ndarray
    log_likelihood_local: np.ndarray      # ... with q* alone
    log_likelihood_local_se: np.ndarray
    ess_amortized: np.ndarray           # effective sample size of q's weights
    ess_local: np.ndarray               # ... of q*'s
    history: np.ndarray                 # (steps,) mean ELBO estimate of q* at each Adam step
    local_loc: dict[str, np.ndarray]    # q*'s parameters, in each site's unconstrained space
    local_scale: dict[str, np.ndarray]
    steps: int
    particles: int
    num_samples: int
    local_transformed: tuple[str, ...] = ()  # sites whose q* lives in an unconstrained space (not real-valued)

    @property
    def local_proposal_better(self) -> np.ndarray:
        return self.ess_local >= self.ess_amortized

    @property
    def disagree(self) -> np.ndarray:
        """Points where q alone and q* alone give IS estimates of log p(x) more than ``DISAGREE_Z`` standard
        errors apart: at least one of them misses posterior mass there (its error bar is then too small as
        well). The mixture estimate covers what either proposal reaches, but read those points with care."""
        diff = np.abs(self.log_likelihood_amortized - self.log_likelihood_local)
        return diff > DISAGREE_Z * np.hypot(self.log_likelihood_amortized_se, self.log_likelihood_local_se)

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
        out["points_disagree"] = int(self.disagree.sum())
        out["local_transformed"] = list(self.local_transformed)
        return out

    def rows(self) -> list[dict]:
        disagree = self.disagree
        return [{"point": int(p), "elbo_amortized": float(self.elbo_amortized[i]),
                 "elbo_amortized_se": float(self.elbo_amortized_se[i]), "elbo_local": float(self.elbo_local[i]),
                 "elbo_local_se": float(self.elbo_local_se[i]), "log_likelihood": float(self.log_likelihood[i]),
                 "log_likelihood_se": float(self.log_likelihood_se[i]),
                 "log_likelihood_amortized": float(self.log_likelihood_amortized[i]),
                 "log_likelihood_local": float(self.log_likelihood_local[i]),
                 "amortization_gap": float(self.amortization_gap[i]),
                 "approximation_gap": float(self.approximation_gap[i]), "disagree": bool(disagree[i])}
                for i, p in enumerate(self.points)]


def inference_gaps(model, guide, x: torch.Tensor, y: torch.Tensor | None = None, *, steps: int = 300,
                   particles: int = 16, lr: float = 0.01, num_samples: int = 1000, points: np.ndarray | None = None,
                   max_particles_per_chunk: int = CHUNK, quiet: bool = True) -> InferenceGaps:
    """Fit a local mean-field Gaussian q*(z|x_n) to every row of ``x`` at once and measure the gaps.

    q* (``local_fit.LocalGaussian``) is Gaussian in each latent's unconstrained space (``biject_to`` of its
    support, with the Jacobian in its density), so positive, interval, simplex and mixture-distributed
    latents are fitted like real-valued ones; discrete latents are refused. q* starts at the guide's output
    for each point (its loc and scale, or a moment match of its draws mapped to the unconstrained space)
    and is fitted by Adam (learning rate ``lr`` decaying linearly to 0, as Adam otherwise keeps stepping
    ~lr around the optimum whatever the gradient's size) for ``steps`` steps on the ELBO with ``particles``
    draws per point, all points in one vectorized batch. The gradient is the path derivative of Roeder et
    al. (2017), "Sticking the landing", which vanishes at the exact posterior, so a q* already at the
    optimum stays there. The model's parameters are frozen: only q*'s enter the gradient.

    Then ``num_samples`` fresh draws from each of q and q* give L[q] and L[q*], and all 2 x ``num_samples``
    draws together give log p(x) by multiple importance sampling with the mixture q/2 + q*/2 and a control
    variate (``mixture_log_likelihood``): consistent, exact where q or q* is the posterior, and not led astray by a proposal that misses posterior mass
    (taking the estimate of one proposal, chosen by its ESS, was: a narrow encoder has a high ESS and a far
    too low estimate). ``disagree`` marks the points where the two proposals' own estimates differ beyond
    their standard errors.

    The amortization gap is >= 0 when q's family is mean-field Gaussian like q*'s; for a richer guide (full
    covariance, a flow) q may beat q* and the "gap" can be negative. Requires continuous latents, all
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
        q = _draw(model, guide, local, x, num_samples, max_particles_per_chunk, proposal_is_local=False, **kw)
        q_star = _draw(model, local, guide, x, num_samples, max_particles_per_chunk, proposal_is_local=True, **kw)
        ll, ll_se = mixture_log_likelihood(q, q_star)

    def np_(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    return InferenceGaps(
        points=np.arange(x.shape[0]) if points is None else np.asarray(points),
        elbo_amortized=np_(q.elbo), elbo_amortized_se=np_(q.elbo_se), elbo_local=np_(q_star.elbo),
        elbo_local_se=np_(q_star.elbo_se), log_likelihood=np_(ll), log_likelihood_se=np_(ll_se),
        log_likelihood_amortized=np_(q.log_likelihood), log_likelihood_amortized_se=np_(q.log_likelihood_se),
        log_likelihood_local=np_(q_star.log_likelihood), log_likelihood_local_se=np_(q_star.log_likelihood_se),
        ess_amortized=np_(q.ess), ess_local=np_(q_star.ess), history=history,
        local_loc={n: np_(v) for n, v in local.loc.items()},
        local_scale={n: np_(v) for n, v in local.scale.items()},
        steps=steps, particles=particles, num_samples=num_samples, local_transformed=tuple(local.transformed))
