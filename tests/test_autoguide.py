"""AutoAmortized: a guide read off the model. Exact results on models with a known answer, constrained and
discrete latents written as a user would write them, refusals, the fast path, lazy building, checkpoints."""
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from conftest import SMALL_NET, correlated_linear_gaussian
from pyro.infer import SVI
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import biject_to, constraints

from pyro_vae.cli.runs import make_component
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS, EnumELBO
from pyro_vae.estimators._weights import log_weights
from pyro_vae.guides import GUIDES, AutoAmortized
from pyro_vae.models import M2, MODELS, LinearGaussian, TwoLayerVAE
from pyro_vae.nets import split_loc_scale
from pyro_vae.programs.labels import eval_kwargs, train_kwargs
from pyro_vae.programs.sites import _trace, check_pairing, latent_sites
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit
from pyro_vae.training.replay import Replayed

SMALL = AutoAmortized.Config(hidden=(32,))


# ---- models a user would write --------------------------------------------------------------------------

class GammaPoisson(PyroModule):
    """Poisson factorization: z ~ Gamma(0.5, 0.5)^k per point, counts x ~ Poisson(z softplus(W) + 0.1)."""

    def __init__(self, d=12, k=3):
        super().__init__()
        self.k = k
        self.raw_w = nn.Parameter(torch.randn(k, d))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Gamma(torch.full((self.k,), 0.5), 0.5).to_event(1))
            pyro.sample("x", dist.Poisson(z @ nn.functional.softplus(self.raw_w) + 0.1).to_event(1), obs=x)


class BetaBits(PyroModule):
    """p ~ Beta(2, 2)^k per point; bits x_j ~ Bernoulli(sum_i p_i A_ij) with A's columns on the simplex."""

    def __init__(self, d=12, k=3):
        super().__init__()
        self.k = k
        self.raw_a = nn.Parameter(torch.randn(k, d))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            p = pyro.sample("p", dist.Beta(torch.full((self.k,), 2.0), 2.0).to_event(1))
            probs = (p @ torch.softmax(self.raw_a, 0)).clamp(1e-6, 1 - 1e-6)
            pyro.sample("x", dist.Bernoulli(probs=probs).to_event(1), obs=x)


class DirichletMix(PyroModule):
    """w ~ Dirichlet(1) over k prototypes per point; x ~ Normal(w C, 0.3)."""

    def __init__(self, d=12, k=3):
        super().__init__()
        self.k = k
        self.centers = nn.Parameter(2 * torch.randn(k, d))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            w = pyro.sample("w", dist.Dirichlet(torch.ones(self.k)))
            pyro.sample("x", dist.Normal(w @ self.centers, 0.3).to_event(1), obs=x)


CONSTRAINED = {"gamma-poisson": GammaPoisson, "beta": BetaBits, "dirichlet": DirichletMix}


def constrained_data(name, n=300):
    torch.manual_seed(5)
    truth = CONSTRAINED[name]()
    with torch.no_grad(), pyro.get_param_store().scope():  # PyroModules of one class share a store's params
        x = poutine.trace(truth).get_trace(None, batch_size=n).nodes["x"]["value"]
    return x.float()


def per_point_elbo(model, guide, x, k=16, **kw):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return log_weights(model, guide, k, x, **kw)[0].mean(0).double()


# ---- the registry and the CLI capability ----------------------------------------------------------------

def test_registered_and_built_through_the_capability():
    assert GUIDES["auto"] is AutoAmortized and AutoAmortized.built_from_model
    model = make_component(MODELS, "vae", "model", {**SMALL_NET, "x_dim": 16})
    with pytest.raises(UserError, match="built from the model and an example batch"):
        make_component(GUIDES, "auto", "guide", {**SMALL_NET, "x_dim": 16})
    g = make_component(GUIDES, "auto", "guide", {**SMALL_NET, "x_dim": 16}, model=model,
                       example=(torch.zeros(3, 16), {}))
    assert g.config.hidden == (32,) and g.built
    assert not any(p is q for p in g.parameters() for q in model.parameters()), "the guide owns no model parameter"


def test_on_the_vae_it_is_the_hand_written_diagonal_normal_guide():
    """Same seed, same options: the auto guide's shared network and head are the hand-written encoder's layers,
    drawn in the same order, so q(z|x) is the same function (and training follows the same path)."""
    opts = {**SMALL_NET, "x_dim": 16}
    x = torch.bernoulli(torch.full((5, 16), 0.4))
    model = make_component(MODELS, "vae", "model", opts)
    fns = []
    for name in ("diagonal-normal", "auto"):
        torch.manual_seed(3)
        guide = make_component(GUIDES, name, "guide", opts, model=model, example=(x, {}))
        fns.append(_trace(guide, x).nodes["z"]["fn"].base_dist)
    assert torch.equal(fns[0].loc, fns[1].loc) and torch.equal(fns[0].scale, fns[1].scale)


