"""Test ELBO and importance-sampled log-likelihood, for any model/guide pair with local latents."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from tqdm import tqdm

from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import _weights
from pyro_vae.estimators._weights import log_weights
from pyro_vae.programs.labels import check_labels, eval_kwargs, label_use
from pyro_vae.programs.sites import _trace, check_pairing
from pyro_vae.training.distributed import SINGLE, World, gather_objects

# Particle-points per call of the programs in the IS evaluation and the diagnostics. With Burda's 1-layer
# MNIST VAE on this project's 2-core CPU (1 MiB L2 per core, 32 MiB L3), chunks of 2000 evaluated K = 2000
# on 100 points 1.85x faster than chunks of 20 000, whose 20 000 x 784 activations (63 MB each) spill out
# of the caches; 500 and 1000 were slower again (per-call overhead). benchmarks/evaluation_speed.py
# measures it against a hand-written evaluator at its own best chunk.
CHUNK = 2000


@dataclass(frozen=True)
class Evaluation:
    """Per-point ELBO and IS log-likelihood estimates, in nats per data point."""

    elbo: np.ndarray              # (N,) mean over the K draws of log p(x,z) - log q(z|x)
    log_likelihood: np.ndarray    # (N,) logsumexp_k(log w_k) - log K
    num_samples: int

    @staticmethod
    def _mean_se(a: np.ndarray) -> tuple[float, float]:
        return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")

    def summary(self) -> dict:
        elbo, elbo_se = self._mean_se(self.elbo)
        ll, ll_se = self._mean_se(self.log_likelihood)
        return {"num_points": int(len(self.elbo)), "num_samples": self.num_samples,
                "elbo": elbo, "elbo_se": elbo_se, "log_likelihood": ll, "log_likelihood_se": ll_se,
                "nll": -ll}


def no_likelihood_reason(model, guide) -> str | None:
    """Why importance sampling cannot estimate log p(x) for this pair, or None when it can.

    A model with ``has_likelihood = False`` (a plain autoencoder: its prior is switched off) defines no
    p(x); a guide with ``has_density = False`` (a point mass) gives draws without a density to weigh."""
    if getattr(model, "has_likelihood", True) is False:
        return f"{type(model).__name__} defines no p(x) (its prior is switched off), so there is no log-likelihood"
    if getattr(guide, "has_density", True) is False:
        return f"{type(guide).__name__} is a point mass with no density, so it cannot be an importance proposal"
    return None


@torch.no_grad()
def check_evaluable(model, guide, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Refuse, in one line and before any work, a pair whose log p(x) cannot be estimated by importance
    sampling on points like ``x`` (labels ``y``): no likelihood or no proposal density, a guide that does
    not fit the model with the labels as evaluation passes them (M2 scores log p(x) with y a latent, so its
    guide must sample y), a latent outside the data plate, or a program that cannot run with particles."""
    reason = no_likelihood_reason(model, guide)
    if reason:
        raise UserError(reason)
    kw = eval_kwargs(model, y)
    x = x[:2]
    kw = {k: v[:2] if torch.is_tensor(v) else v for k, v in kw.items()}
    try:
        check_pairing(model, guide, x, **kw)
    except UserError as e:
        how = ("labels unobserved, so y is a latent the guide must sample" if label_use(model) == "optional"
               else "the data as given")
        raise UserError(f"the IS evaluation scores log p(x) with {how}: {e}") from None
    cuda = [x.device] if x.device.type == "cuda" else []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=cuda):
        _weights.log_weights(model, guide, 2, x, **kw)  # by module: not counted as the evaluation's own draws


@torch.no_grad()
def evaluate(model, guide, data: ArrayDataset, *, num_samples: int = 5000, batch_size: int = 100,
             max_particles_per_chunk: int = CHUNK, device: torch.device | str = "cpu",
             seed: int = 0, quiet: bool = False, world: World = SINGLE) -> Evaluation:
    """Importance-sampled log p(x) per point with ``num_samples`` guide draws, and the ELBO from the same draws.

    log p(x) ~= logsumexp_k [log p(x, z_k) - log q(z_k|x)] - log K (Burda et al. 2016, eq. 14). Every
    latent must be local to the data plate. A model whose labels are required is scored as log p(x | y);
    one whose labels are optional as log p(x), its label a latent.

    Draws are processed in chunks of at most ``max_particles_per_chunk`` (particles x points), so memory
    is bounded whatever ``num_samples`` is. Each batch of points draws from its own seed (``seed`` and the
    batch's index), so with a ``world`` of several processes the batches are dealt to the ranks and
    the gathered result equals a one-process evaluation's.
    """
    if num_samples <= 0 or batch_size <= 0 or max_particles_per_chunk <= 0:
        raise UserError("num_samples, batch_size and max_particles_per_chunk must be positive")
    check_labels(model, data.labels, "the evaluation data")
    first_x, first_y = next(data.head(min(len(data), 2)).batches(2, shuffle=False, generator=torch.Generator(),
                                                                    device=device))
    check_evaluable(model, guide, first_x, first_y)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, max_particles_per_chunk)
    chunk = max(1, max_particles_per_chunk // batch_size)
    mine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with pyro.get_param_store().scope(), pyro.validation_enabled(False), torch.random.fork_rng(devices=cuda):
        bar = tqdm(total=len(data), desc=f"IS log-likelihood (K={num_samples})", unit="pt",
                   disable=quiet or not world.main)
        for i, (x, y) in enumerate(data.batches(batch_size, shuffle=False, generator=gen, device=device)):
            bar.update(x.shape[0])
            if i % world.size != world.rank:
                continue
            batch_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            torch.default_generator.manual_seed(batch_seed)  # the CPU's and the evaluation device's streams only
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(batch_seed)
            kw = eval_kwargs(model, y)
            lse = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=torch.float64)
            total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
            done = 0
            while done < num_samples:
                k = min(chunk, num_samples - done)
                lw = log_weights(model, guide, k, x, **kw)[0].double()
                lse = torch.logaddexp(lse, torch.logsumexp(lw, 0))
                total += lw.sum(0)
                done += k
            mine[i] = ((total / num_samples).cpu(), (lse - math.log(num_samples)).cpu())
        bar.close()
    results = {i: r for part in gather_objects(world, mine) for i, r in part.items()}
    order = sorted(results)
    return Evaluation(elbo=torch.cat([results[i][0] for i in order]).numpy(),
                      log_likelihood=torch.cat([results[i][1] for i in order]).numpy(), num_samples=num_samples)


@torch.no_grad()
def classification_accuracy(model, guide, data: ArrayDataset, *, batch_size: int = 1000,
                            device: torch.device | str = "cpu") -> float:
    """Share of points whose label is the mode of the guide's q(y|x), for a model with optional labels.

    The model names its label site (``label_site``); the guide's distribution at that site, traced
    without labels, is the classifier (M2's q(y|x), Kingma et al. 2014).
    """
    if label_use(model) != "optional" or data.labels is None:
        raise UserError(f"{type(model).__name__} does not infer labels, or the data have none")
    site = getattr(model, "label_site", "y")
    correct = 0
    gen = torch.Generator().manual_seed(0)
    for x, y in data.batches(batch_size, shuffle=False, generator=gen, device=device):
        fn = _trace(guide, x).nodes[site]["fn"]
        correct += int((fn.probs.argmax(-1) == y).sum())
    return correct / len(data)
