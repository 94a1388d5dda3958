"""Small latent-variable programs written the way a user writes them, outside the zoo, each with an exact
answer: the inference gaps, model-side enumeration, the pairing check, the estimators' refusals and the
warnings they owe the user.
"""
import math
import re
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import prototype_images  # noqa: F401  (the fake_dataset fixture lives there)
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.analysis.gaps import inference_gaps

D = 4


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
    assert np.all(np.abs(err) < 0.35), err  # no point is off by log 2
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


# A mixture-prior VAE written the natural way: the component c is enumerated in the model, the guide has no
# site for it. Linear-Gaussian given c, so log p(x) and the exact posterior (itself a mixture) are known.
C, Z = 3, 2


class MixtureVAE(PyroModule):
    """c ~ Categorical(pi), z | c ~ N(mu_c, s_c^2 I), x | z ~ N(W z + b, psi I)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.logits = nn.Parameter(torch.tensor([0.3, -0.2, 0.0]))
        self.mu = nn.Parameter(3 * torch.randn(C, Z, generator=g))
        self.log_s = nn.Parameter(torch.tensor([0.0, -0.5, 0.3]))
        self.w = nn.Parameter(torch.randn(D, Z, generator=g))
        self.b = nn.Parameter(torch.randn(D, generator=g))
        self.psi = 0.3

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mu[c], self.log_s.exp()[c][..., None]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.w.T + self.b, math.sqrt(self.psi)).to_event(1), obs=x)

    @torch.no_grad()
    def components(self):
        """Per component c: the marginal p(x | c) and the posterior p(z | x, c) = N(A_c x + a_c, S_c)."""
        s2 = (2 * self.log_s).exp()
        cov_x = s2[:, None, None] * self.w @ self.w.T + self.psi * torch.eye(D)
        marg = dist.MultivariateNormal(self.mu @ self.w.T + self.b, covariance_matrix=cov_x)
        prec = torch.eye(Z) / s2[:, None, None] + self.w.T @ self.w / self.psi
        cov_z = torch.linalg.inv(prec)
        return marg, cov_z

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        marg, _ = self.components()
        return torch.logsumexp(torch.log_softmax(self.logits, 0) + marg.log_prob(x[:, None]), -1)

    @torch.no_grad()
    def sample_data(self, n):
        return pyro.poutine.trace(self).get_trace(batch_size=n).nodes["x"]["value"]


class ExactMixtureGuide(nn.Module):
    """q(z|x) = p(z|x) = sum_c p(c|x) N(z; m_c(x), S_c): one MixtureSameFamily site, no site for c."""

    def __init__(self, model):
        super().__init__()
        self.model = [model]  # not a submodule: the guide owns no parameters of the model

    def forward(self, x, **kwargs):
        m = self.model[0]
        marg, cov_z = m.components()
        s2 = (2 * m.log_s).exp()
        with torch.no_grad():
            mean = (cov_z @ (m.mu / s2[:, None] + ((x - m.b) @ m.w / m.psi)[:, None, :])[..., None])[..., 0]
            post_c = torch.log_softmax(torch.log_softmax(m.logits, 0) + marg.log_prob(x[:, None]), -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=post_c),
                                                    dist.MultivariateNormal(mean, covariance_matrix=cov_z)))


class GaussianEncoder(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(D, 2 * Z)

    def forward(self, x, **kwargs):
        h = self.net(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[..., :Z], nn.functional.softplus(h[..., Z:]) + 0.05).to_event(1))


class MomentGuide(ExactMixtureGuide):
    """A diagonal Gaussian with the exact posterior's mean and 1.5 times its standard deviations."""

    def forward(self, x, **kwargs):
        with pyro.poutine.block(), torch.no_grad():
            exact = pyro.poutine.trace(super().forward).get_trace(x).nodes["z"]["fn"]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(exact.mean, 1.5 * exact.variance.sqrt()).to_event(1))