ZOO_ESTIMATORS = [(m, e) for m in sorted(MODELS) for e in sorted(ESTIMATORS)]


def _expected_refusal(model_name, estimator, guide_trace) -> str | None:
    """What the sites imply: importance weights (and a closed-form KL) need reparameterized sites, the weights
    unscaled ones."""
    discrete = any(guide_trace.nodes[n]["fn"].support.is_discrete for n in latent_sites(guide_trace))
    weighted = estimator in ("iwae", "dreg", "stl", "renyi")
    if (weighted or estimator == "analytic-kl") and discrete:
        return "reparameterizable"
    if (weighted or estimator in ("vimco", "rws")) and model_name == "beta-vae":
        return "unscaled"
    if estimator == "rws" and model_name == "autoencoder":
        return "point mass"
    return None


@pytest.mark.parametrize("model_name,estimator", ZOO_ESTIMATORS)
def test_every_zoo_model_takes_one_step_with_every_estimator_that_fits(model_name, estimator):
    opts = {**SMALL_NET, "x_dim": 64, "image_shape": (8, 8), "num_classes": 4}
    torch.manual_seed(0)
    model = make_component(MODELS, model_name, "model", opts)
    x = torch.bernoulli(torch.full((6, 64), 0.3))
    kw = eval_kwargs(model, torch.arange(6) % 4)  # m2: y latent, the case where the guide has a y head
    guide = make_component(GUIDES, "auto", "guide", opts, model=model, example=(x, train_kwargs(model, torch.arange(6) % 4)))
    check_pairing(model, guide, x, **kw)
    refusal = _expected_refusal(model_name, estimator, _trace(guide, x, **kw))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=ESTIMATORS[estimator]())
    before = [p.detach().clone() for p in guide.parameters()]
    with pyro.get_param_store().scope():
        if refusal:
            with pytest.raises(UserError, match=refusal):
                svi.step(x, **kw)
            return
        loss = svi.step(x, **kw)
    assert math.isfinite(loss)
    assert any(not torch.equal(b, a) for b, a in zip(before, guide.parameters()))


# ---- exact results on the linear-Gaussian model ---------------------------------------------------------

def _diagonal_posterior_model() -> LinearGaussian:
    """Orthogonal loadings and equal noise: the exact posterior N(A x + c, S) has a diagonal S."""
    torch.manual_seed(0)
    m = LinearGaussian(LinearGaussian.Config(x_dim=6, latent_dim=2))
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(6, 2))
        m.weight.copy_(q * torch.tensor([1.5, 0.7]))
        m.bias.normal_()
        m.log_psi.fill_(math.log(0.5))
    return m


def _fit_guide(model, guide, x, steps, estimator, lr=1e-2, batch=128):
    """Train the guide alone (the model's parameters held fixed), lr decaying to 1% of its start."""
    fixed = poutine.block(model, hide_types=["param"])
    gen = torch.Generator().manual_seed(0)
    with pyro.get_param_store().scope():
        svi = SVI(fixed, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.01 ** (1 / steps)}), loss=estimator)
        for _ in range(steps):
            svi.step(x[torch.randint(0, len(x), (batch,), generator=gen)])


def test_linear_gaussian_elbo_reaches_log_p_x_and_iwae_equals_it():
    """The posterior is Gaussian with a mean linear in x and a diagonal covariance, so the default auto guide
    (a tanh MLP) can reach it: its ELBO comes within 0.05 nats/point of the exact log p(x), and its IWAE bound
    (K = 1000) equals log p(x) within 3 standard errors."""
    model = _diagonal_posterior_model()
    s = model.exact_posterior()[2]
    assert torch.allclose(s, torch.diag(s.diagonal()), atol=1e-6)
    x = model.sample_data(512)
    exact = model.exact_log_likelihood(x).double()
    torch.manual_seed(1)
    guide = AutoAmortized(model, example=x)  # Burda et al.'s 200-200 tanh encoder
    start = float((exact - per_point_elbo(model, guide, x)).mean())
    _fit_guide(model, guide, x, 300, ESTIMATORS["elbo"](num_particles=8))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        lw = log_weights(model, guide, 1000, x)[0].double()
    gap = exact - lw.mean(0)
    assert start > 1.0 and 0 <= float(gap.mean()) < 0.05, (start, float(gap.mean()))
    iw_gap = exact - (torch.logsumexp(lw, 0) - math.log(1000))
    se = float(iw_gap.std() / math.sqrt(len(iw_gap)))
    assert abs(float(iw_gap.mean())) < 3 * se + 1e-3, (float(iw_gap.mean()), se)


