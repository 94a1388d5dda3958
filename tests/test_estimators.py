"""Every estimator of the registry, checked against exact answers on a linear-Gaussian model.

With z ~ N(0, I), x | z ~ N(Wz + b, diag psi), log p(x) and p(z|x) are known in closed form
(models/linear_gaussian.py). Tests run in float64 and are parametrized over ``ESTIMATORS``, so a new
estimator is covered without new test code.
"""
import math

import pytest
import torch

from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.analysis.snr import gradient_samples
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ELBO, ESTIMATORS, IWAE, STL, AnalyticKL, DReG, Renyi
from pyro_vae.guides import LinearGaussianGuide
from pyro_vae.models import LinearGaussian

X_DIM, Z_DIM, N = 6, 2, 8


pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def problem():
    torch.manual_seed(1)
    model = LinearGaussian(LinearGaussian.Config(x_dim=X_DIM, latent_dim=Z_DIM, init_scale=1.0))
    with torch.no_grad():
        model.bias.normal_()
        model.log_psi.uniform_(-1.0, 0.5)
    x = model.sample_data(N)
    return model, x, model.exact_log_likelihood(x)


def exact_guide(model):
    return LinearGaussianGuide(LinearGaussianGuide.Config(x_dim=X_DIM, latent_dim=Z_DIM)).set_exact(model)


def poor_guide(model, full_covariance=False, widen=0.6, shift=0.3):
    """The exact posterior's mean shifted and its marginal scales widened: a guide != the posterior."""
    g = LinearGaussianGuide(LinearGaussianGuide.Config(x_dim=X_DIM, latent_dim=Z_DIM, full_covariance=full_covariance))
    a, c, s = model.exact_posterior()
    with torch.no_grad():
        g.a.copy_(a)
        g.c.copy_(c + shift)
        g.log_diag.copy_(0.5 * s.diagonal().log() + widen)
    return g


def instance(name, k=4):
    cls = ESTIMATORS[name]
    return cls(num_particles=k) if "num_particles" in cls.__dataclass_fields__ else cls()


def values(est, model, guide, x, repeats):
    with torch.no_grad():
        return torch.stack([-est(model, guide, x) for _ in range(repeats)])


def mean_se(v):
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item()


LOG_WEIGHT_BASED = sorted(n for n, c in ESTIMATORS.items() if c.value_from_log_weights)


@pytest.mark.parametrize("name", LOG_WEIGHT_BASED)
def test_bound_equals_log_likelihood_at_the_exact_posterior(problem, name):
    model, x, exact = problem
    guide = exact_guide(model)
    for _ in range(3):
        bound = -instance(name)(model, guide, x).item()
        assert abs(bound - exact.sum().item()) < 1e-6, (name, bound, exact.sum().item())


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_value_is_a_lower_bound_in_expectation(problem, name):
    model, x, exact = problem
    m, se = mean_se(values(instance(name), model, poor_guide(model), x, 400))
    gap = exact.sum().item() - m
    assert gap > -3 * se, (name, m, exact.sum().item(), se)
    assert gap > 10 * se, "the guide should be poor enough that every bound is visibly below log p(x)"


def test_elbo_below_iwae_k_below_iwae_2k_below_log_likelihood(problem):
    model, x, exact = problem
    guide = poor_guide(model)
    elbo, se0 = mean_se(values(ELBO(), model, guide, x, 400))
    iwae_k, se1 = mean_se(values(IWAE(4), model, guide, x, 400))
    iwae_2k, se2 = mean_se(values(IWAE(8), model, guide, x, 400))
    assert elbo + 3 * math.hypot(se0, se1) < iwae_k
    assert iwae_k + 3 * math.hypot(se1, se2) < iwae_2k
    assert iwae_2k < exact.sum().item()
    # the same draws give the same value through DReG, and Rényi at alpha=0 is IWAE
    torch.manual_seed(5)
    v_iwae = IWAE(4)(model, guide, x)
    torch.manual_seed(5)
    v_dreg = DReG(4)(model, guide, x)
    torch.manual_seed(5)
    v_renyi = Renyi(alpha=0.0, num_particles=4)(model, guide, x)
    assert torch.allclose(v_iwae, v_dreg, atol=1e-10) and torch.allclose(v_iwae, v_renyi, atol=1e-10)


