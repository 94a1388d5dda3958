"""Per-latent statistics of a trained pair: KL to the prior, active units and posterior collapse, read from traces.

Every function reads the latent site names from the guide's trace and works for any model/guide pair
whose latents are local to the data plate (dim -1). A site's values are flattened per data point, so a
site with event shape (C, H, W) counts as C*H*W latent units.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.estimators._checks import model_only_enumerated
from pyro_vae.estimators._enumerated import enumerated_trace, summed_log_density
from pyro_vae.estimators._weights import _site_log_prob, _vectorized, particle_traces, plate_nesting
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.programs.sites import _trace, latent_sites, mean_or_sample, sample_sites

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016), section 5.2


def per_point(value: torch.Tensor, event_dim: int, particles: bool = False) -> torch.Tensor:
    """A site's value with the data plate's dim first and the rest flattened: (B, F), or (B, k, F) for a
    trace vectorized over k particles (which lead the batch shape).

    The data plate is dim -1 of the site's batch shape, whatever other plates nest inside it."""
    v = value.movedim(value.dim() - event_dim - 1, 0)
    return v.reshape(v.shape[0], v.shape[1], -1) if particles else v.reshape(v.shape[0], -1)


def is_real(support) -> bool:
    """Whether a site's support is all of R^n (what a Gaussian, a traversal or an interpolation needs)."""
    while isinstance(support, torch.distributions.constraints.independent):
        support = support.base_constraint
    return support is torch.distributions.constraints.real


def real_sites(model, x: torch.Tensor, **kwargs) -> list[str]:
    """The model's latent sites with real-valued support (not discrete, not constrained)."""
    tr = _trace(model, x, **kwargs)
    return [n for n in latent_sites(tr) if is_real(tr.nodes[n]["fn"].support)]