def test_low_rank_family_closes_the_mean_field_gap_of_a_correlated_posterior():
    model = correlated_linear_gaussian()
    cov = model.exact_posterior()[2]
    precision = torch.linalg.inv(cov)
    mean_field_gap = 0.5 * float(precision.diagonal().log().sum() - torch.logdet(precision))
    assert mean_field_gap > 0.4
    x = model.sample_data(256)
    exact = model.exact_log_likelihood(x).double()
    gaps = {}
    for family in ("diagonal", "lowrank"):
        torch.manual_seed(1)
        guide = AutoAmortized(model, AutoAmortized.Config(hidden=(), family=family, rank=2), example=x)
        # the diagonal family cannot beat its mean-field optimum however long it trains
        _fit_guide(model, guide, x, 700 if family == "lowrank" else 100, ESTIMATORS["stl"](num_particles=4), lr=2e-2)
        gaps[family] = float((exact - per_point_elbo(model, guide, x, k=200)).mean())
    assert gaps["diagonal"] > 0.9 * mean_field_gap
    assert -0.02 < gaps["lowrank"] < 0.05, gaps


def test_iaf_family_is_a_normalized_density_and_trains():
    """The IAF family's log q of its own draws equals log q recomputed by inverting the flow, with particles."""
    model = correlated_linear_gaussian()
    x = model.sample_data(64)
    torch.manual_seed(1)
    guide = AutoAmortized(model, AutoAmortized.Config(hidden=(16,), family="iaf", num_flows=2, context_dim=4),
                          example=x)
    assert len(guide.flows[0]) == 2
    lw, (_, guide_tr) = log_weights(model, guide, 5, x)
    site = guide_tr.nodes["z"]
    assert site["value"].shape == (5, 64, 2) and site["fn"].has_rsample
    fresh = site["value"].detach().clone()  # not the cached draw: the flow is inverted step by step
    assert torch.allclose(site["fn"].log_prob(fresh), site["fn"].log_prob(site["value"]), atol=1e-4)
    start = per_point_elbo(model, guide, x)
    _fit_guide(model, guide, x, 60, ESTIMATORS["elbo"](num_particles=4), lr=2e-2, batch=64)
    assert float((per_point_elbo(model, guide, x) - start).mean()) > 0.5


# ---- constrained latents --------------------------------------------------------------------------------

def _free_normal(guide, x):
    """The head's Normal in unconstrained space, computed from the networks directly."""
    with torch.no_grad():
        out = guide.heads[0](guide.trunk(guide._encoder_input(x, {})))
    return split_loc_scale(out)


def _change_of_variables_log_q(name, value, loc, scale):
    """log q(z) = log N(u; loc, scale) - log|det dz/du| at u = the point mapped to z, computed independently
    of the transform's own log-Jacobian: in closed form for the elementwise maps, by autograd for the simplex
    (the Dirichlet density is with respect to Lebesgue measure on the first k-1 coordinates)."""
    if name == "gamma-poisson":
        u = value.log()
        return (dist.Normal(loc, scale).log_prob(u) - u).sum(-1)
    if name == "beta":
        u = torch.logit(value)
        return (dist.Normal(loc, scale).log_prob(u) - value.log() - torch.log1p(-value)).sum(-1)
    t = biject_to(constraints.simplex)
    u = t.inv(value)
    assert torch.allclose(t(u), value, atol=1e-6)
    out = []
    for u_n, loc_n, scale_n in zip(u.reshape(-1, u.shape[-1]), loc.expand_as(u).reshape(-1, u.shape[-1]),
                                   scale.expand_as(u).reshape(-1, u.shape[-1])):
        jac = torch.autograd.functional.jacobian(lambda v: t(v)[:-1], u_n)
        out.append(dist.Normal(loc_n, scale_n).log_prob(u_n).sum() - torch.linalg.slogdet(jac)[1])
    return torch.stack(out).reshape(u.shape[:-1])