def test_renyi_moves_from_iwae_to_elbo_as_alpha_goes_to_one(problem):
    model, x, _ = problem
    guide = poor_guide(model)
    bounds = []
    for alpha in (0.0, 0.5, 0.99, 1.0):
        torch.manual_seed(7)  # common random numbers: the bound is monotone in alpha for fixed draws
        bounds.append(-Renyi(alpha=alpha, num_particles=16)(model, guide, x).item())
    assert bounds[0] > bounds[1] > bounds[2] >= bounds[3] - 1e-9
    torch.manual_seed(7)
    elbo_same_draws = -STL(num_particles=16)(model, guide, x).item()
    assert abs(bounds[3] - elbo_same_draws) < 1e-9
    assert abs(bounds[2] - bounds[3]) < 0.05 * abs(bounds[0] - bounds[3])


def test_analytic_kl_and_monte_carlo_kl_agree_in_expectation(problem):
    model, x, _ = problem
    guide = poor_guide(model)  # diagonal: the Gaussian KL is registered in closed form
    mc, se_mc = mean_se(values(ELBO(), model, guide, x, 1000))
    an, se_an = mean_se(values(AnalyticKL(), model, guide, x, 1000))
    assert abs(mc - an) < 4 * math.hypot(se_mc, se_an), (mc, an)
    assert se_an < se_mc, "the closed-form KL should remove part of the variance"


def grads(model, guide, est, x, repeats):
    g = gradient_samples(model, guide, est, x, repeats)
    return g["encoder"], g["decoder"]


def same_mean(a, b, z=4.5):
    diff = a.mean(0) - b.mean(0)
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return bool((diff.abs() <= z * se + 1e-9).all())


def test_dreg_gradient_is_unbiased_for_the_iwae_gradient(problem):
    model, x, _ = problem
    guide = poor_guide(model, full_covariance=True)
    enc_i, dec_i = grads(model, guide, IWAE(4), x, 600)
    enc_d, dec_d = grads(model, guide, DReG(4), x, 600)
    assert same_mean(enc_i, enc_d) and same_mean(dec_i, dec_d)
    # the comparison has the power to fail: the ELBO's gradient is a different one
    enc_e, _ = grads(model, guide, ELBO(num_particles=4), x, 600)
    assert not same_mean(enc_i, enc_e)
    assert enc_d.var(0).sum() < 0.5 * enc_i.var(0).sum(), "DReG should cut the guide-gradient variance"


def test_stl_gradient_is_unbiased_for_the_elbo_gradient(problem):
    model, x, _ = problem
    guide = poor_guide(model, full_covariance=True)
    enc_e, dec_e = grads(model, guide, ELBO(), x, 600)
    enc_s, dec_s = grads(model, guide, STL(), x, 600)
    assert same_mean(enc_e, enc_s) and same_mean(dec_e, dec_s)
    enc_i, _ = grads(model, guide, IWAE(8), x, 600)
    assert not same_mean(enc_e, enc_i)


def test_stl_guide_gradient_vanishes_at_the_exact_posterior(problem):
    model, x, _ = problem
    guide = exact_guide(model)
    enc_s, _ = grads(model, guide, STL(), x, 50)
    enc_e, _ = grads(model, guide, ELBO(), x, 50)
    assert enc_s.abs().max() < 1e-8
    assert enc_e.std(0).max() > 1e-3, "the plain ELBO gradient is noisy there; STL removes exactly that"


def test_is_log_likelihood_matches_the_exact_one(problem):
    model, x, exact = problem
    data = ArrayDataset(model.sample_data(40), binarize="none")  # datasets hold float32
    exact = model.exact_log_likelihood(data.data.double())
    guide = poor_guide(model, full_covariance=True).float()
    result = evaluate(model.float(), guide, data, num_samples=2000, quiet=True)
    s = result.summary()
    assert abs(s["log_likelihood"] - exact.mean().item()) < 2 * s["log_likelihood_se"]
    is_error = (torch.as_tensor(result.log_likelihood) - exact).abs().mean()
    elbo_gap = (exact - torch.as_tensor(result.elbo)).mean()
    assert elbo_gap > 0.2, "the ELBO of this guide should be visibly looser"
    assert is_error < 0.1 * elbo_gap, "K=2000 importance samples should close most of the ELBO's gap"