def test_model_side_enumeration_is_summed_out_exactly_in_the_log_weights(float64):
    """At the exact posterior (a mixture over c, as one guide site) every log-weight is log p(x), which holds
    only if the weights sum c out exactly: log sum_c p(c) p(z|c) p(x|z) - log q(z|x)."""
    from pyro_vae.analysis.evaluation import evaluate
    from pyro_vae.data import ArrayDataset
    from pyro_vae.estimators import EnumELBO
    from pyro_vae.estimators._weights import log_weights

    model = MixtureVAE()
    torch.manual_seed(0)
    x = model.sample_data(6)
    exact = model.exact_log_likelihood(x)
    guide = ExactMixtureGuide(model)
    lw, _ = log_weights(model, guide, 5, x)
    assert lw.shape == (5, 6)
    assert torch.allclose(lw, exact.expand(5, 6), atol=1e-8)
    result = evaluate(model, guide, ArrayDataset(x, binarize="none"), num_samples=50, quiet=True)
    assert np.allclose(result.log_likelihood, exact.numpy(), atol=1e-8)
    # enum-elbo's value is the same bound: -sum log p(x) at the exact posterior
    assert torch.allclose(EnumELBO(num_particles=3)(model, guide, x), -exact.sum(), atol=1e-8)
    # with another guide the weights give an ELBO below log p(x) and an IS estimate that closes the gap
    with torch.no_grad():
        lw, _ = log_weights(model, MomentGuide(model), 4000, x)
    elbo, is_ll = lw.mean(0), torch.logsumexp(lw, 0) - math.log(4000)
    se = (torch.softmax(lw, 0) ** 2).sum(0).sqrt()  # the delta method's sd(w) / (sqrt(S) mean w), about
    assert torch.all(elbo < exact - 0.2) and torch.all((is_ll - exact).abs() < 4 * se + 0.01), (elbo - exact, is_ll - exact)


def mixture_data(model, n=200):
    from pyro_vae.data import ArrayDataset
    torch.manual_seed(1)
    return ArrayDataset(model.sample_data(n), binarize="none")


def test_a_model_side_mixture_trains_with_enum_elbo_and_is_refused_by_the_others_naming_it():
    from pyro_vae import TrainConfig, fit
    from pyro_vae.errors import UserError
    from pyro_vae.estimators import ESTIMATORS
    from pyro_vae.estimators._weights import log_weights

    data = mixture_data(MixtureVAE())
    x = data.data[:50]
    for name in sorted(set(ESTIMATORS) - {"enum-elbo"}):
        model = MixtureVAE()
        with pytest.raises(UserError, match=r"^" + name + r" cannot sum out the model's enumerated site\(s\) 'c'.*"
                                            r"train with enum-elbo"):
            fit(model, GaussianEncoder(), ESTIMATORS[name](), data, None,
                TrainConfig(epochs=1, batch_size=50, device="cpu"), quiet=True)
    model, guide = MixtureVAE(), GaussianEncoder()
    with torch.no_grad():
        model.mu.mul_(0.3)  # move the components from where the data came from: there is something to learn
        before = log_weights(model, guide, 64, x)[0].mean(0)
    fit(model, guide, ESTIMATORS["enum-elbo"](), data, None,
        TrainConfig(epochs=8, batch_size=50, lr=0.02, device="cpu"), quiet=True)
    with torch.no_grad():
        after = log_weights(model, guide, 64, x)[0].mean(0)
    gain = after - before
    assert gain.mean() > 5 * gain.std() / math.sqrt(len(gain)) and gain.mean() > 1.0


# ---- user mistakes in the programs: one line naming the site, the program and what is expected ----

class Decoder(PyroModule):
    """z ~ N(0, I_4) per point, x ~ Bernoulli(decoder(z)), written with the usual mistakes as options."""

    def __init__(self, to_event=True, dim=-1):
        super().__init__()
        self.to_event, self.dim = to_event, dim
        self.net = nn.Linear(4, 6)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=self.dim):
            prior = dist.Normal(torch.zeros(n, 4), 1.0)
            z = pyro.sample("z", prior.to_event(1) if self.to_event else prior)
            pyro.sample("x", dist.Bernoulli(logits=self.net(z)).to_event(1), obs=x)