@pytest.mark.parametrize("name", sorted(CONSTRAINED))
def test_constrained_latents_train_stay_in_the_support_and_have_the_change_of_variables_density(name):
    x = constrained_data(name)
    train, test = ArrayDataset(x[:250], binarize="none"), ArrayDataset(x[250:], binarize="none")
    torch.manual_seed(0)
    model = CONSTRAINED[name]()
    guide = AutoAmortized(model, SMALL, example=x[:8])
    assert guide.counts == (name == "gamma-poisson")  # counts enter the encoder as log(1 + x)
    site_name = latent_sites(_trace(model, x[:2]))[0]
    # draws in the support, with particles
    _, (_, tr) = log_weights(model, guide, 20, x[:10])
    site = tr.nodes[site_name]
    assert site["value"].shape[:2] == (20, 10) and bool(site["fn"].support.check(site["value"]).all())
    assert bool(torch.isfinite(site["fn"].log_prob(site["value"])).all())
    # log q against the change of variables
    g_tr = _trace(guide, x[:6])
    value = g_tr.nodes[site_name]["value"].detach().double()
    loc, scale = _free_normal(guide, x[:6])
    expected = _change_of_variables_log_q(name, value, loc.double(), scale.double())
    assert torch.allclose(g_tr.nodes[site_name]["fn"].log_prob(g_tr.nodes[site_name]["value"]).double(), expected,
                          atol=1e-3, rtol=1e-4)
    # and it trains
    start = per_point_elbo(model, guide, test.data)
    fit(model, guide, ESTIMATORS["elbo"](), train, None, TrainConfig(epochs=6, batch_size=50, lr=1e-2), quiet=True)
    gain = per_point_elbo(model, guide, test.data) - start
    assert float(gain.mean()) > max(0.25, 5 * float(gain.std()) / math.sqrt(len(gain))), float(gain.mean())


def test_correlation_cholesky_latent_draws_lie_in_its_support():
    class LKJModel(PyroModule):
        def forward(self, x=None, *, batch_size=None):
            n = x.shape[0] if x is not None else batch_size
            with pyro.plate("data", n, dim=-1):
                chol = pyro.sample("chol", dist.LKJCholesky(3, 2.0))
                pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), scale_tril=chol), obs=x)

    model, x = LKJModel(), torch.randn(7, 3)
    guide = AutoAmortized(model, SMALL, example=x)
    assert guide.sites[0].free_shape == (3,)  # 3 free correlations of a 3 x 3 correlation matrix
    _, (_, tr) = log_weights(model, guide, 4, x)
    value = tr.nodes["chol"]["value"]
    assert value.shape == (4, 7, 3, 3) and bool(constraints.corr_cholesky.check(value).all())


# ---- discrete latents ----------------------------------------------------------------------------------

class Mixture(PyroModule):
    """c ~ Categorical(pi) per point (or its one-hot form); x ~ Normal(mu_c, 1). No continuous latent."""

    def __init__(self, one_hot=False, k=3, d=2, infer=None):
        super().__init__()
        self.one_hot, self.k, self.infer = one_hot, k, infer or {}
        self.logits = nn.Parameter(torch.zeros(k))
        self.mu = nn.Parameter(3 * torch.randn(k, d))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            if self.one_hot:
                c = pyro.sample("c", dist.OneHotCategorical(logits=self.logits), infer=dict(self.infer))
                loc = c @ self.mu
            else:
                c = pyro.sample("c", dist.Categorical(logits=self.logits), infer=dict(self.infer))
                loc = self.mu[c]
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("one_hot", [False, True], ids=["categorical", "one-hot"])
def test_discrete_heads_are_enumerated_and_enum_elbo_is_the_exact_sum(one_hot):
    torch.manual_seed(0)
    model = Mixture(one_hot)
    x = torch.randn(9, 2) * 3
    guide = AutoAmortized(model, SMALL, example=x)
    assert guide.sites[0].kind == ("onehot" if one_hot else "categorical")
    assert _trace(guide, x).nodes["c"]["infer"] == {"enumerate": "parallel"}
    probs = _trace(guide, x).nodes["c"]["fn"].probs.detach()  # q(c|x), (9, 3)
    with torch.no_grad():
        lp_c = torch.log_softmax(model.logits, 0)
        lp_x = dist.Normal(model.mu, 1.0).to_event(1).log_prob(x[:, None, :])  # (9, 3)
        exact = -(probs * (lp_c + lp_x - probs.log())).sum()
    values = [float(EnumELBO()(model, guide, x).detach()) for _ in range(3)]
    assert all(v == pytest.approx(float(exact), rel=1e-5) for v in values)
    # without the mark, c is sampled: a random loss that differs between draws
    sampled = AutoAmortized(model, AutoAmortized.Config(hidden=(32,), enumerate=None), example=x)
    assert "enumerate" not in _trace(sampled, x).nodes["c"]["infer"]
    assert len({float(EnumELBO()(model, sampled, x).detach()) for _ in range(4)}) > 1


def test_the_model_sites_infer_config_is_copied():
    torch.manual_seed(0)
    model = Mixture(infer={"enumerate": "sequential", "baseline": {"use_decaying_avg_baseline": True}})
    guide = AutoAmortized(model, SMALL, example=torch.randn(4, 2))
    assert _trace(guide, torch.randn(4, 2)).nodes["c"]["infer"] == model.infer