class _HierarchicalGuide(torch.nn.Module):
    """q(z|x) q(w|z): the second latent's distribution depends on the first draw."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(Z_DIM))

    def __call__(self, x):
        import pyro
        import pyro.distributions as dist
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(self.loc.expand(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("w", dist.Normal(z, 1.0).to_event(1))


def _model_with_w(x):
    import pyro
    import pyro.distributions as dist
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
        w = pyro.sample("w", dist.Normal(z, 1.0).to_event(1))
        loc = w.sum(-1, keepdim=True).expand(w.shape[:-1] + x.shape[-1:])
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


class _ParamHierarchicalGuide:
    """The same guide as a plain function of pyro.param: the replay must hold those parameters fixed too."""

    def __call__(self, x):
        import pyro
        import pyro.distributions as dist
        loc = pyro.param("loc", torch.zeros(Z_DIM))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(loc.expand(x.shape[0], Z_DIM), 1.0).to_event(1))
            pyro.sample("w", dist.Normal(z, 1.0).to_event(1))


@pytest.mark.parametrize("guide_kind", ["module", "pyro.param"])
@pytest.mark.parametrize("k", [1, 3])
def test_path_derivative_gradients_follow_the_draw_of_z_into_q_w_given_z(problem, k, guide_kind):
    """z = loc + e1, w = z + e2. With loc held fixed in log q(z) q(w|z), d log q / d loc = -e1: the
    +e2 through w and the -e2 through z (the mean of q(w|z)) cancel. Detaching each drawn distribution
    would drop the second and leave -e1 - e2. So the gradient of the loss on loc is, per point and
    draw, -(w~^2 for DReG, 1/K for STL) * (-loc + sum_i (x_i - sum_j w_j))."""
    import pyro

    from pyro_vae.estimators._weights import log_weights
    _, x, _ = problem
    guide = _HierarchicalGuide() if guide_kind == "module" else _ParamHierarchicalGuide()
    with torch.no_grad():
        loc = guide.loc if guide_kind == "module" else pyro.param("loc", torch.zeros(Z_DIM))
        loc.copy_(torch.tensor([0.3, -0.2]))
    for est in (STL(num_particles=k), DReG(k)):
        torch.manual_seed(11)
        (grad,) = torch.autograd.grad(est(_model_with_w, guide, x), [loc])
        torch.manual_seed(11)  # the same draws
        log_w, (_, guide_tr) = log_weights(_model_with_w, guide, k, x)
        w = guide_tr.nodes["w"]["value"].detach()  # (k, N, Z_DIM)
        c = (x - w.sum(-1, keepdim=True)).sum(-1)  # (k, N)
        weight = torch.softmax(log_w.detach(), 0) ** 2 if isinstance(est, DReG) else torch.full_like(c, 1 / k)
        expected = -(weight.unsqueeze(-1) * (c.unsqueeze(-1) - loc.detach())).sum((0, 1))
        assert torch.allclose(grad, expected, atol=1e-10), (type(est).__name__, grad, expected)


def test_path_derivative_estimators_refuse_a_guide_module_they_cannot_hold_fixed(problem):
    import pyro
    import pyro.distributions as dist
    _, x, _ = problem
    net = torch.nn.Linear(X_DIM, Z_DIM)

    def guide(x):  # a function over an outside module: its parameters cannot be detached for the replay
        pyro.module("encoder", net)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(net(x), 1.0).to_event(1))
            pyro.sample("w", dist.Normal(z, 1.0).to_event(1))

    for est in (DReG(3), STL()):
        with pytest.raises(UserError, match="module 'encoder'"):
            est(_model_with_w, guide, x)
    IWAE(3)(_model_with_w, guide, x)  # the plain IWAE gradient has no such requirement


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_options_are_validated(name):
    cls = ESTIMATORS[name]
    if "num_particles" in cls.__dataclass_fields__:
        with pytest.raises(ValueError):
            cls(num_particles=0)
    assert repr(instance(name)).startswith(cls.__name__)


def test_gradient_snr_shows_iwae_encoder_snr_falling_with_k_and_dreg_not(problem):
    """Rainforth et al. (2018): IWAE's encoder SNR falls like 1/sqrt(K); DReG's does not (Tucker et al.)."""
    from pyro_vae.analysis.snr import gradient_snr
    model, x, _ = problem
    guide = poor_guide(model, full_covariance=True, widen=0.1, shift=0.1)
    iwae = {k: gradient_snr(model, guide, IWAE(k), x, 200) for k in (1, 100)}
    dreg = {k: gradient_snr(model, guide, DReG(k), x, 200) for k in (1, 100)}
    assert iwae[100]["encoder"] < 0.5 * iwae[1]["encoder"], iwae
    assert dreg[100]["encoder"] > 2 * dreg[1]["encoder"], dreg
    # the decoder's SNR grows with K under both, as the theory says
    assert iwae[100]["decoder"] > 2 * iwae[1]["decoder"] and dreg[100]["decoder"] > 2 * dreg[1]["decoder"]


def _model_with_global(x):
    import pyro
    import pyro.distributions as dist
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("x", dist.Normal(g[..., None] + torch.zeros(x.shape), 1.0).to_event(1), obs=x)


def _guide_with_global(x):
    import pyro
    import pyro.distributions as dist
    pyro.sample("g", dist.Normal(torch.tensor(0.1), torch.tensor(1.0)))


@pytest.mark.parametrize("name", [n for n in sorted(ESTIMATORS) if n not in ("elbo", "analytic-kl", "enum-elbo", "tracegraph")])
def test_importance_weighted_estimators_refuse_global_latents(problem, name):
    _, x, _ = problem
    with pytest.raises(UserError, match="'g' is global"):
        instance(name)(_model_with_global, _guide_with_global, x)


@pytest.mark.parametrize("name", [n for n in sorted(ESTIMATORS) if n not in ("elbo", "analytic-kl", "enum-elbo", "tracegraph")])
def test_importance_weighted_estimators_refuse_scaled_sites(problem, name):
    import pyro.poutine as poutine
    model, x, _ = problem
    guide = exact_guide(model)
    with pytest.raises(UserError, match="is scaled"):
        instance(name)(poutine.scale(model, 0.5), guide, x)


def _nested_model(x):
    """Per point, 3 local latents in a plate inside the data plate (at dim -2)."""
    import pyro
    import pyro.distributions as dist
    with pyro.plate("data", x.shape[0], dim=-1):
        with pyro.plate("parts", 3, dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.sum(-2, keepdim=True).unsqueeze(-1).expand(z.shape[:-2] + (1,) + x.shape)
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


class _NestedGuide(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.loc = torch.nn.Parameter(0.1 * torch.randn(3, n))

    def __call__(self, x):
        import pyro
        import pyro.distributions as dist
        with pyro.plate("data", x.shape[0], dim=-1), pyro.plate("parts", 3, dim=-2):
            pyro.sample("z", dist.Normal(self.loc, 0.8))


def test_dreg_handles_plates_nested_in_the_data_plate(problem):
    _, x, _ = problem
    x = x[:4]  # 4 points and 3 parts: a hook laid out on the wrong axis would fail or mix points
    guide = _NestedGuide(4)
    enc_i = torch.stack([torch.autograd.grad(IWAE(5)(_nested_model, guide, x), guide.loc)[0] for _ in range(1500)])
    enc_d = torch.stack([torch.autograd.grad(DReG(5)(_nested_model, guide, x), guide.loc)[0] for _ in range(1500)])
    assert same_mean(enc_i.flatten(1), enc_d.flatten(1))
    assert enc_d.var(0).sum() < enc_i.var(0).sum()


# Two stochastic layers and a hierarchical guide, with exact answers.
#
# z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag psi1), x | z1 ~ N(B z1 + b, diag psi2). Then
# z1 ~ N(a, C1) with C1 = A A^T + diag psi1, x ~ N(B a + b, B C1 B^T + diag psi2), and the posterior
# factors as p(z1 | x) p(z2 | z1) (x depends on z2 only through z1), both Gaussian and linear in what
# they condition on. The guide q(z1 | x) q(z2 | z1), Gaussian and linear in the same way, contains it.

D1, D2 = 3, 2


class _TwoLayerLinearGaussian(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(D1, D2))
        self.a = torch.nn.Parameter(0.5 * torch.randn(D1))
        self.log_psi1 = torch.nn.Parameter(torch.empty(D1).uniform_(-1.0, 0.0))
        self.B = torch.nn.Parameter(torch.randn(X_DIM, D1))
        self.b = torch.nn.Parameter(torch.randn(X_DIM))
        self.log_psi2 = torch.nn.Parameter(torch.empty(X_DIM).uniform_(-1.0, 0.5))

    def forward(self, x):
        import pyro
        import pyro.distributions as dist
        with pyro.plate("data", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(D2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T + self.a, (0.5 * self.log_psi1).exp()).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.B.T + self.b, (0.5 * self.log_psi2).exp()).to_event(1), obs=x)

    @torch.no_grad()
    def marginals(self):
        c1 = self.A @ self.A.T + torch.diag(self.log_psi1.exp())
        return c1, self.B @ self.a + self.b, self.B @ c1 @ self.B.T + torch.diag(self.log_psi2.exp())

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        import pyro.distributions as dist
        _, mean, cov = self.marginals()
        return dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def sample_data(self, n):
        _, mean, cov = self.marginals()
        return mean + torch.randn(n, X_DIM) @ torch.linalg.cholesky(cov).T

    @torch.no_grad()
    def exact_posterior(self):
        """((M1, c1, S1), (M2, c2, S2)): p(z1|x) = N(M1 x + c1, S1), p(z2|z1) = N(M2 z1 + c2, S2)."""
        c1, _, _ = self.marginals()
        psi2_inv, psi1_inv = (-self.log_psi2).exp(), (-self.log_psi1).exp()
        s1 = torch.linalg.inv(torch.linalg.inv(c1) + self.B.T @ (psi2_inv[:, None] * self.B))
        m1 = s1 @ self.B.T * psi2_inv
        off1 = s1 @ torch.linalg.solve(c1, self.a) - m1 @ self.b
        s2 = torch.linalg.inv(torch.eye(D2) + self.A.T @ (psi1_inv[:, None] * self.A))
        m2 = s2 @ self.A.T * psi1_inv
        return (m1, off1, s1), (m2, -m2 @ self.a, s2)


class _HierarchicalLinearGuide(torch.nn.Module):
    """q(z1|x) = N(M1 x + c1, L1 L1^T), q(z2|z1) = N(M2 z1 + c2, L2 L2^T), every parameter free."""

    def __init__(self):
        super().__init__()
        for i, (d, d_in) in enumerate([(D1, X_DIM), (D2, D1)], start=1):
            setattr(self, f"M{i}", torch.nn.Parameter(torch.zeros(d, d_in)))
            setattr(self, f"c{i}", torch.nn.Parameter(torch.zeros(d)))
            setattr(self, f"log_diag{i}", torch.nn.Parameter(torch.zeros(d)))
            setattr(self, f"lower{i}", torch.nn.Parameter(torch.zeros(d, d)))

    def tril(self, i):
        return torch.diag_embed(getattr(self, f"log_diag{i}").exp()) + getattr(self, f"lower{i}").tril(-1)

    def forward(self, x):
        import pyro
        import pyro.distributions as dist
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.MultivariateNormal(x @ self.M1.T + self.c1, scale_tril=self.tril(1)))
            pyro.sample("z2", dist.MultivariateNormal(z1 @ self.M2.T + self.c2, scale_tril=self.tril(2)))

    @torch.no_grad()
    def set(self, posterior, shifts=(0.0, 0.0), widen=0.0):
        """Copy the exact posterior factors in; shift each layer's mean, widen the scales."""
        for i, ((m, c, s), shift) in enumerate(zip(posterior, shifts), start=1):
            chol = torch.linalg.cholesky(s)
            getattr(self, f"M{i}").copy_(m)
            getattr(self, f"c{i}").copy_(c + shift)
            getattr(self, f"log_diag{i}").copy_(chol.diagonal().log() + widen)
            getattr(self, f"lower{i}").copy_(chol.tril(-1))
        return self


