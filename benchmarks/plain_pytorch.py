"""The reference: the same VAE losses and evaluator written in plain PyTorch, with no Pyro.

Burda et al.'s 1-layer architecture (784-200-200-50, tanh, Bernoulli decoder), the same networks,
initial weights and random draws as the project's ``vae`` model with the ``diagonal-normal`` guide:
loading the project's state dicts here gives the same loss on the same batch and seed.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyro_vae.nets import mlp, split_loc_scale


class PlainVAE(nn.Module):
    """Encoder q(z|x) = N(mu(x), sigma(x)^2) and decoder p(x|z) = Bernoulli(logits(z)), prior N(0, I)."""

    def __init__(self, x_dim: int = 784, latent_dim: int = 50, hidden=(200, 200)) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = mlp([x_dim, *hidden, 2 * latent_dim], "tanh")
        self.decoder = mlp([latent_dim, *hidden, x_dim], "tanh")

    def _q(self, x):
        loc, scale = split_loc_scale(self.encoder(x))
        return Normal(loc, scale)

    def _log_px_z(self, x, z):
        return Bernoulli(logits=self.decoder(z), validate_args=False).log_prob(x).sum(-1)

    @staticmethod
    def _log_prior(z):
        return Normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1)

    def elbo_loss(self, x):
        q = self._q(x)
        z = q.rsample()
        return -(self._log_prior(z) + self._log_px_z(x, z) - q.log_prob(z).sum(-1)).sum()

    def analytic_kl_loss(self, x):
        q = self._q(x)
        z = q.rsample()
        kl = kl_divergence(q, Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))).sum(-1)
        return -(self._log_px_z(x, z) - kl).sum()

    def log_weights(self, x, k: int, stop_q: bool = False):
        q = self._q(x)
        z = q.rsample((k,))
        q_density = Normal(q.loc.detach(), q.scale.detach()) if stop_q else q
        return self._log_prior(z) + self._log_px_z(x, z) - q_density.log_prob(z).sum(-1), z

    def iwae_loss(self, x, k: int):
        log_w, _ = self.log_weights(x, k)
        return -(torch.logsumexp(log_w, 0) - math.log(k)).sum()

    def dreg_loss(self, x, k: int):
        log_w, z = self.log_weights(x, k, stop_q=True)
        value = -(torch.logsumexp(log_w, 0) - math.log(k)).sum()
        w = torch.softmax(log_w.detach(), 0)
        z.register_hook(lambda g: g * w.unsqueeze(-1))  # w~ from the surrogate, times w~: w~^2 for the encoder
        surrogate = -(w * log_w).sum()
        return value.detach() + (surrogate - surrogate.detach())

    def loss(self, estimator: str, k: int, x):
        if estimator == "elbo":
            return self.elbo_loss(x)
        if estimator == "analytic-kl":
            return self.analytic_kl_loss(x)
        return self.iwae_loss(x, k) if estimator == "iwae" else self.dreg_loss(x, k)

    @torch.no_grad()
    def log_likelihood(self, x, num_samples: int, max_particles_per_chunk: int = 20000):
        """IS log p(x) per point, the draws in chunks of at most ``max_particles_per_chunk`` particles x points."""
        chunk = max(1, max_particles_per_chunk // x.shape[0])
        lse = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            log_w, _ = self.log_weights(x, k)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w.double(), 0))
            done += k
        return lse - math.log(num_samples)


def load_from_project(plain: PlainVAE, model, guide) -> PlainVAE:
    """Copy the project's model (decoder) and guide (encoder) weights into the reference."""
    plain.decoder.load_state_dict(model.decoder.state_dict())
    plain.encoder.load_state_dict(guide.encoder.state_dict())
    return plain