def test_a_site_the_model_enumerates_can_be_left_to_the_model():
    """model_enumerated="model": no guide site for c, which the model sums out; with no other latent, the
    enum-elbo loss is then exactly -sum_n log p(x_n), and the evaluation's log p(x) is exact too."""
    torch.manual_seed(0)
    model = Mixture(infer={"enumerate": "parallel"})
    x = torch.randn(9, 2) * 3
    guide = AutoAmortized(model, AutoAmortized.Config(hidden=(8,), model_enumerated="model"), example=x)
    assert guide.sites == [] and latent_sites(_trace(guide, x)) == []
    with torch.no_grad():
        exact = torch.logsumexp(torch.log_softmax(model.logits, 0)
                                + dist.Normal(model.mu, 1.0).to_event(1).log_prob(x[:, None, :]), -1)
    assert float(EnumELBO()(model, guide, x).detach()) == pytest.approx(-float(exact.sum()), rel=1e-5)
    from pyro_vae.analysis.evaluation import evaluate
    result = evaluate(model, guide, ArrayDataset(x.numpy(), binarize="none"), num_samples=4, quiet=True)
    assert torch.allclose(torch.as_tensor(result.log_likelihood), exact.double(), atol=1e-4)
    # the default gives c a head of its own, enumerated in the guide
    assert [s.name for s in AutoAmortized(model, SMALL, example=x).sites] == ["c"]


class BinaryFactors(PyroModule):
    """h ~ Bernoulli(0.5)^4 per point (a tiny sigmoid belief net); x ~ Bernoulli(sigmoid(h W + b))."""

    def __init__(self, d=10, k=4):
        super().__init__()
        self.k = k
        self.out = nn.Linear(k, d)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            h = pyro.sample("h", dist.Bernoulli(torch.full((self.k,), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.out(h)).to_event(1), obs=x)


def test_bernoulli_vector_latent_gets_a_bernoulli_head_sampled_with_its_event_shape():
    torch.manual_seed(0)
    model, x = BinaryFactors(), torch.bernoulli(torch.full((8, 10), 0.5))
    guide = AutoAmortized(model, SMALL, example=x)
    tr = _trace(guide, x)
    site = tr.nodes["h"]
    assert isinstance(site["fn"].base_dist, dist.Bernoulli) and site["fn"].event_shape == (4,)
    assert "enumerate" not in site["infer"]  # 2^4 joint values: Pyro enumerates no cartesian product
    assert set(site["value"].unique().tolist()) <= {0.0, 1.0}
    # the head starts at the prior: logits 0, probabilities 1/2, up to the initial weights' spread
    assert float((site["fn"].base_dist.probs.detach() - 0.5).abs().max()) < 0.3
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=ESTIMATORS["elbo"]())
    assert math.isfinite(svi.step(x))
    with pytest.raises(UserError, match="reparameterizable"):
        ESTIMATORS["iwae"]()(model, guide, x)


@pytest.mark.parametrize("labeled_example", [False, True], ids=["unlabeled example", "labeled example"])
def test_m2_label_site_has_a_head_used_only_where_it_is_latent(labeled_example):
    torch.manual_seed(0)
    model = M2(M2.Config(x_dim=16, latent_dim=2, hidden=(8,), num_classes=3))
    x, y = torch.bernoulli(torch.full((6, 16), 0.4)), torch.arange(6) % 3
    guide = AutoAmortized(model, SMALL, example=x, example_kwargs={"y": y} if labeled_example else {})
    assert [(s.name, s.kwarg) for s in guide.sites] == [("z", None), ("y", "y")]
    assert sorted(latent_sites(_trace(guide, x, y=y))) == ["z"]
    unlabeled = _trace(guide, x)
    assert sorted(latent_sites(unlabeled)) == ["y", "z"] and unlabeled.nodes["y"]["infer"]["enumerate"] == "parallel"
    for kw in ({}, {"y": y}):
        check_pairing(model, guide, x, **kw)
        assert math.isfinite(float(EnumELBO()(model, guide, x, **kw)))


def test_cvae_labels_enter_the_encoder_one_hot():
    opts = {**SMALL_NET, "x_dim": 16, "num_classes": 4}
    model = make_component(MODELS, "cvae", "model", opts)
    x, y = torch.bernoulli(torch.full((5, 16), 0.4)), torch.tensor([0, 1, 2, 3, 0])
    guide = AutoAmortized(model, SMALL, example=x, example_kwargs={"y": y})
    assert guide.trunk[0][0].in_features == 16 + 4
    loc = {k: _trace(guide, x, y=torch.full((5,), k)).nodes["z"]["fn"].base_dist.loc for k in (0, 1)}
    assert not torch.allclose(loc[0], loc[1])
    with pytest.raises(ValueError, match="keyword argument 'y'"):
        guide(x)