@pytest.fixture
def two_layer():
    torch.manual_seed(2)
    model = _TwoLayerLinearGaussian()
    x = model.sample_data(N)
    return model, x, model.exact_log_likelihood(x)


def _poor(model):
    return _HierarchicalLinearGuide().set(model.exact_posterior(), shifts=(0.5, 1.0))


@pytest.mark.parametrize("name", LOG_WEIGHT_BASED)
def test_two_layer_bound_equals_log_likelihood_at_the_exact_hierarchical_posterior(two_layer, name):
    model, x, exact = two_layer
    guide = _HierarchicalLinearGuide().set(model.exact_posterior())
    for _ in range(3):
        bound = -instance(name)(model, guide, x).item()
        assert abs(bound - exact.sum().item()) < 1e-6, (name, bound, exact.sum().item())
    assert -IWAE(4)(model, _poor(model), x).item() < exact.sum().item() - 1.0


def _cut_path_stl(model, guide, x):
    """STL as it was for one-layer guides: each drawn distribution's parameters detached, which for
    q(z2|z1) also cuts the path from z1 into its mean. What it drops, d log q(z2|z1) / d z1 at fixed z2,
    has mean zero given z1, so this stays unbiased; but it is noise that does not vanish at the posterior."""
    from pyro_vae.estimators._weights import _site_log_prob, particle_traces
    from pyro_vae.programs.sites import sample_sites
    model_tr, guide_tr = particle_traces(model, guide, 1, x)
    log_w = (sum(_site_log_prob(s, 1, False) for s in sample_sites(model_tr).values())
             - sum(_site_log_prob(s, 1, True) for s in sample_sites(guide_tr).values()))
    return -log_w.mean(0).sum()


