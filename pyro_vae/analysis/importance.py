"""Per-point importance diagnostics of a guide q(z|x) as a proposal for the posterior p(z|x), as ArviZ data.

For each data point, S draws z_s ~ q(z|x) and their log-weights log w_s = log p(x, z_s) - log q(z_s|x)
give three numbers:

- the PSIS Pareto shape k-hat of the weights' right tail (Vehtari et al. 2024, "Pareto smoothed
  importance sampling"; Yao et al. 2018, "Yes, but did it work?: evaluating variational inference"):
  below 0.5 the weights have finite variance and q is a good proposal; between 0.5 and 0.7 IS still
  works, slowly; above 0.7 the IS estimates (and q as an approximation of p(z|x)) are unreliable;
- the importance-sampling effective sample size 1 / sum_s w~_s^2 of the normalized weights w~ (Kong 1992),
  from 1 (one draw carries all the weight) to S (q is p(z|x));
- the importance-sampled log p(x) = logsumexp_s log w_s - log S (Burda et al. 2016), and the ELBO,
  the mean of the log-weights.

Works for any model/guide pair whose latents all sit in the data plate at dim -1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyro
import torch
from tqdm import tqdm

from pyro_vae.analysis.evaluation import CHUNK
from pyro_vae.analysis.latent_stats import per_point
from pyro_vae.errors import UserError
from pyro_vae.estimators._weights import log_weights
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.programs.sites import _trace, latent_sites, observed_sites

if TYPE_CHECKING:
    import arviz as az

KHAT_GOOD, KHAT_BAD = 0.5, 0.7  # Yao et al. (2018), section 3
MIN_SAMPLES = 100  # the Pareto fit uses the largest ~3 sqrt(S) weights; ArviZ reports k-hat = inf at S <= 20
NETCDF_ENGINE = "h5netcdf"


def check_num_samples(num_samples: int) -> None:
    if num_samples < MIN_SAMPLES:
        raise UserError(f"--samples {num_samples} is too few for a Pareto k-hat: PSIS fits the largest ~3 sqrt(S) "
                        f"weights, so it needs S >= {MIN_SAMPLES} draws per point (1000 is a good default)")


def check_proposal(guide) -> None:
    """A guide that declares ``has_density = False`` (a point mass) cannot weigh its own draws."""
    if getattr(guide, "has_density", True) is False:
        raise UserError(f"{type(guide).__name__} is a point mass with no density, so it is no importance-sampling "
                        "proposal: k-hat, ESS, log p(x) and the inference gaps are undefined for it")


def khat_category(k: float) -> str:
    """Yao et al. (2018): good below 0.5, ok up to 0.7, bad above (IS and q unreliable)."""
    return "good" if k <= KHAT_GOOD else "ok" if k <= KHAT_BAD else "bad"


def pareto_khat(log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(PSIS-smoothed normalized log-weights, k-hat) along the last axis, with ArviZ's ``psislw``.

    Weights that are constant to rounding (q is exactly p(z|x)) leave PSIS no tail to fit, and ArviZ then
    reports k-hat = inf; they are bounded, the best case, so k-hat = -inf is returned for them instead."""
    import arviz as az  # slow to import (it loads pyplot): only where used

    log_w = np.asarray(log_w, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns on large k-hat; we report k-hat ourselves
        smoothed, khat = az.psislw(log_w.copy())
    khat = np.asarray(khat, dtype=np.float64).copy()
    spread = log_w.max(-1) - log_w.min(-1)
    constant = spread <= 1e-9 * np.maximum(1.0, np.abs(log_w).max(-1))
    khat[constant] = -np.inf
    smoothed[constant] = -math.log(log_w.shape[-1])
    return smoothed, khat


def latent_dim_name(site: str, sites: list[str]) -> str:
    """``latent`` when the model has one latent site; ``latent_<site>`` per site otherwise, since one xarray
    dim has one length and sites differ in size."""
    return "latent" if len(sites) == 1 else f"latent_{site}"


@dataclass(frozen=True)
class ImportanceDiagnostics:
    """Draws from q(z|x) and their log-weights for N points, with the PSIS/ESS/log p(x) summaries per point."""

    points: np.ndarray                 # (N,) index of each point in its dataset
    log_weights: np.ndarray            # (N, S) log p(x, z_s) - log q(z_s | x)
    latents: dict[str, np.ndarray]     # site -> (N, S, F) draws z_s ~ q(z|x), flattened per site
    x: np.ndarray                      # (N, D) the points
    labels: np.ndarray | None          # (N,) or None
    observed: str                      # the model's observed site holding x
    khat: np.ndarray                   # (N,) PSIS Pareto k-hat

    @property
    def num_samples(self) -> int:
        return self.log_weights.shape[1]

    @property
    def normalized_weights(self) -> np.ndarray:
        lw = self.log_weights - self.log_weights.max(1, keepdims=True)
        w = np.exp(lw)
        return w / w.sum(1, keepdims=True)

    @property
    def ess(self) -> np.ndarray:
        """1 / sum_s w~_s^2 per point, from the raw (not smoothed) normalized weights."""
        return 1.0 / (self.normalized_weights ** 2).sum(1)

    @property
    def log_likelihood(self) -> np.ndarray:
        lw = self.log_weights
        m = lw.max(1)
        return m + np.log(np.exp(lw - m[:, None]).sum(1)) - math.log(self.num_samples)

    @property
    def elbo(self) -> np.ndarray:
        return self.log_weights.mean(1)

    def smoothed_weights(self) -> np.ndarray:
        """PSIS-smoothed normalized weights (N, S): reweight q's draws towards p(z|x) with them."""
        return np.exp(pareto_khat(self.log_weights)[0])

    def summary(self) -> dict:
        k = self.khat
        return {"num_points": int(len(k)), "num_samples": self.num_samples,
                "khat_mean": float(np.mean(k)), "khat_median": float(np.median(k)), "khat_max": float(np.max(k)),
                "share_khat_ok": float(np.mean((k > KHAT_GOOD) & (k <= KHAT_BAD))),
                "share_khat_bad": float(np.mean(k > KHAT_BAD)),
                "ess_mean": float(self.ess.mean()), "ess_ratio_mean": float(self.ess.mean() / self.num_samples),
                "log_likelihood": float(self.log_likelihood.mean()), "elbo": float(self.elbo.mean())}

    def rows(self) -> list[dict]:
        """One row per point: the table of ``az.summary`` turned to importance sampling."""
        ess, ll, elbo = self.ess, self.log_likelihood, self.elbo
        return [{"point": int(p), "label": int(self.labels[i]) if self.labels is not None else "",
                 "khat": float(self.khat[i]), "khat_category": khat_category(self.khat[i]),
                 "ess": float(ess[i]), "ess_ratio": float(ess[i] / self.num_samples),
                 "log_likelihood": float(ll[i]), "elbo": float(elbo[i])}
                for i, p in enumerate(self.points)]

    def to_inference_data(self) -> az.InferenceData:
        """An ``az.InferenceData`` built with ``az.from_dict``.

        - ``posterior``: one variable per latent site, dims (point, draw, latent): the S draws from q(z|x) of
          each point, unweighted (weight them with ``sample_stats.log_weight``). ArviZ's first axis is the
          chain; here each point's draws form one chain of their own, renamed ``point``, because each point
          has its own target p(z|x) and cross-chain statistics (r-hat) across points would mean nothing.
          For ArviZ's plots of one point use ``point_posterior(idata, point)``.
        - ``sample_stats``: ``log_weight`` (point, draw); ``khat``, ``ess``, ``log_likelihood``, ``elbo`` (point).
        - ``observed_data``: the points, under the model's observed site name; ``constant_data``: labels.
        """
        import arviz as az

        sites = list(self.latents)
        dims = {s: [latent_dim_name(s, sites)] for s in sites}
        dims[self.observed] = ["point", f"{self.observed}_dim"]
        constant = None
        if self.labels is not None:
            constant = {"label": self.labels}
            dims["label"] = ["point"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "more chains than draws": the chains are points
            idata = az.from_dict(posterior=dict(self.latents), sample_stats={"log_weight": self.log_weights},
                                 observed_data={self.observed: self.x}, constant_data=constant,
                                 coords={"chain": self.points, "point": self.points}, dims=dims)
        groups = {g: idata[g].rename({"chain": "point"}) if "chain" in idata[g].dims else idata[g]
                  for g in idata.groups()}
        idata = az.InferenceData(**groups)
        stats = idata.sample_stats
        for name, values in (("khat", self.khat), ("ess", self.ess), ("log_likelihood", self.log_likelihood),
                             ("elbo", self.elbo)):
            stats[name] = ("point", np.asarray(values, dtype=np.float64))
        for g in idata.groups():
            idata[g].attrs.update({"inference_library": "pyro", "proposal": "amortized guide q(z|x)",
                                   "num_samples": self.num_samples, "khat_good": KHAT_GOOD, "khat_bad": KHAT_BAD})
        return idata


def point_posterior(idata: az.InferenceData, point: int) -> az.InferenceData:
    """One point's draws from q(z|x) as a one-chain InferenceData, for ArviZ's plots and summaries."""
    import arviz as az

    post = idata.posterior.sel(point=point).drop_vars("point").expand_dims(chain=1)
    return az.InferenceData(posterior=post)


def save_netcdf(idata: az.InferenceData, path: Path) -> Path:
    try:
        idata.to_netcdf(str(path), engine=NETCDF_ENGINE)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    return path


@torch.no_grad()
def importance_diagnostics(model, guide, x: torch.Tensor, y: torch.Tensor | None = None, *,
                           num_samples: int = 1000, points: np.ndarray | None = None,
                           max_particles_per_chunk: int = CHUNK, quiet: bool = True) -> ImportanceDiagnostics:
    """Draw ``num_samples`` z ~ q(z|x) per row of ``x`` and compute log-weights, k-hat, ESS and log p(x).

    Labels ``y`` reach the programs through ``labels.eval_kwargs`` (log p(x | y) for a conditional model).
    Draws are made in chunks of at most ``max_particles_per_chunk`` (draws x points) to bound memory.
    Seed torch beforehand for reproducible draws.
    """
    check_num_samples(num_samples)
    check_proposal(guide)
    kw = eval_kwargs(model, y)
    n = x.shape[0]
    chunk = max(1, max_particles_per_chunk // n)
    lws, draws = [], {}
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        tr = _trace(model, x, **kw)
        observed = [n for n in observed_sites(tr) if tr.nodes[n]["value"] is x] or observed_sites(tr) or ["x"]
        bar = tqdm(total=num_samples, desc=f"importance diagnostics ({n} points)", unit="draw", disable=quiet)
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            lw, (_, guide_tr) = log_weights(model, guide, k, x, **kw)
            lws.append(lw.double().T.cpu())
            for name in latent_sites(guide_tr):
                site = guide_tr.nodes[name]
                draws.setdefault(name, []).append(per_point(site["value"], site["fn"].event_dim, particles=True).cpu())
            done += k
            bar.update(k)
        bar.close()
    log_w = torch.cat(lws, 1).numpy()
    if not np.isfinite(log_w).all():
        raise UserError("some log-weights are not finite: the guide draws latents where the model has no density")
    return ImportanceDiagnostics(
        points=np.arange(n) if points is None else np.asarray(points), log_weights=log_w,
        latents={name: torch.cat(v, 1).numpy() for name, v in draws.items()},
        x=x.detach().cpu().numpy(), labels=None if y is None else y.detach().cpu().numpy(),
        observed=observed[0], khat=pareto_khat(log_w)[1])