@pytest.mark.parametrize("structured", [True, False])
def test_structured_heads_see_the_sites_drawn_before_them(structured):
    """z1's head reads [h(x), z2] when structured; its weights on z2 start at 0 (a mean-field start) and move."""
    torch.manual_seed(0)
    model = TwoLayerVAE(TwoLayerVAE.Config(x_dim=16, latent_dim=2, z1_dim=3, hidden=(8,), top_hidden=(8,)))
    x = torch.bernoulli(torch.full((20, 16), 0.4))
    guide = AutoAmortized(model, AutoAmortized.Config(hidden=(16,), structured=structured), example=x)
    assert [s.name for s in guide.sites] == ["z2", "z1"]  # the model's order
    assert guide.heads[1][0].in_features == 16 + (2 if structured else 0)

    def z1_locs():
        return [poutine.trace(poutine.condition(guide, data={"z2": torch.full((20, 2), v)})).get_trace(x)
                .nodes["z1"]["fn"].base_dist.loc for v in (-2.0, 2.0)]

    assert torch.allclose(*z1_locs())  # at the start: mean-field
    with pyro.get_param_store().scope():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=ESTIMATORS["elbo"]())
        for _ in range(5):
            svi.step(x)
    assert torch.allclose(*z1_locs()) != structured


# ---- global latents, point masses ----------------------------------------------------------------------

