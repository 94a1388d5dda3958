"""Per-latent statistics of a trained pair: KL to the prior and active units, read from traces."""
from __future__ import annotations

import pyro
import torch

from .data import ArrayDataset
from .estimators._weights import particle_traces
from .plots import posterior_means
from .sites import latent_sites


@torch.no_grad()
def mean_kl(model, guide, data: ArrayDataset, num_samples: int = 10, batch_size: int = 500,
            device="cpu") -> float:
    """E_x KL(q(z|x) || p(z)) in nats per point, by Monte Carlo: mean of log q(z|x) - log p(z) over draws."""
    gen = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for x, _ in data.batches(batch_size, shuffle=False, generator=gen, device=device):
        with pyro.get_param_store().scope():
            model_tr, guide_tr = particle_traces(model, guide, num_samples, x)
        kl = 0.0
        for name in latent_sites(guide_tr):
            kl = kl + guide_tr.nodes[name]["fn"].log_prob(guide_tr.nodes[name]["value"])
            kl = kl - model_tr.nodes[name]["fn"].log_prob(model_tr.nodes[name]["value"])
        total += float(kl.mean(0).sum())
        n += x.shape[0]
    return total / n


@torch.no_grad()
def active_units(guide, data: ArrayDataset, threshold: float = 0.01, batch_size: int = 500,
                 device="cpu") -> tuple[int, torch.Tensor]:
    """Burda et al. (2016): unit d is active when Cov_x(E_q[z_d | x]) > threshold. Returns (count, variances)."""
    gen = torch.Generator().manual_seed(0)
    means = []
    for x, _ in data.batches(batch_size, shuffle=False, generator=gen, device=device):
        m = posterior_means(guide, x)
        means.append(torch.cat([v.reshape(v.shape[0], -1) for v in m.values()], -1).double().cpu())
    variances = torch.cat(means).var(0)
    return int((variances > threshold).sum()), variances