class Encoder(PyroModule):
    def __init__(self, to_event=True, dim=-1, size=4, inside=True, family="normal"):
        super().__init__()
        self.to_event, self.dim, self.size, self.inside, self.family = to_event, dim, size, inside, family
        self.net = nn.Linear(6, size)

    def forward(self, x, **kwargs):
        loc = self.net(x)
        if not self.inside:
            pyro.sample("z", dist.Normal(loc.mean(0), 1.0).to_event(1))
            return
        with pyro.plate("data", x.shape[0], dim=self.dim):
            q = dist.Normal(loc, 1.0) if self.family == "normal" else dist.LogNormal(loc, 1.0)
            pyro.sample("z", q.to_event(1) if self.to_event else q)


class PositiveScale(PyroModule):
    """z ~ N(0, I_4) and a positive scale s ~ Gamma per point, x ~ N(decoder(z), s)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 6)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 4), 1.0).to_event(1))
            s = pyro.sample("s", dist.Gamma(torch.full((n,), 2.0), 2.0))
            pyro.sample("x", dist.Normal(self.net(z), s[..., None]).to_event(1), obs=x)


class RealScaleGuide(Encoder):
    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.net(x), 1.0).to_event(1))
            pyro.sample("s", dist.Normal(torch.zeros(x.shape[0]), 1.0))  # a real-valued guide for a positive s


MISTAKES = {
    "guide without to_event": (Decoder(), Encoder(to_event=False),
                               r"^Encoder's site 'z' has size 4 at dim -1, where pyro.plate\('data'\) has size 40.*"
                               r"\.to_event\(1\)"),
    "model without to_event": (Decoder(to_event=False), Encoder(),
                               r"^Decoder's site 'z' has size 4 at dim -1.*\.to_event\(1\)"),
    "data plate at dim -2": (Decoder(dim=-2), Encoder(dim=-2),
                             r"^Decoder's site 'z' is in pyro.plate\('data'\) at dim -2; pyro-vae needs the data "
                             r"plate at dim -1"),
    "guide's plate at dim -2": (Decoder(), Encoder(dim=-2), r"^Encoder's site 'z' is in pyro.plate\('data'\) at dim -2"),
    "latent of another size": (Decoder(), Encoder(size=3), r"^Encoder's site 'z' has shape \(3,\) per point, but "
                                                           r"Decoder's has \(4,\)"),
    "global guide site for a local latent": (Decoder(), Encoder(inside=False),
                                             r"^Encoder samples 'z' outside every plate, but Decoder samples it in "
                                             r"pyro.plate\('data'\) at dim -1"),
    "real guide for a positive latent": (PositiveScale(), RealScaleGuide(),
                                         r"^RealScaleGuide draws 's' outside the support of PositiveScale's Gamma"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
@pytest.mark.parametrize("estimator", ["elbo", "iwae", "enum-elbo"])
def test_program_mistakes_are_one_line_before_training(mistake, estimator):
    from pyro_vae import TrainConfig, fit
    from pyro_vae.data import ArrayDataset
    from pyro_vae.errors import UserError
    from pyro_vae.estimators import ESTIMATORS

    model, guide, match = MISTAKES[mistake]
    data = ArrayDataset(torch.bernoulli(torch.full((40, 6), 0.4)), binarize="none")
    with pytest.raises(UserError, match=match) as info:
        fit(model, guide, ESTIMATORS[estimator](), data, None, TrainConfig(epochs=1, batch_size=10, device="cpu"),
            quiet=True)
    message = str(info.value)
    assert "\n" not in message and "_particles" not in message and "dim=-3" not in message


# ---- what the estimators owe the user: refusals that name what fits, warnings said once ----

class BinaryNet(PyroModule):
    """A sigmoid belief net: h ~ Bernoulli(0.5)^3 per point, x ~ Bernoulli(decoder(h))."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 6)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            h = pyro.sample("h", dist.Bernoulli(torch.full((n, 3), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(h)).to_event(1), obs=x)


