"""How well a trained model/guide pair generates: decode latents drawn from the prior, or from a Gaussian
fitted to the pair's own codes, and score the result on held-out data.

Why two sources: a VAE is trained so that its codes look like draws from N(0, I), so decoding
N(0, I) draws generates data. A plain autoencoder is not: its codes sit wherever reconstruction put
them, and N(0, I) draws land where the decoder has never been trained. Fitting a Gaussian to the
codes repairs part of that; the gap between the two numbers measures how far the codes are from the
prior, and the gap to a VAE what a single Gaussian still misses (holes between the codes).

The score is the generator's own test log-likelihood, log p(x) = log E_{z ~ p(z)} p(x | z),
estimated with S draws: log (1/S) sum_s p(x | z_s). This is importance sampling with the prior as
the proposal (a lower bound in expectation by Jensen, tightening as S grows; loose in high
dimensions, but it uses nothing except draws from the generator, so two pairs at the same S compare
fairly). It is a different number from the evaluation's IS log-likelihood, which uses the guide as
the proposal and exists only for models that define a likelihood.

Requirements: the model draws its latents in ``model(None, batch_size=n)`` and scores data in
``model(x)``; the guide's latents are real-valued; the model takes no labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators._weights import plate_nesting
from pyro_vae.programs.labels import label_use
from pyro_vae.programs.sites import _trace, latent_sites, observed_sites, sample_sites
from pyro_vae.training.rng import program_device, seeded


@dataclass(frozen=True)
class Latents:
    """The names and per-point shapes of a pair's latent sites, to flatten draws to (N, D) and back."""

    shapes: dict[str, torch.Size]

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def flatten(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([values[n].reshape(values[n].shape[0], -1) for n in self.shapes], -1)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in self.shapes.items():
            k = math.prod(shape)
            out[name] = flat[:, i:i + k].reshape(flat.shape[0], *shape)
            i += k
        return out


def _check(model, guide, x: torch.Tensor) -> Latents:
    if label_use(model) is not None:
        raise UserError(f"generation metrics score unconditional generation, but {type(model).__name__} "
                        "takes labels")
    tr = _trace(guide, x)
    shapes = {}
    for name in latent_sites(tr):
        site = tr.nodes[name]
        if site["fn"].support.is_discrete or not site["value"].is_floating_point():
            raise UserError(f"generation metrics need real-valued latents; {type(guide).__name__}'s "
                            f"{name!r} is discrete")
        shapes[name] = site["value"].shape[1:]
    return Latents(shapes)


@torch.no_grad()
def codes(model, guide, data: ArrayDataset, *, mean: bool = True, batch_size: int = 500,
          device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """(N, D) codes of ``data``: E_q[z|x] (``mean=True``; a draw where q has no closed-form mean) or one
    draw z ~ q(z|x) per point (the aggregate posterior the decoder was trained on)."""
    gen = torch.Generator().manual_seed(seed)
    out, latents = [], None
    with pyro.get_param_store().scope(), seeded(seed, device):
        for x, _ in data.batches(batch_size, shuffle=False, generator=gen, device=device):
            latents = latents or _check(model, guide, x)
            tr = poutine.trace(guide).get_trace(x)
            values = {}
            for n in latents.shapes:
                fn, value = tr.nodes[n]["fn"], tr.nodes[n]["value"]
                try:
                    values[n] = fn.mean if mean else value
                except NotImplementedError:  # e.g. a flow: no closed-form mean
                    values[n] = value
            out.append(latents.flatten(values).double().cpu())
    return torch.cat(out)


def fit_gaussian(z: torch.Tensor, jitter: float = 1e-6) -> torch.distributions.MultivariateNormal:
    """The maximum-likelihood full-covariance Gaussian of the rows of ``z`` (jitter keeps it proper)."""
    loc = z.mean(0)
    cov = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    cov = cov + jitter * (cov.diagonal().mean() + 1.0) * torch.eye(z.shape[1], dtype=z.dtype)
    return torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)


@torch.no_grad()
def prior_latents(model, n: int, names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """n draws of the latents ``names`` from the model's own prior, ``model(None, batch_size=n)``, on the
    model's device."""
    with pyro.get_param_store().scope(), seeded(seed, program_device(model)):
        tr = poutine.trace(model).get_trace(None, batch_size=n)
    return {name: tr.nodes[name]["value"] for name in names}


@torch.no_grad()
def decode(model, latents: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the model's data site given values for its latents, (n, ...): the site named by the
    model's ``observed_site`` attribute if it has one, else the last site the program samples."""
    n = next(iter(latents.values())).shape[0]
    tr = _trace(poutine.condition(model, data=latents), None, batch_size=n)
    drawn = [name for name in sample_sites(tr) if name not in latents]
    name = getattr(model, "observed_site", None) or (drawn[-1] if drawn else None)
    if name not in drawn:
        raise UserError(f"{type(model).__name__} samples no data site besides {', '.join(latents)}")
    site = tr.nodes[name]
    try:
        return site["fn"].mean
    except NotImplementedError:
        return site["value"]


@torch.no_grad()
def generator_log_likelihood(model, latents: dict[str, torch.Tensor], data: ArrayDataset, *,
                             max_pairs: int = 20000, device: torch.device | str = "cpu",
                             seed: int = 0) -> torch.Tensor:
    """Per test point (N,): log (1/S) sum_s p(x | z_s) for the S given latent draws (dim 0 of each).

    With z_s ~ p(z) this estimates the test log-likelihood of the generator p(z) p(x|z); with z_s from
    another density r(z), that of the generator r(z) p(x|z). Every model latent must be given. Draws
    and points are scored in chunks of at most ``max_pairs`` (draws x points) pairs.
    """
    s = next(iter(latents.values())).shape[0]
    batch = max(1, min(len(data), max_pairs))
    chunk = max(1, max_pairs // batch)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with pyro.get_param_store().scope():
        for x, _ in data.batches(batch, shuffle=False, generator=gen, device=device):
            nesting = plate_nesting(model, x)
            observed = observed_sites(_trace(model, x))
            lse = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
            for start in range(0, s, chunk):
                # (k, 1, ..., event) per latent: each draw shared by every point, draws left of the model's plates
                part = {n: v[start:start + chunk].to(x.device) for n, v in latents.items()}
                k = next(iter(part.values())).shape[0]
                part = {n: v.reshape(k, *(1,) * nesting, *v.shape[1:]) for n, v in part.items()}
                with pyro.plate("_draws", k, dim=-nesting - 1):
                    tr = poutine.trace(poutine.condition(model, data=part)).get_trace(x)
                missing = latent_sites(tr)
                if missing:
                    raise UserError(f"no draws given for {type(model).__name__}'s latent(s) {', '.join(missing)}")
                lp = torch.zeros(k, x.shape[0], dtype=torch.float64, device=x.device)
                for name in observed:
                    site = tr.nodes[name]
                    term = site["fn"].log_prob(site["value"])
                    term = term.reshape((1,) * (nesting + 1 - term.dim()) + term.shape)
                    if nesting > 1:  # plates inside a data point belong to that point
                        term = term.sum(dim=tuple(range(1, nesting)))
                    lp = lp + term.double()
                lse = torch.logaddexp(lse, torch.logsumexp(lp, 0))
            out.append((lse - math.log(s)).cpu())
    return torch.cat(out)


@torch.no_grad()
def support_fraction(queries: torch.Tensor, reference: torch.Tensor, calibration: torch.Tensor, *,
                     k: int = 5, quantile: float = 0.95) -> float:
    """The share of ``queries`` inside the support of the ``reference`` points, as a k-NN radius sees it.

    A point is inside when its distance to its k-th nearest reference point is at most the
    ``quantile`` of the same distance over ``calibration`` points (held-out draws from the same
    distribution as the reference), so about ``quantile`` of fresh draws from the reference's own
    distribution are inside.
    """
    if reference.shape[0] < k:
        raise UserError(f"support_fraction needs at least k={k} reference points, got {reference.shape[0]}")

    def kth(q: torch.Tensor) -> torch.Tensor:
        return torch.cdist(q.double(), reference.double()).kthvalue(k, dim=1).values

    radius = torch.quantile(kth(calibration), quantile)
    return float((kth(queries) <= radius).double().mean())


@dataclass(frozen=True)
class GenerationReport:
    """Generation scores of one pair: nats per test point (higher is better) and support fractions."""

    prior_log_likelihood: torch.Tensor    # (N,) log-likelihood of test points, decoding z ~ p(z)
    fitted_log_likelihood: torch.Tensor   # (N,) the same, decoding z ~ N(mean, cov of the codes)
    prior_in_support: float               # share of z ~ p(z) inside the aggregate posterior's support
    fitted_in_support: float              # share of z ~ fitted Gaussian inside it
    codes_in_prior_support: float         # share of test codes z ~ q(z|x) inside the prior's support
    num_samples: int

    def summary(self) -> dict:
        def mean_se(a: torch.Tensor) -> tuple[float, float]:
            return float(a.mean()), float(a.std() / math.sqrt(len(a))) if len(a) > 1 else float("nan")

        p, p_se = mean_se(self.prior_log_likelihood)
        f, f_se = mean_se(self.fitted_log_likelihood)
        return {"prior_log_likelihood": p, "prior_log_likelihood_se": p_se,
                "fitted_log_likelihood": f, "fitted_log_likelihood_se": f_se,
                "prior_in_support": self.prior_in_support, "fitted_in_support": self.fitted_in_support,
                "codes_in_prior_support": self.codes_in_prior_support,
                "num_samples": self.num_samples, "num_points": len(self.prior_log_likelihood)}


@torch.no_grad()
def generation_report(model, guide, fit_data: ArrayDataset, test_data: ArrayDataset, *,
                      num_samples: int = 1000, k: int = 5, device: torch.device | str = "cpu",
                      seed: int = 0) -> GenerationReport:
    """Score a pair's generation two ways, on ``test_data``, with ``num_samples`` latent draws each:

    1. z ~ p(z), the model's prior, decoded: what ``pyro-vae sample`` shows;
    2. z ~ N(m, C), the Gaussian fitted to the posterior means of ``fit_data`` (e.g. training points).

    The support fractions (k-NN radii, as in the precision and recall of Kynkaanniemi et al. 2019) say
    how much of each source's mass falls where the decoder was trained: one draw z ~ q(z|x) per
    ``fit_data`` point is the reference (the aggregate posterior; for a point-mass guide the codes
    themselves), one per ``test_data`` point calibrates the radius. The converse,
    ``codes_in_prior_support``, is the share of those test codes that prior draws reach: codes spread
    far wider than N(0, I) contain most prior draws, yet the prior covers few of them.
    """
    if num_samples <= 0:
        raise UserError(f"num_samples must be positive, got {num_samples}")
    x_probe, _ = next(test_data.batches(2, shuffle=False, generator=torch.Generator(), device=device))
    latents = _check(model, guide, x_probe)
    model_latents = latent_sites(_trace(model, x_probe))
    if set(model_latents) != set(latents.shapes):
        raise UserError(f"{type(guide).__name__}'s latents {sorted(latents.shapes)} are not "
                        f"{type(model).__name__}'s {sorted(model_latents)}")
    prior = prior_latents(model, num_samples, list(latents.shapes), seed)
    fitted = fit_gaussian(codes(model, guide, fit_data, device=device, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    z_fit = fitted.loc + torch.randn(num_samples, latents.dim, generator=gen, dtype=fitted.loc.dtype) \
        @ fitted.scale_tril.T
    dtype = next(iter(prior.values())).dtype
    fitted_latents = {n: v.to(device, dtype) for n, v in latents.split(z_fit).items()}
    reference = codes(model, guide, fit_data, mean=False, device=device, seed=seed)
    calibration = codes(model, guide, test_data, mean=False, device=device, seed=seed + 2)
    prior_flat = latents.flatten(prior).double().cpu()
    more_prior = latents.flatten(prior_latents(model, num_samples, list(latents.shapes), seed + 3)).double().cpu()
    return GenerationReport(
        prior_log_likelihood=generator_log_likelihood(model, prior, test_data, device=device, seed=seed),
        fitted_log_likelihood=generator_log_likelihood(model, fitted_latents, test_data, device=device, seed=seed),
        prior_in_support=support_fraction(prior_flat, reference, calibration, k=k),
        fitted_in_support=support_fraction(z_fit, reference, calibration, k=k),
        codes_in_prior_support=support_fraction(calibration, prior_flat, more_prior, k=k),
        num_samples=num_samples)