class GlobalScale(PyroModule):
    """A global noise scale s ~ Gamma(2, 2) (outside the data plate), z ~ N(0, I) per point, x ~ N(W z, s)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(2, 6)

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        s = pyro.sample("s", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.w(z), s.unsqueeze(-1)).to_event(1), obs=x)


def test_global_latents_get_a_non_amortized_normal_and_importance_weights_refuse_them():
    torch.manual_seed(0)
    model, x = GlobalScale(), torch.randn(200, 6) * 0.3
    guide = AutoAmortized(model, SMALL, example=x)
    assert [(s.name, s.local) for s in guide.sites] == [("s", False), ("z", True)]
    assert guide.global_locs[0].shape == ()
    assert float(guide.global_locs[0]) == pytest.approx(0.0, abs=1e-6)  # log of the prior's mean, 1
    with pyro.get_param_store().scope():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), loss=ESTIMATORS["elbo"]())
        for _ in range(150):
            svi.step(x)
    draw = _trace(guide, x).nodes["s"]["value"]
    assert float(draw) < 0.7  # the data's noise is about 0.3: q(s) moved from the prior's mean 1 towards it
    with pytest.raises(UserError, match="'s' is global"):
        ESTIMATORS["iwae"]()(model, guide, x)


def test_global_latents_in_a_shared_plate_of_their_own():
    """Per-feature loadings w (Normal) and noise scales s (Gamma) in one plate outside the data plate."""
    def body(x):
        features = pyro.plate("features", 3, dim=-1)
        with features:
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            s = pyro.sample("s", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) * w.unsqueeze(-2), s.unsqueeze(-2)).to_event(1), obs=x)
    model, x = _program(body), torch.randn(5, 3)
    guide = AutoAmortized(model, SMALL, example=x)
    assert [(s.name, s.local, s.frames) for s in guide.sites] == [
        ("w", False, (("features", 3, -1),)), ("s", False, (("features", 3, -1),)), ("z", True, ())]
    tr = _trace(guide, x)
    assert tr.nodes["w"]["value"].shape == (3,) and bool((tr.nodes["s"]["value"] > 0).all())
    check_pairing(model, guide, x)
    assert math.isfinite(SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=ESTIMATORS["elbo"]()).step(x))


def test_autoencoder_masked_prior_gets_a_point_mass_without_density():
    model = make_component(MODELS, "autoencoder", "model", {**SMALL_NET, "x_dim": 16})
    x = torch.bernoulli(torch.full((5, 16), 0.4))
    guide = AutoAmortized(model, SMALL, example=x)
    site = _trace(guide, x).nodes["z"]
    assert isinstance(site["fn"], dist.Delta) and site["mask"] is False and guide.has_density is False
    from pyro_vae.analysis.evaluation import no_likelihood_reason
    assert no_likelihood_reason(make_component(MODELS, "vae", "model", {**SMALL_NET, "x_dim": 16}), guide)


# ---- refusals: one line naming the site -----------------------------------------------------------------

def _program(body):
    class User(PyroModule):
        def forward(self, x=None, *, batch_size=None, **kwargs):
            body(x, **kwargs)
    return User()


def _x_obs(x, loc):
    pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def _wishart(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        s = pyro.sample("prec", dist.Wishart(torch.tensor(4.0), torch.eye(2)))
        _x_obs(x, s[..., 0, :])


def _poisson_latent(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        _x_obs(x, pyro.sample("n", dist.Poisson(torch.full((2,), 3.0)).to_event(1)))


def _nested_plate(x):
    data = pyro.plate("data", x.shape[0], dim=-1)
    with data, pyro.plate("coords", 2, dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with data:
        _x_obs(x, z.transpose(-1, -2))


def _dependent_support(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        a = pyro.sample("a", dist.Gamma(torch.full((2,), 2.0), 1.0).to_event(1))
        _x_obs(x, pyro.sample("u", dist.Uniform(torch.zeros(2), a).to_event(1)))


def _data_plate_at_dim_2(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x[:, None, :])


def _subsampled(x):
    with pyro.plate("data", 100, subsample_size=x.shape[0], dim=-1):
        _x_obs(x, pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1)))


def _global_discrete(x):
    c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))
    with pyro.plate("data", x.shape[0], dim=-1):
        _x_obs(x, c.float().expand(x.shape[0], 2))


def _no_latents(x):
    with pyro.plate("data", x.shape[0], dim=-1):
        _x_obs(x, torch.zeros(2))


REFUSED = [(_wishart, "'prec' has support PositiveDefinite"), (_poisson_latent, "'n' is a discrete Poisson"),
           (_nested_plate, "'z' is in plate\\(s\\) coords inside pyro.plate\\('data'\\)"),
           (_dependent_support, "'u' has a support \\(Interval\\) whose upper_bound depends"),
           (_data_plate_at_dim_2, "'z' is in pyro.plate\\('data'\\) at dim -2"),
           (_subsampled, "'z' is in a subsampled plate 'data'"),
           (_global_discrete, "'c' is a discrete latent outside"), (_no_latents, "no latent sites")]


@pytest.mark.filterwarnings("ignore:Singular sample")  # the Wishart model's own draws
@pytest.mark.parametrize("body,message", REFUSED, ids=[b.__name__.strip("_") for b, _ in REFUSED])
def test_what_it_cannot_represent_is_refused_in_one_line_naming_the_site(body, message):
    model, x = _program(body), torch.randn(4, 2)
    with pytest.raises(UserError, match=message) as info:
        AutoAmortized(model, example=x)
    assert "\n" not in str(info.value) and str(info.value).startswith("AutoAmortized cannot build a guide for User")
    lazy = AutoAmortized(model)  # built on the first call: the pairing check turns it into the same one line
    with pytest.raises(UserError, match=message):
        check_pairing(model, lazy, x)


def test_integer_keyword_argument_without_num_classes_is_refused():
    def body(x, y=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            _x_obs(x, pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1)) + y[:, None])
    with pytest.raises(UserError, match="keyword argument 'y' is an integer tensor"):
        AutoAmortized(_program(body), example=torch.randn(3, 2), example_kwargs={"y": torch.arange(3)})


# ---- the fast path, lazy building, checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("case", ["gamma-poisson", "two-layer", "lazy"])
def test_replayed_training_equals_eager(case):
    x = constrained_data("gamma-poisson") if case != "two-layer" else torch.bernoulli(torch.full((300, 16), 0.4))
    train = ArrayDataset(x, binarize="none")
    states = {}
    for replay in (False, True):
        torch.manual_seed(0)
        if case == "two-layer":
            model = TwoLayerVAE(TwoLayerVAE.Config(x_dim=16, latent_dim=2, z1_dim=3, hidden=(8,), top_hidden=(8,)))
        else:
            model = GammaPoisson()
        guide = AutoAmortized(model, SMALL) if case == "lazy" else AutoAmortized(model, SMALL, example=x[:8])
        estimator = ESTIMATORS["dreg"](num_particles=2) if case == "two-layer" else ESTIMATORS["elbo"]()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = fit(model, guide, estimator, train, None,
                       TrainConfig(epochs=2, batch_size=70, lr=1e-2, replay=replay), quiet=True)
        assert not [w for w in caught if "eagerly" in str(w.message)], "the fast path fell back to eager"
        states[replay] = (hist.rows, {**model.state_dict(), **{f"g.{k}": v for k, v in guide.state_dict().items()}})
    (rows_e, eager), (rows_f, fast) = states[False], states[True]
    assert [r["train_elbo"] for r in rows_e] == pytest.approx([r["train_elbo"] for r in rows_f], rel=1e-6)
    assert eager.keys() == fast.keys()
    for k in eager:
        assert torch.allclose(eager[k], fast[k], rtol=1e-5, atol=1e-6), k


def test_replayed_loss_is_bit_identical_and_not_a_fallback():
    torch.manual_seed(0)
    model, x = GammaPoisson(), constrained_data("gamma-poisson", 40)
    guide = AutoAmortized(model, SMALL, example=x)
    params = list(model.parameters()) + list(guide.parameters())
    out = {}
    for name, loss_fn in (("eager", ESTIMATORS["stl"]()), ("replay", Replayed(ESTIMATORS["stl"]()))):
        torch.manual_seed(3)
        with pyro.get_param_store().scope():
            out[name] = [(loss.detach(), torch.autograd.grad(loss, params)) for loss in
                         (loss_fn(model, guide, x) for _ in range(4))]
        if name == "replay":
            assert loss_fn.fallback_reason is None and loss_fn.last_params is not None
    for (le, ge), (lf, gf) in zip(out["eager"], out["replay"]):
        assert torch.equal(le, lf) and all(torch.equal(a, b) for a, b in zip(ge, gf))


def test_lazy_weights_depend_only_on_the_rng_at_construction():
    model, x = GammaPoisson(), constrained_data("gamma-poisson", 10)
    guides = []
    for later_seed in (1, 2):
        torch.manual_seed(0)
        g = AutoAmortized(model, SMALL)
        with pytest.raises(RuntimeError, match="has not read its model yet"):
            g.load_state_dict({})
        torch.manual_seed(later_seed)  # what happens between construction and the first call does not matter
        g(x)
        guides.append(g)
    a, b = (g.state_dict() for g in guides)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    eager = AutoAmortized(model, SMALL, example=x)
    assert eager.state_dict().keys() == a.keys()


def test_state_dict_round_trips_into_a_freshly_built_guide():
    model, x = GammaPoisson(), constrained_data("gamma-poisson", 10)
    torch.manual_seed(0)
    trained = AutoAmortized(model, SMALL, example=x)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    fresh = AutoAmortized(model, SMALL, example=x)
    z = _trace(trained, x).nodes["z"]["value"].detach()
    def log_q(g):
        return poutine.trace(poutine.condition(g, data={"z": z})).get_trace(x).nodes["z"]["fn"].log_prob(z)
    assert not torch.allclose(log_q(trained), log_q(fresh))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(log_q(trained), log_q(fresh))


def test_cli_trains_evaluates_and_diagnoses_with_the_auto_guide(fake_dataset, tmp_path, capsys):
    from pyro_vae.cli import main
    run = tmp_path / "auto"
    common = ["--dataset", fake_dataset, "--latent-dim", "2", "--hidden", "16", "--quiet"]
    assert main(["train", *common, "--model", "two-layer-vae", "--guide", "auto", "--epochs", "1",
                 "--eval-samples", "8", "--out", str(run)]) == 0
    assert "test log-likelihood" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--samples", "8", "--quiet"]) == 0  # rebuilt from the run's spec
    assert main(["diagnose", str(run), "--points", "5", "--samples", "100", "--gap-points", "3", "--gap-steps", "5",
                 "--quiet"]) == 0
    assert (run / "diagnostics" / "summary.json").exists()


LAZY_SCRIPT = '''
import sys
import numpy as np
import torch
from pyro_vae import ArrayDataset, TrainConfig, fit
from pyro_vae.estimators import ELBO
from pyro_vae.guides import AutoAmortized
from pyro_vae.models import Autoencoder
from pyro_vae.training import distributed

torch.set_num_threads(1)
world = distributed.join(torch.device("cpu"))
x = np.load(sys.argv[1])["x"]
torch.manual_seed(0)
model = Autoencoder(Autoencoder.Config(x_dim=16, latent_dim=2, hidden=(8,), activation="relu"))
guide = AutoAmortized(model, AutoAmortized.Config(hidden=(8,), activation="relu"))  # built on its first call
fit(model, guide, ELBO(), ArrayDataset(x, binarize="none"), None,
    TrainConfig(epochs=2, batch_size=40, lr=1e-2, device="cpu"), quiet=True, world=world)
guides = distributed.gather_objects(world, guide.state_dict())
if world.main:
    torch.save({"model": model.state_dict(), "guides": guides}, sys.argv[2])
distributed.finish()
'''


def test_a_lazily_built_guide_trains_in_two_processes_as_in_one(tmp_path):
    """The autoencoder's point-mass guide draws nothing at random, so two gloo processes end where one process
    ends on the combined batch, and both ranks build the same weights on their first call."""
    import os
    import subprocess
    import sys

    import numpy as np

    script, data = tmp_path / "lazy.py", tmp_path / "x.npz"
    script.write_text(LAZY_SCRIPT)
    np.savez(data, x=(np.random.default_rng(0).random((160, 16)) > 0.5).astype("float32"))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    runs = {"one": [sys.executable, str(script)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]}
    out = {}
    for name, cmd in runs.items():
        done = subprocess.run([*cmd, str(data), str(tmp_path / f"{name}.pt")], capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    rank0, rank1 = out["two"]["guides"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' guides differ"
    one = out["one"]["guides"][0]
    assert one.keys() == rank0.keys()
    for k in one:
        assert torch.allclose(one[k], rank0[k], rtol=1e-4, atol=1e-5), k
    for k, v in out["one"]["model"].items():
        assert torch.allclose(v, out["two"]["model"][k], rtol=1e-4, atol=1e-5), k