class BinaryGuide(PyroModule):
    def __init__(self, baseline=False):
        super().__init__()
        self.net = nn.Linear(6, 3)
        self.infer = {"baseline": {"use_decaying_avg_baseline": True}} if baseline else {}

    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Bernoulli(logits=self.net(x)).to_event(1), infer=self.infer)


class OneBit(PyroModule):
    """b ~ Bernoulli(0.3) per point (a scalar site Pyro can enumerate), x ~ Bernoulli(decoder(b))."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 6)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            b = pyro.sample("b", dist.Bernoulli(torch.full((n,), 0.3)))
            pyro.sample("x", dist.Bernoulli(logits=self.net(b[..., None])).to_event(1), obs=x)


class OneBitGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 1)

    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=self.net(x)[..., 0]))


NOT_REPARAMETERIZED = ["analytic-kl", "iwae", "dreg", "stl", "renyi"]


@pytest.mark.parametrize("name", NOT_REPARAMETERIZED)
def test_discrete_guides_are_refused_with_the_estimators_that_fit(name):
    from pyro_vae.errors import UserError
    from pyro_vae.estimators import ESTIMATORS

    x = torch.bernoulli(torch.full((5, 6), 0.4))
    with pytest.raises(UserError, match=rf"^{name} needs reparameterizable guide sites, but 'h' \(Bernoulli\) cannot "
                                        r"be reparameterized; use vimco or rws \(importance-weighted bounds\), "
                                        r"tracegraph \(the ELBO with baselines\) or elbo \(score-function gradients\)$"):
        ESTIMATORS[name]()(BinaryNet(), BinaryGuide(), x)
    # a scalar discrete site can be enumerated: then enum-elbo fits too, and the message says how
    with pytest.raises(UserError, match=r"'b' \(Bernoulli\).*use enum-elbo \(mark the site "
                                        r"infer=\{'enumerate': 'parallel'\}.*\) or elbo"):
        ESTIMATORS[name]()(OneBit(), OneBitGuide(), x)


@pytest.mark.parametrize("name", ["elbo", "enum-elbo"])
def test_an_ignored_baseline_is_said_once_naming_the_site(name):
    from pyro_vae.estimators import ESTIMATORS
    from pyro_vae.estimators._checks import PyroVaeWarning

    x = torch.bernoulli(torch.full((5, 6), 0.4))
    model, guide, est = BinaryNet(), BinaryGuide(baseline=True), ESTIMATORS[name]()
    with pytest.warns(PyroVaeWarning, match=rf"^{name} ignores the baseline asked for at guide site 'h'"):
        est(model, guide, x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est(model, guide, x)  # once
        est(BinaryNet(), BinaryGuide(), x)  # and not for a guide without one


class GammaFactors(PyroModule):
    """A Gamma-Poisson factor model: z ~ Gamma(2, 2)^3 per point, x ~ Poisson(z @ softplus(W))."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(3, 6))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Gamma(torch.full((n, 3), 2.0), 2.0).to_event(1))
            pyro.sample("x", dist.Poisson(z @ nn.functional.softplus(self.w)).to_event(1), obs=x)


class LogNormalFactors(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 6)

    def forward(self, x, **kwargs):
        h = self.net(x.log1p())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal(h[..., :3], nn.functional.softplus(h[..., 3:]) + 0.1).to_event(1))


