"""Small latent-variable programs written the way a user writes them, outside the zoo, each with an exact
answer: the inference gaps, model-side enumeration, the pairing check, the estimators' refusals and the
warnings they owe the user.
"""
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.analysis.gaps import inference_gaps

D = 4


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def grid_log_likelihood(log_joint, half: float, n: int, dims: int) -> torch.Tensor:
    """log p(x) = log of the integral of p(x, z) over z by the trapezoid rule on a grid, per point: exact to far
    below Monte Carlo error for the smooth, fast-decaying integrands here."""
    g = torch.linspace(-half, half, n)
    z = torch.stack([c.reshape(-1) for c in torch.meshgrid(*[g] * dims, indexing="ij")], -1)  # (G, dims)
    return torch.logsumexp(log_joint(z), 0) + dims * math.log(float(g[1] - g[0]))


class SquaredTwoSite(nn.Module):
    """z1, z2 ~ N(0, 1), x_d ~ N(c_d z1^2 + b_d z2, 0.5^2): z1's sign is not identified, so p(z|x) has two
    mirror-image modes."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.tensor([1.0, 0.8, 1.2, 0.6]))
        self.b = nn.Parameter(torch.tensor([0.5, -1.0, 0.3, 1.0]))

    def mean(self, z1, z2):
        return z1[..., None] ** 2 * self.c + z2[..., None] * self.b

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(self.mean(z1, z2), 0.5).to_event(1), obs=x)

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        def log_joint(z):
            z1, z2 = z[:, :1], z[:, 1:]
            prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1, keepdim=True)
            return prior + dist.Normal(self.mean(z1, z2), 0.5).to_event(1).log_prob(x)
        return grid_log_likelihood(log_joint, 6.0, 601, 2)


class BroadGuide(nn.Module):
    """A fixed encoder: wide in z1 around 0.2 (it covers both modes), z2 at a given guess."""

    def __init__(self, z2_guess):
        super().__init__()
        self.loc = nn.Parameter(torch.stack([torch.full_like(z2_guess, 0.2), z2_guess], -1))

    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(self.loc[:, 0], 1.0))
            pyro.sample("z2", dist.Normal(self.loc[:, 1], 0.5))


def test_gap_log_likelihood_is_exact_where_q_star_sits_on_one_of_two_modes(float64):
    """The local Gaussian q* is mode-seeking: on a two-mode posterior it fits one mode, and its own IS estimate
    of log p(x) is then ~log 2 too low with a high ESS, which made it the one chosen before. The mixture of
    both proposals' draws is within its standard error of the exact log p(x) at every point."""
    model = SquaredTwoSite()
    torch.manual_seed(0)
    z1, z2 = 1.0 + 0.5 * torch.rand(8), torch.randn(8)
    with torch.no_grad():
        x = model.mean(z1, z2) + 0.5 * torch.randn(8, D)
    exact = model.exact_log_likelihood(x).numpy()
    torch.manual_seed(1)
    gaps = inference_gaps(model, BroadGuide(z2), x, steps=300, particles=16, lr=0.05, num_samples=1000)
    err = gaps.log_likelihood - exact
    assert np.all(np.abs(err) < 4 * gaps.log_likelihood_se + 0.02), (err, gaps.log_likelihood_se)
    assert np.all(4 * gaps.log_likelihood_se + 0.02 < 0.6), "the check must be able to tell an error of log 2"
    # where q* took one mode: its own estimate is ~log 2 low, the two proposals disagree, and the point says so
    one_mode = exact - gaps.log_likelihood_local > 0.5
    assert one_mode.sum() >= 3
    assert np.all(gaps.disagree[one_mode])
    # ... and those are points where the ESS rule picked q*, the estimate that is log 2 too low
    assert np.all(gaps.ess_local[one_mode] > gaps.ess_amortized[one_mode])
    # no gap is negative beyond the estimates' errors
    assert np.all(gaps.approximation_gap > -4 * np.hypot(gaps.log_likelihood_se, gaps.elbo_local_se))
    assert np.allclose(gaps.inference_gap, gaps.amortization_gap + gaps.approximation_gap, atol=1e-12)


class GammaPoisson(nn.Module):
    """A rate per point, z ~ Gamma(a, b), and counts x_d ~ Poisson(z r_d): p(z|x) = Gamma(a + sum x, b + sum r)."""

    a, b = 2.0, 1.5

    def __init__(self):
        super().__init__()
        self.r = nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 1.5]))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("rate", dist.Gamma(self.a, self.b))
            pyro.sample("x", dist.Poisson(z[..., None] * self.r).to_event(1), obs=x)

    @torch.no_grad()
    def posterior(self, x):
        return self.a + x.sum(-1), self.b + self.r.sum()

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        alpha, beta = self.posterior(x)
        log_prior_norm = self.a * math.log(self.b) - math.lgamma(self.a)
        return (log_prior_norm - (alpha * beta.log() - torch.lgamma(alpha)) + (x * self.r.log()).sum(-1)
                - torch.lgamma(x + 1).sum(-1))


class LogNormalGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, 0.2]))

    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.LogNormal(self.w[0] * x.sum(-1).log1p(), self.w[1].exp()))


def best_lognormal_kl(alpha, beta):
    """min over LogNormal(mu, s) of KL(LogNormal || Gamma(alpha, beta)): s^2 = 1/alpha, mu = log(alpha/beta) - s^2/2
    (setting the derivatives of the closed-form KL to zero), and the KL there."""
    s2 = 1 / alpha
    mu = (alpha / beta).log() - s2 / 2
    neg_entropy = -mu - 0.5 * s2.log() - 0.5 * math.log(2 * math.pi) - 0.5
    cross = alpha * beta.log() - torch.lgamma(alpha) + (alpha - 1) * mu - beta * (mu + s2 / 2).exp()
    return neg_entropy - cross


def test_gaps_of_a_positive_latent_match_the_conjugate_answer(float64):
    """q* of a positive latent is Gaussian in log z (with the Jacobian): its best fit to the Gamma posterior is
    the LogNormal whose KL has a closed form, so the approximation gap is known exactly."""
    model, guide = GammaPoisson(), LogNormalGuide()
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(6, 1) * 3 * model.r.detach())
    exact = model.exact_log_likelihood(x).numpy()
    gaps = inference_gaps(model, guide, x, steps=400, particles=32, lr=0.05, num_samples=2000)
    assert gaps.local_transformed == ("rate",)
    assert np.all(np.abs(gaps.log_likelihood - exact) < 4 * gaps.log_likelihood_se + 1e-3)
    expected = best_lognormal_kl(*model.posterior(x)).numpy()
    assert np.all(expected > 0.005)
    err = 4 * np.hypot(gaps.elbo_local_se, gaps.log_likelihood_se) + 0.01
    assert np.all(np.abs(gaps.approximation_gap - expected) < err), (gaps.approximation_gap, expected)
    assert np.all(gaps.amortization_gap > 0.05)


class DirichletCounts(nn.Module):
    """Proportions z ~ Dirichlet(1.5) on the simplex and counts x ~ Multinomial(10, z): the Dirichlet-multinomial."""

    concentration = torch.tensor([1.5, 1.5, 1.5])

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Dirichlet(self.concentration))
            pyro.sample("x", dist.Multinomial(10, probs=z), obs=x)

    def exact_log_likelihood(self, x):
        return dist.DirichletMultinomial(self.concentration, total_count=10).log_prob(x)


class DirichletGuide(nn.Module):
    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Dirichlet(1.0 + x))


def test_gaps_of_a_simplex_latent_give_the_exact_log_likelihood(float64):
    model = DirichletCounts()
    x = torch.tensor([[2.0, 3.0, 5.0], [9.0, 0.0, 1.0], [4.0, 4.0, 2.0]])
    torch.manual_seed(0)
    gaps = inference_gaps(model, DirichletGuide(), x, steps=300, particles=16, lr=0.05, num_samples=2000)
    assert gaps.local_loc["z"].shape == (3, 2)  # stick-breaking: 2 unconstrained coordinates for 3 proportions
    exact = model.exact_log_likelihood(x).numpy()
    assert np.all(np.abs(gaps.log_likelihood - exact) < 4 * gaps.log_likelihood_se + 1e-3)
    # the guide is the exact posterior Dirichlet(1.5 + x)'s neighbour, q* a logistic normal: both gaps are >= 0
    assert np.all(gaps.approximation_gap > -4 * gaps.elbo_local_se)


class MixturePriorModel(nn.Module):
    """z ~ (N(-2, 1) + N(2, 1)) / 2 as one MixtureSameFamily site, x ~ N(z, 0.7^2) per coordinate."""

    def prior(self):
        return dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(torch.tensor([-2.0, 2.0]), 1.0))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Normal(z[..., None].expand(z.shape + (2,)), 0.7).to_event(1), obs=x)

    def exact_log_likelihood(self, x):
        cov = torch.full((2, 2), 1.0) + 0.49 * torch.eye(2)
        comps = dist.MultivariateNormal(torch.tensor([[-2.0, -2.0], [2.0, 2.0]]), covariance_matrix=cov)
        return torch.logsumexp(comps.log_prob(x[:, None]) + math.log(0.5), -1)


class ShiftGuide(nn.Module):
    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.mean(-1) * 0.5, 1.0))


def test_gaps_accept_a_real_valued_mixture_latent(float64):
    model = MixturePriorModel()
    x = torch.tensor([[-2.5, -1.0], [0.2, -0.3], [3.0, 1.5]])
    torch.manual_seed(0)
    gaps = inference_gaps(model, ShiftGuide(), x, steps=300, particles=16, lr=0.05, num_samples=2000)
    assert gaps.local_transformed == ()
    exact = model.exact_log_likelihood(x).numpy()
    assert np.all(np.abs(gaps.log_likelihood - exact) < 4 * gaps.log_likelihood_se + 1e-3)
    assert np.all(gaps.amortization_gap > 0)