def unflatten(flat: torch.Tensor, like: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Undo ``per_point``: (B', F) values back into a site's layout, ``like`` being a value of that site."""
    axis = like.dim() - event_dim - 1
    shape = like.movedim(axis, 0).shape[1:]
    return flat.reshape(flat.shape[0], *shape).movedim(0, axis)


@torch.no_grad()
def posterior_means(guide, x: torch.Tensor, **kwargs) -> dict[str, tuple[torch.Tensor, int]]:
    """(E_q[z | x], event_dim) per latent site, in the site's own layout (a draw where the guide has no
    closed-form mean). ``kwargs`` go to the guide (labels)."""
    tr = _trace(guide, x, **kwargs)
    return {n: (mean_or_sample(tr.nodes[n]["fn"], tr.nodes[n]["value"]), tr.nodes[n]["fn"].event_dim)
            for n in latent_sites(tr)}


def _batches(data: ArrayDataset, batch_size: int, device):
    yield from data.batches(batch_size, shuffle=False, generator=torch.Generator().manual_seed(0), device=device)


def _enumerated(model_tr, guide_tr) -> list[str]:
    return model_only_enumerated(sample_sites(model_tr), guide_tr.nodes)


def _guide_values(guide_tr) -> poutine.Trace:
    values = poutine.Trace()
    for n in latent_sites(guide_tr):
        values.add_node(n, **guide_tr.nodes[n])
    return values


@torch.no_grad()
def mean_kl(model, guide, data: ArrayDataset, num_samples: int = 10, batch_size: int = 500,
            device="cpu") -> float:
    """E_x KL(q(z|x) || p(z)) in nats per point, by Monte Carlo: mean of log q(z|x) - log p(z) over draws.
    A model-side enumerated site c is summed out of the prior: log p(z) = log sum_c p(c) p(z|c)."""
    total, n = 0.0, 0
    for x, y in _batches(data, batch_size, device):
        kw = eval_kwargs(model, y)
        with pyro.get_param_store().scope():
            model_tr, guide_tr = particle_traces(model, guide, num_samples, x, **kw)
            nesting = plate_nesting(model, x, **kw)
            names = latent_sites(guide_tr)
            log_q = sum(_site_log_prob(guide_tr.nodes[name], nesting, False) for name in names)
            if _enumerated(model_tr, guide_tr):
                log_p = summed_log_density(_vectorized(model, num_samples, -nesting - 1), _guide_values(guide_tr),
                                           nesting, (x,), kw, observed=False)
            else:
                log_p = sum(_site_log_prob(model_tr.nodes[name], nesting, False) for name in names)
        total += float((log_q - log_p).mean(0).sum())
        n += x.shape[0]
    return total / n


def _coordinates(fn):
    """The distribution of each coordinate of a site on its own (event shape ()), or None if unknown.

    Exact for factorized sites; for a multivariate normal, its marginals N(mu_d, Sigma_dd)."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.Normal(fn.loc, fn.variance.sqrt())
    return fn if fn.event_shape == () else None


def _summed_coordinates(model_tr, enumerated: list[str], p, value: torch.Tensor, nesting: int) -> torch.Tensor:
    """log p(z_d) per coordinate, log sum_c p(c) p(z_d | c), over the enumerated sites' dims (left of the
    particle plate). Other latents' bearing on c is not conditioned on: exact for one latent site under c."""
    event = value.dim() - (nesting + 1)  # coordinates' event dims (after _coordinates: per-unit)
    lp = p.log_prob(value)
    for name in enumerated:
        site = model_tr.nodes[name]
        prior = site["fn"].log_prob(site["value"])
        lp = lp + prior.reshape(prior.shape + (1,) * event)
    lead = lp.dim() - value.dim()
    return torch.logsumexp(lp, dim=tuple(range(lead))) if lead > 0 else lp


@torch.no_grad()
def kl_per_dim(model, guide, data: ArrayDataset, num_samples: int = 10, batch_size: int = 500,
               device="cpu") -> dict[str, np.ndarray]:
    """E_x KL(q(z_d|x) || p(z_d)) per latent unit d, in nats, one (F,) array per site.

    Closed form where torch knows the pair's KL (Gaussians), Monte Carlo over ``num_samples`` draws
    otherwise; a prior that depends on other latents is taken at the guide's draws of those, and a
    model-side enumerated parent (a mixture component) is summed out of each coordinate's prior. For a
    mean-field guide and a factorized prior the units' KLs add up to the total KL; for a correlated site
    (full covariance) they are the marginals' KLs and add up to less. NaN where a site's coordinates
    have no density of their own (a normalizing flow).
    """
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for x, y in _batches(data, batch_size, device):
        kw = eval_kwargs(model, y)
        with pyro.get_param_store().scope():
            model_tr, guide_tr = particle_traces(model, guide, num_samples, x, **kw)
            enumerated = _enumerated(model_tr, guide_tr)
            if enumerated:  # the prior's coordinates with the enumerated sites (a mixture's component) summed out
                nesting = plate_nesting(model, x, **kw)
                model_tr = enumerated_trace(_vectorized(model, num_samples, -nesting - 1), _guide_values(guide_tr),
                                            nesting, (x,), kw)
        for name in latent_sites(guide_tr):
            q_site, p_site = guide_tr.nodes[name], model_tr.nodes[name]
            q, p = _coordinates(q_site["fn"]), _coordinates(p_site["fn"])
            value = q_site["value"]
            if q is None or p is None:
                kl = torch.full_like(value, float("nan"))
            elif enumerated:
                kl = q.log_prob(value) - _summed_coordinates(model_tr, enumerated, p, value, nesting)
            else:
                try:
                    kl = torch.distributions.kl_divergence(q, p)
                except NotImplementedError:
                    kl = q.log_prob(value) - p.log_prob(value)
                kl = kl.expand(value.shape)
            per_unit = per_point(kl.double(), q_site["fn"].event_dim, particles=True).mean(1).sum(0)
            sums[name] = sums.get(name, 0.0) + per_unit.cpu()
        n += x.shape[0]
    return {name: (s / n).numpy() for name, s in sums.items()}


@torch.no_grad()
def activity(model, guide, data: ArrayDataset, batch_size: int = 500, device="cpu") -> dict[str, np.ndarray]:
    """Cov_x(E_q[z_d | x]) per latent unit, one (F,) array per site: how much the posterior mean moves with x."""
    means: dict[str, list[torch.Tensor]] = {}
    for x, y in _batches(data, batch_size, device):
        for name, (m, event_dim) in posterior_means(guide, x, **eval_kwargs(model, y)).items():
            means.setdefault(name, []).append(per_point(m, event_dim).double().cpu())
    return {name: torch.cat(ms).var(0).numpy() for name, ms in means.items()}


@torch.no_grad()
def prior_variance(model, data: ArrayDataset, num_draws: int = 4000, batch_size: int = 500,
                   device="cpu") -> dict[str, np.ndarray]:
    """Var_p(z_d) per latent unit under the model's prior, one (F,) array per site.

    By the law of total variance over draws of the model (latents from the prior, data observed):
    E[Var(z_d | parents)] + Var(E[z_d | parents]), from each site's conditional mean and variance (exact for
    a site with no latent parents, e.g. N(0, 0.5^2): 0.25), or the draws' variance where the distribution
    has no closed-form moments."""
    x, y = next(_batches(data, min(batch_size, len(data)), device))
    k = max(2, num_draws // x.shape[0])
    kw = eval_kwargs(model, y)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        tr = _trace(_vectorized(model, k, -plate_nesting(model, x, **kw) - 1), x, **kw)
    out = {}
    for name in latent_sites(tr):
        site = tr.nodes[name]
        fn, value, event_dim = site["fn"], site["value"], site["fn"].event_dim
        coords = _coordinates(fn)
        try:
            mean, var = coords.mean.expand(value.shape), coords.variance.expand(value.shape)
            total = per_point(var.double(), event_dim, particles=True).mean((0, 1)) + \
                per_point(mean.double(), event_dim, particles=True).flatten(0, 1).var(0)
        except (NotImplementedError, AttributeError, RuntimeError):
            total = per_point(value.double(), event_dim, particles=True).flatten(0, 1).var(0)
        out[name] = total.cpu().numpy()
    return out


def _relative(activity: dict[str, np.ndarray], variance: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if variance is None:
        return activity
    return {n: a / np.maximum(variance.get(n, np.ones_like(a)), 1e-300) for n, a in activity.items()}


@torch.no_grad()
def active_units(guide, data: ArrayDataset, threshold: float = ACTIVE_THRESHOLD, batch_size: int = 500,
                 device="cpu", model=None) -> tuple[int, torch.Tensor]:
    """Burda et al. (2016): unit d is active when Cov_x(E_q[z_d | x]) > threshold * Var_p(z_d). Returns (count,
    variances Cov_x(E_q[z_d | x])).

    Burda et al. state the rule for a N(0, I) prior, Var_p = 1; scaling by the prior's variance keeps its
    meaning (the share of the prior's spread that the posterior mean follows) under any prior, so a unit of
    a N(0, 0.5^2) prior is judged against 0.0025. Without ``model`` the prior is taken to be N(0, 1)
    (Burda's rule as written); ``model`` also passes labels to the guide."""
    per_site = activity(model, guide, data, batch_size, device)
    scale = prior_variance(model, data, batch_size=batch_size, device=device) if model is not None else None
    relative = _relative(per_site, scale)
    variances = torch.from_numpy(np.concatenate(list(per_site.values())))
    return int(sum((r > threshold).sum() for r in relative.values())), variances


@dataclass(frozen=True)
class LatentHealth:
    """KL and activity per latent unit, with the posterior-collapse verdict (Burda et al. 2016; Bowman et al.
    2016 for the collapse of a VAE's posterior onto its prior). A unit is active when its activity exceeds
    ``threshold`` times its prior variance (1 where ``prior_variance`` is not given)."""

    kl: dict[str, np.ndarray]         # site -> (F,) E_x KL(q(z_d|x) || p(z_d)), nats
    activity: dict[str, np.ndarray]   # site -> (F,) Cov_x(E_q[z_d|x])
    threshold: float = ACTIVE_THRESHOLD
    prior_variance: dict[str, np.ndarray] | None = None  # site -> (F,) Var_p(z_d)

    @property
    def relative_activity(self) -> dict[str, np.ndarray]:
        """Cov_x(E_q[z_d|x]) / Var_p(z_d): what the threshold is compared with."""
        return _relative(self.activity, self.prior_variance)

    @property
    def active(self) -> int:
        return int(sum((a > self.threshold).sum() for a in self.relative_activity.values()))

    @property
    def total(self) -> int:
        return int(sum(a.size for a in self.activity.values()))

    @property
    def collapsed(self) -> bool:
        """Most units inactive: the guide ignores x along them and q(z_d|x) sits on the prior."""
        return self.active < 0.5 * self.total

    def warning(self) -> str | None:
        if not self.collapsed:
            return None
        return (f"posterior collapse: only {self.active} of {self.total} latent units are active "
                f"(Cov_x E_q[z_d|x] > {self.threshold} Var_p(z_d)); the others carry no information about x")

    def rows(self) -> list[dict]:
        """One row per latent unit: site, index, KL, activity, prior variance, active."""
        relative = self.relative_activity
        prior = self.prior_variance or {}
        return [{"site": name, "unit": i, "kl": float(self.kl.get(name, np.full(a.size, np.nan))[i]),
                 "activity": float(a[i]), "prior_variance": float(prior[name][i]) if name in prior else 1.0,
                 "active": bool(relative[name][i] > self.threshold)}
                for name, a in self.activity.items() for i in range(a.size)]


def latent_health(model, guide, data: ArrayDataset, num_samples: int = 10, batch_size: int = 500,
                  device="cpu", threshold: float = ACTIVE_THRESHOLD) -> LatentHealth:
    """KL per unit, activity per unit, the prior's variance per unit and the collapse verdict, over all of
    ``data``."""
    return LatentHealth(kl=kl_per_dim(model, guide, data, num_samples, batch_size, device),
                        activity=activity(model, guide, data, batch_size, device), threshold=threshold,
                        prior_variance=prior_variance(model, data, batch_size=batch_size, device=device))