def test_analytic_kl_says_once_where_it_has_no_closed_form():
    import warnings

    from pyro_vae.estimators import ELBO, AnalyticKL
    from pyro_vae.estimators._checks import PyroVaeWarning

    x = torch.poisson(torch.full((8, 6), 2.0))
    model, guide = GammaFactors(), LogNormalFactors()
    with pytest.warns(PyroVaeWarning, match=r"^analytic-kl has no closed-form KL\(LogNormal \|\| Gamma\) at site 'z'; "
                                            r"that site's KL is estimated by Monte Carlo, as in elbo$"):
        AnalyticKL()(model, guide, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnalyticKL()(model, guide, x)  # once per guide and site
        torch.manual_seed(3)
        a = AnalyticKL()(model, guide, x)
        torch.manual_seed(3)
        assert torch.allclose(a, ELBO()(model, guide, x), rtol=1e-6)  # it is the elbo there, draw for draw
        # a pair with a closed form says nothing
        AnalyticKL()(Decoder(), Encoder(), torch.bernoulli(torch.full((5, 6), 0.4)))


def test_pyro_guessing_its_plate_nesting_prints_nothing(capsys, caplog):
    import logging

    from pyro_vae.estimators import EnumELBO

    x = torch.bernoulli(torch.full((5, 6), 0.4))
    with caplog.at_level(logging.INFO, logger="pyro"):
        EnumELBO()(Decoder(), Encoder(), x)
    assert "Guessed max_plate_nesting" not in caplog.text + "".join(capsys.readouterr())
    assert not logging.getLogger("pyro.infer.elbo").filters  # the filter is ours only while we call Pyro


class NarrowPrior(PyroModule):
    """z ~ N(0, 0.05^2 I_2), x ~ N(W z, 0.01 I_3), W's second column 0: z_2 never reaches x."""

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([[11.1, 0.0], [0.0, 0.0], [0.0, 0.0]])

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 2), 0.05).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.w.T, 0.1).to_event(1), obs=x)

    def posterior(self):
        cov = torch.linalg.inv(torch.eye(2) / 0.05 ** 2 + self.w.T @ self.w / 0.01)
        return cov @ self.w.T / 0.01, cov.diagonal().sqrt()


class NarrowPriorPosterior(PyroModule):
    def __init__(self, model):
        super().__init__()
        self.a, self.sd = model.posterior()

    def forward(self, x, **kwargs):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.a.T, self.sd).to_event(1))


def test_active_units_are_judged_against_the_prior_variance():
    """Under a N(0, 0.05^2) prior a unit that carries 1.7 nats about x moves its posterior mean by far less
    than Burda et al.'s 0.01 (stated for N(0, 1)): judged against the prior's variance, it is active, and the
    unit that never reaches x is not."""
    from pyro_vae.analysis.latent_stats import ACTIVE_THRESHOLD, active_units, latent_health
    from pyro_vae.data import ArrayDataset

    model = NarrowPrior()
    guide = NarrowPriorPosterior(model)
    torch.manual_seed(0)
    data = ArrayDataset(pyro.poutine.trace(model).get_trace(batch_size=3000).nodes["x"]["value"], binarize="none")
    health = latent_health(model, guide, data)
    assert np.allclose(health.prior_variance["z"], 0.05 ** 2, rtol=1e-6)
    kl, act = health.kl["z"], health.activity["z"]
    assert kl[0] > 1.6 and act[0] < ACTIVE_THRESHOLD  # informative, yet below the unscaled threshold
    assert abs(act[0] / 0.05 ** 2 - (1 - (guide.sd[0] / 0.05) ** 2)) < 0.1
    assert act[1] < 1e-12 and abs(kl[1]) < 1e-6
    assert health.active == 1 and [r["active"] for r in health.rows()] == [True, False]
    assert active_units(guide, data, model=model)[0] == 1
    assert active_units(guide, data)[0] == 0  # without the model: Burda's N(0, 1) rule, as documented