def _dreg_hooked_on_raw_draws(k):
    """DReG with the w~ hook on each raw draw of the guide instead of on log w's copy: the part of
    d log w / d z2 that flows back through z2 = g(z1, eps, phi) into z1 is scaled at z2 and again at z1."""
    from pyro_vae.estimators._weights import log_weights

    def loss(model, guide, x):
        log_w, (_, guide_tr) = log_weights(model, guide, k, x, stop_guide_params=True)
        w = torch.softmax(log_w.detach(), 0)
        for name in ("z1", "z2"):
            guide_tr.nodes[name]["value"].register_hook(lambda g: g * w.unsqueeze(-1))
        return -(w * log_w).sum()
    return loss


def test_two_layer_dreg_gradient_is_unbiased_for_the_iwae_gradient(two_layer):
    model, x, _ = two_layer
    guide = _poor(model)
    enc_i, dec_i = grads(model, guide, IWAE(16), x, 300)
    enc_d, dec_d = grads(model, guide, DReG(16), x, 300)
    assert same_mean(enc_i, enc_d) and same_mean(dec_i, dec_d)
    assert enc_d.var(0).sum() < 0.5 * enc_i.var(0).sum(), "DReG should cut the guide-gradient variance"
    # the comparison has the power to tell w~^2 applied twice on the z1 -> z2 path
    enc_w, _ = grads(model, guide, _dreg_hooked_on_raw_draws(16), x, 300)
    assert not same_mean(enc_i, enc_w)


