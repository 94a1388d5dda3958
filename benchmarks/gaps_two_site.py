"""The inference gaps' log p(x), before and after the mixture estimator, against the exact log p(x).

    python3 dev.py shell-cmd .venv/bin/python benchmarks/gaps_two_site.py [--seeds 5] [--points 20]

Two models with an exact log p(x), each with a guide that differs from the local fit q*:

- two-site: z1 ~ N(0, I_2), z2 ~ N(0, 1), x ~ N(W [z1, z2], 0.5^2 I_6) with random W (the two-site model of
  tests/test_diagnostics.py), and its random linear encoder of fixed scale 0.5; log p(x) = log N(x; 0,
  W W^T + 0.25 I). The posterior is Gaussian but correlated, so the mean-field q* has an approximation gap.
- two-mode: x_d ~ N(c_d z1^2 + b_d z2, 0.5^2), whose posterior has two mirror-image modes in z1, with a
  broad encoder (tests/test_user_models.py); log p(x) by the trapezoid rule on a 601^2 grid.

``inference_gaps`` runs with 300 Adam steps and S = 1000 draws from each of q and q*. "before" is the
former rule, the IS estimate of whichever proposal has the larger ESS, from the same draws as "after",
the multiple-importance-sampling estimate over both proposals' draws with its control variate. Writes
benchmarks/results/gaps_two_site.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

from test_diagnostics import X_DIM, TwoSiteGuide, TwoSiteModel  # noqa: E402
from test_user_models import BroadGuide, D, SquaredTwoSite  # noqa: E402

from pyro_vae.analysis.gaps import inference_gaps  # noqa: E402


def two_site(seed: int, points: int):
    torch.manual_seed(seed)
    model, guide = TwoSiteModel(), TwoSiteGuide()
    x = torch.randn(points, X_DIM)
    w = model.weight.detach()
    cov = w @ w.T + 0.25 * torch.eye(X_DIM)
    return model, guide, x, dist.MultivariateNormal(torch.zeros(X_DIM), covariance_matrix=cov).log_prob(x).numpy()


def two_mode(seed: int, points: int):
    torch.manual_seed(seed)
    model = SquaredTwoSite()
    z1, z2 = 1.0 + 0.5 * torch.rand(points), torch.randn(points)
    with torch.no_grad():
        x = model.mean(z1, z2) + 0.5 * torch.randn(points, D)
    return model, BroadGuide(z2), x, model.exact_log_likelihood(x).numpy()


def measure(make, seed: int, points: int) -> dict:
    model, guide, x, exact = make(seed, points)
    torch.manual_seed(seed + 100)
    g = inference_gaps(model, guide, x, steps=300, particles=16, lr=0.05, num_samples=1000)
    before = np.where(g.ess_local >= g.ess_amortized, g.log_likelihood_local, g.log_likelihood_amortized)
    out = {"exact_gap": float(np.mean(exact - g.elbo_local)), "disagree": int(g.disagree.sum())}
    for name, ll in (("before", before), ("after", g.log_likelihood)):
        gap = ll - g.elbo_local
        out[name] = (float(np.abs(ll - exact).mean()), float(np.abs(ll - exact).max()), int((gap < 0).sum()),
                     float(gap.mean()))
    return out


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--points", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    t0 = time.perf_counter()
    lines = [f"{a.points} points per seed, seeds 0..{a.seeds - 1}; inference_gaps(steps=300, particles=16, lr=0.05, "
             "num_samples=1000). |error| = |estimate - exact log p(x)| in nats; approximation gap = estimate - "
             "L[q*].", "",
             "| model | seed | before: mean / max abs error | after: mean / max abs error | negative gaps before / "
             "after | mean approx. gap before / after / exact | flagged points |",
             "|---|---|---|---|---|---|---|"]
    for label, make in (("two-site", two_site), ("two-mode", two_mode)):
        for seed in range(a.seeds):
            r = measure(make, seed, a.points)
            b, f = r["before"], r["after"]
            lines.append(f"| {label} | {seed} | {b[0]:.3f} / {b[1]:.3f} | {f[0]:.3f} / {f[1]:.3f} | {b[2]} / {f[2]} | "
                         f"{b[3]:.3f} / {f[3]:.3f} / {r['exact_gap']:.3f} | {r['disagree']} |")
    lines += ["", f"{time.perf_counter() - t0:.0f} s on 1 CPU thread.", ""]
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "gaps_two_site.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run()