def test_kl_to_a_mixture_prior_sums_the_component_out():
    """mean_kl and kl_per_dim against log p(z) = log sum_c pi_c N(z; mu_c, s_c^2 I), computed by hand."""
    from pyro_vae.analysis.latent_stats import kl_per_dim, mean_kl
    from pyro_vae.data import ArrayDataset

    model = MixtureVAE()
    torch.manual_seed(0)
    x = model.sample_data(30).detach()
    data = ArrayDataset(x, binarize="none")
    guide = MomentGuide(model)
    q = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["fn"]
    z = q.sample((20000,))
    log_pi, s = torch.log_softmax(model.logits, 0).detach(), model.log_s.exp().detach()
    comps = dist.Normal(model.mu.detach(), s[:, None])  # (C, Z)
    log_p = torch.logsumexp(log_pi + comps.log_prob(z[..., None, :]).sum(-1), -1)
    expected = (q.log_prob(z) - log_p).mean().item()
    assert abs(mean_kl(model, guide, data, num_samples=2000) - expected) < 0.05
    # per coordinate: the prior's marginal of z_d is the mixture of the components' coordinates
    log_pd = torch.logsumexp(log_pi[:, None] + comps.log_prob(z[..., None, :]), -2)  # (S, N, Z)
    expected_d = (q.base_dist.log_prob(z) - log_pd).mean((0, 1)).numpy()
    got = kl_per_dim(model, guide, data, num_samples=2000)["z"]
    assert np.allclose(got, expected_d, atol=0.05), (got, expected_d)


# ---- the command line: a run that would fail is refused before its folder or a training step ----

@dataclass(frozen=True)
class GlobalConfig:
    x_dim: int = 64


class GlobalOffset(PyroModule):
    """A global offset g ~ N(0, 1) shared by all points, z ~ N(0, I_2) per point, x ~ Bernoulli(dec(z) + g)."""

    Config = GlobalConfig

    def __init__(self, config=GlobalConfig()):
        super().__init__()
        self.net = nn.Linear(2, config.x_dim)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(n, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(z) + g[..., None, None]).to_event(1), obs=x)


class GlobalOffsetGuide(PyroModule):
    Config = GlobalConfig

    def __init__(self, config=GlobalConfig()):
        super().__init__()
        self.net = nn.Linear(config.x_dim, 2)
        self.offset = nn.Parameter(torch.zeros(2))

    def forward(self, x, **kwargs):
        pyro.sample("g", dist.Normal(self.offset[0], nn.functional.softplus(self.offset[1])))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.net(x), 1.0).to_event(1))


TINY = ["--dataset", "fake", "--latent-dim", "2", "--hidden", "16", "--batch-size", "50", "--epochs", "1",
        "--eval-samples", "20", "--eval-points", "40", "--quiet"]


def refused(capsys, argv, match):
    from pyro_vae.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("argv,match", [
    (["--model", "m2", "--guide", "diagonal-normal"],
     r"the IS evaluation scores log p\(x\) with labels unobserved, so y is a latent the guide must sample: "
     r"DiagonalNormalGuide does not fit M2: the guide has no site for the model's latent\(s\) y"),
    (["--model", "global-offset", "--guide", "global-offset"],
     r"importance weights need every latent inside the data plate at dim -1; 'g' is global"),
    (["--model", "m2", "--guide", "m2", "--labeled", "100", "--estimator", "iwae"],
     r"^pyro-vae: error: iwae needs reparameterizable guide sites, but 'y' \(Categorical\).*enum-elbo"),
])
def test_a_run_that_would_fail_is_refused_before_training_and_leaves_no_folder(fake_dataset, monkeypatch, capsys,
                                                                               tmp_path, argv, match):
    from pyro_vae.guides import GUIDES
    from pyro_vae.models import MODELS

    monkeypatch.setitem(MODELS, "global-offset", GlobalOffset)
    monkeypatch.setitem(GUIDES, "global-offset", GlobalOffsetGuide)
    import pyro_vae.cli.experiment as experiment
    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("training started"))
    refused(capsys, ["train", *TINY, *argv, "--out", tmp_path / "run"], match)
    assert not (tmp_path / "run").exists()


def test_compare_checks_every_estimator_before_the_first_trains(fake_dataset, monkeypatch, capsys, tmp_path):
    import pyro_vae.cli.experiment as experiment
    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("training started"))
    refused(capsys, ["compare", "--estimators", "enum-elbo,iwae:k=5", *TINY, "--model", "m2", "--guide", "m2",
                     "--labeled", "100",
                     "--out", tmp_path / "cmp"], r"iwae needs reparameterizable guide sites")
    assert not (tmp_path / "cmp").exists()