def test_two_layer_stl_gradient_is_unbiased_for_the_elbo_gradient(two_layer):
    model, x, _ = two_layer
    guide = _poor(model)
    enc_e, dec_e = grads(model, guide, ELBO(), x, 300)
    enc_s, dec_s = grads(model, guide, STL(), x, 300)
    assert same_mean(enc_e, enc_s) and same_mean(dec_e, dec_s)
    enc_i, _ = grads(model, guide, IWAE(4), x, 200)
    assert not same_mean(enc_e, enc_i), "the comparison has the power to tell another gradient"


def test_two_layer_stl_guide_gradient_vanishes_at_the_exact_hierarchical_posterior(two_layer):
    model, x, _ = two_layer
    guide = _HierarchicalLinearGuide().set(model.exact_posterior())
    enc_s, _ = grads(model, guide, STL(), x, 50)
    enc_d, _ = grads(model, guide, DReG(4), x, 50)
    assert enc_s.abs().max() < 1e-8 and enc_d.abs().max() < 1e-8
    enc_c, _ = grads(model, guide, _cut_path_stl, x, 50)
    enc_e, _ = grads(model, guide, ELBO(), x, 50)
    assert enc_c.abs().max() > 1e-2, "cutting the z1 -> q(z2|z1) path leaves noise there"
    assert enc_e.std(0).max() > 1e-3