def test_a_run_refused_by_fit_before_its_first_checkpoint_leaves_no_folder(fake_dataset, monkeypatch, capsys,
                                                                          tmp_path):
    import pyro_vae.cli.experiment as experiment
    from pyro_vae.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("refused by fit")

    monkeypatch.setattr(experiment, "fit", refuse)
    refused(capsys, ["train", *TINY, "--out", tmp_path / "run"], "refused by fit")
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is kept, and what is in it
    (tmp_path / "mine" / "notes.txt").write_text("x")
    refused(capsys, ["train", *TINY, "--out", tmp_path / "mine" / "run"], "refused by fit")
    assert (tmp_path / "mine" / "notes.txt").exists() and not (tmp_path / "mine" / "run").exists()


@pytest.mark.parametrize("alpha,match", [("1", r"renyi at alpha 1 is the ELBO"),
                                         ("-0.5", r"renyi at alpha -0.5 < 0 is no lower bound"),
                                         ("0.5", None)])
def test_renyi_alpha_caveats_are_said_at_the_command_line(fake_dataset, monkeypatch, capsys, tmp_path, alpha, match):
    import pyro_vae.cli.experiment as experiment
    from pyro_vae.cli import main
    from pyro_vae.errors import UserError

    def stop(*args, **kwargs):
        raise UserError("stopped before training")

    monkeypatch.setattr(experiment, "fit", stop)
    main(["train", *TINY, "--estimator", "renyi", "--alpha", alpha, "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in lines if line.startswith("pyro-vae: note: ")]
    assert len(notes) == (match is not None) and lines[-1].endswith("stopped before training")
    if match:
        assert re.search(match, notes[0])


def test_diagnose_a_mixture_prior_model_into_a_folder_given_as_a_str(tmp_path):
    """The whole diagnosis of a user's mixture-prior VAE (c summed out everywhere), written where a notebook's
    str path says."""
    import json

    from pyro_vae.cli.diagnose import diagnose

    model, guide = MixtureVAE(), MomentGuide(MixtureVAE())
    guide.model = [model]
    data = mixture_data(model, 60)
    d = diagnose(model, guide, data, str(tmp_path / "diag"), points=10, samples=200, gap_points=5, gap_steps=50,
                 quiet=True, write_plots=False)
    summary = json.loads((tmp_path / "diag" / "summary.json").read_text())
    assert summary["gaps"]["num_points"] == 5 and "skipped" not in summary["gaps"]
    exact = model.exact_log_likelihood(data.data[:10]).numpy()
    # the importance estimates of log p(x), c summed out: within a few standard errors of the exact ones
    ll = d.importance.log_likelihood
    se = np.sqrt(np.maximum(1 / d.importance.ess - 1 / d.importance.num_samples, 0))
    assert np.all(np.abs(ll - exact) < 4 * se + 0.05), (ll - exact, se)
    assert np.all(np.abs(d.gaps.log_likelihood - exact[:5]) < 4 * d.gaps.log_likelihood_se + 0.05)


def test_a_plain_torch_module_that_registers_no_parameter_gets_one_line_before_training():
    """A model and guide written as plain nn.Modules without pyro.module: Pyro's SVI sees no parameter."""
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_vae import ArrayDataset, TrainConfig, fit
    from pyro_vae.errors import UserError
    from pyro_vae.estimators import ESTIMATORS

    class PlainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Linear(2, 6)

        def forward(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    class PlainGuide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(6, 4)

        def forward(self, x):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    data = ArrayDataset(torch.bernoulli(torch.full((40, 6), 0.5)), binarize="none")
    with pytest.raises(UserError, match="neither PlainModel nor PlainGuide registers a parameter with Pyro"):
        fit(PlainModel(), PlainGuide(), ESTIMATORS["elbo"](), data, None, TrainConfig(epochs=1, batch_size=20),
            quiet=True)
