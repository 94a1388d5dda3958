"""Discrete latents: every estimator of the registry against exact answers on a sigmoid belief net.

The net has 8 binary latents and 10 observed bits, so log p(x), the exact posterior, the exact ELBO,
the exact IWAE_2 bound (all 256^2 pairs of draws) and the expected wake-phi gradient of RWS follow by
enumeration, and their exact gradients by autograd through it. Float64 throughout.

Gradient checks are z-tests: R estimator calls, each on the batch of N points repeated r times (so
one call sums r independent gradient draws), give a mean gradient per parameter and its standard
error; every one of the 186 parameters must lie within Z = 4.5 standard errors of the exact
gradient (a two-sided 4.5-sigma test per parameter: with 186 parameters the chance that a correct
estimator fails somewhere is about 186 * 7e-6 = 1.3e-3). The power check: the same test, same draws,
rejects the other bound's exact gradient.
"""
import dataclasses
import itertools
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule

from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS, RWS, VIMCO, TraceGraph
from pyro_vae.estimators._weights import log_weights
from pyro_vae.guides import BernoulliGuide
from pyro_vae.models import SigmoidBeliefNet
from pyro_vae.training.replay import Replayed
from pyro_vae.training.replay_warning import ReplayWarning

X_DIM, H_DIM, N, K = 10, 8, 4, 2
Z = 4.5
# What each estimator that accepts a discrete guide estimates the gradient of: a new registry entry that
# accepts the sbn must be added here (test_every_estimator_either_has_a_target_or_refuses checks it).
TARGETS = {"elbo": "elbo", "enum-elbo": "elbo", "tracegraph": "elbo", "vimco": "iwae", "rws": "rws"}


pytestmark = pytest.mark.usefixtures("float64")


def make_model(seed=3):
    torch.manual_seed(seed)
    model = SigmoidBeliefNet(SigmoidBeliefNet.Config(x_dim=X_DIM, latent_dim=H_DIM))
    with torch.no_grad():  # strong weights: a posterior far from the prior and far from factorized
        model.decoder.weight.normal_(0, 1.5)
        model.decoder.bias.normal_(0, 1.0)
        model.prior_logits.normal_(0, 1.0)
    return model


def make_guide(**config):
    guide = BernoulliGuide(BernoulliGuide.Config(x_dim=X_DIM, latent_dim=H_DIM, **config))
    with torch.no_grad():
        for p in guide.encoder.parameters():
            p.normal_(0, 0.5)
    return guide


@pytest.fixture
def problem():
    model = make_model()
    x = (torch.rand(N, X_DIM, generator=torch.Generator().manual_seed(0)) < 0.5).double()
    return model, make_guide(), x


# ---------------------------------------------------------------- exact answers by enumeration

def log_q_table(guide, x, values):
    """log q(h|x) of every configuration, (M, B), from the guide's own program conditioned on them."""
    with pyro.plate("_configurations", values["h"].shape[0], dim=-2):
        tr = poutine.trace(poutine.condition(guide, data=values)).get_trace(x)
    return sum(s["fn"].log_prob(s["value"]) for s in tr.nodes.values() if s["type"] == "sample")


def exact_objectives(model, guide, x):
    """Summed over the points: the ELBO, IWAE_2 and the wake-phi surrogate whose phi-gradient is
    E[sum_k w~_k d log q(h_k|x)] (weights and draw probabilities held fixed)."""
    log_p, values = model.log_joint_table(x)
    log_q = log_q_table(guide, x, values)
    q, log_w = log_q.exp(), log_p - log_q
    elbo = (q * log_w).sum()
    pair = torch.stack(torch.broadcast_tensors(log_w[:, None], log_w[None, :]))  # (2, M, M, B)
    qq = q[:, None] * q[None, :]
    iwae = (qq * (torch.logsumexp(pair, 0) - math.log(2))).sum()
    w = torch.softmax(pair.detach(), 0)
    wake = (qq.detach() * (w[0] * log_q[:, None] + w[1] * log_q[None, :])).sum()
    return {"elbo": elbo, "iwae": iwae, "wake": wake}


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def exact_gradients(model, guide, x):
    """The gradient of each negative bound: {"elbo", "iwae"} over (model, guide) parameters, and "rws"
    (model part: IWAE's; guide part: minus the expected wake-phi gradient)."""
    params = [*model.parameters(), *guide.parameters()]
    obj = exact_objectives(model, guide, x)
    out = {name: flat_grad(-obj[name], params) for name in ("elbo", "iwae")}
    n_model = sum(p.numel() for p in model.parameters())
    out["rws"] = torch.cat([out["iwae"][:n_model], flat_grad(-obj["wake"], list(guide.parameters()))])
    return out, n_model


def gradient_draws(estimator, model, guide, x, calls=300, repeat=100):
    """(calls, P) gradients of the loss on one copy of x, each the mean of ``repeat`` independent draws."""
    params = [*model.parameters(), *guide.parameters()]
    xr = x.repeat(repeat, 1)
    with pyro.validation_enabled(False):  # Pyro's checks run in the other tests; here they would double the time
        return torch.stack([flat_grad(estimator(model, guide, xr), params) / repeat for _ in range(calls)])


def max_z(draws, target):
    """The largest |mean - target| / standard error over the parameters."""
    se = draws.std(0) / math.sqrt(len(draws))
    return ((draws.mean(0) - target).abs() / se.clamp_min(1e-12)).max().item()


def instance(name, k=K):
    cls = ESTIMATORS[name]
    return cls(num_particles=k) if "num_particles" in cls.__dataclass_fields__ else cls()


# ---------------------------------------------------------------- the exact posterior as a guide

class ConfigurationTable(TorchDistribution):
    """A distribution over {0,1}^d given by one logit per configuration: can hold any posterior exactly."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_rsample = False

    def __init__(self, logits, bits, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.bits = bits
        self.weights = 2 ** torch.arange(bits - 1, -1, -1)
        super().__init__(logits.shape[:-1], torch.Size([bits]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return ConfigurationTable(self.logits.expand(*batch_shape, -1), self.bits)

    def sample(self, sample_shape=()):
        index = dist.Categorical(logits=self.logits).sample(torch.Size(sample_shape))
        return ((index.unsqueeze(-1) // self.weights) % 2).to(self.logits.dtype)

    def log_prob(self, value):
        index = (value * self.weights).sum(-1).long()
        shape = torch.broadcast_shapes(index.shape, self.batch_shape)
        logits = self.logits.expand(shape + self.logits.shape[-1:])
        return logits.gather(-1, index.expand(shape).unsqueeze(-1)).squeeze(-1)


class ExactPosterior(PyroModule):
    """q(h|x_n) = p(h|x_n) for the fixed data points x: a table of per-point logits.

    Its parameters are 8 coordinates ``shift`` of the logits along fixed random directions, zero at the
    exact posterior: every parameter moves the probability of every configuration, so a gradient is a
    sum over all of them, not the gradient of one rare configuration's logit that few draws ever hit."""

    def __init__(self, model, x, directions=8):
        super().__init__()
        log_p, _ = model.log_joint_table(x)
        self.register_buffer("exact", log_p.detach().T.clone())  # (B, M), M in the table's bit order
        self.register_buffer("directions", torch.randn(directions, log_p.shape[0],
                                                       generator=torch.Generator().manual_seed(5)))
        self.shift = torch.nn.Parameter(torch.zeros(directions))

    def forward(self, x):
        table = (self.exact + self.shift @ self.directions).repeat(x.shape[0] // self.exact.shape[0], 1)
        with pyro.plate("data", x.shape[0], dim=-1):  # x may be the fixed points repeated
            pyro.sample("h", ConfigurationTable(table, H_DIM))


def test_exact_posterior_guide_holds_the_posterior(problem):
    model, _, x = problem
    guide = ExactPosterior(model, x)
    log_p, values = model.log_joint_table(x)
    lq = log_q_table(guide, x, values)
    assert torch.allclose(lq, log_p - log_p.logsumexp(0), atol=1e-10)


LOG_WEIGHT_BASED = sorted(n for n, c in ESTIMATORS.items() if c.value_from_log_weights)


@pytest.mark.parametrize("name", LOG_WEIGHT_BASED)
def test_bound_equals_log_likelihood_at_the_exact_posterior_or_refuses(problem, name):
    model, mean_field, x = problem
    exact = model.exact_log_likelihood(x).sum().item()
    guide = ExactPosterior(model, x)
    if name not in TARGETS:
        with pytest.raises(UserError, match=r"'h' \(Bernoulli\) cannot be reparameterized; use vimco or rws .*"
                                            r"tracegraph .* or elbo"):
            instance(name)(model, mean_field, x)
        return
    for _ in range(3):
        bound = -instance(name)(model, guide, x).item()
        assert abs(bound - exact) < 1e-6, (name, bound, exact)
    assert -instance(name)(model, mean_field, x).item() < exact - 1.0, "the mean-field guide is visibly looser"


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_either_has_a_target_or_refuses(problem, name):
    model, guide, x = problem
    if name in TARGETS:
        assert torch.isfinite(instance(name)(model, guide, x))
        return
    with pytest.raises(UserError, match="use vimco or rws"):
        instance(name)(model, guide, x)


# ---------------------------------------------------------------- expected gradients

@pytest.fixture
def exact_grads(problem):
    model, guide, x = problem
    return exact_gradients(model, guide, x)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_expected_gradient_equals_the_exact_gradient_of_its_target(problem, exact_grads, name):
    model, guide, x = problem
    grads, n_model = exact_grads
    draws = gradient_draws(instance(name), model, guide, x)
    target = TARGETS[name]
    assert max_z(draws, grads[target]) < Z, (name, max_z(draws, grads[target]))
    # power: the same test on the same draws rejects the other bound's gradient
    other = "iwae" if target == "elbo" else "elbo"
    assert max_z(draws, grads[other]) > 3 * Z, (name, max_z(draws, grads[other]))
    if target == "rws":  # the model part is IWAE's gradient, the guide part is not the bound's at all
        assert max_z(draws[:, :n_model], grads["iwae"][:n_model]) < Z
        assert max_z(draws[:, n_model:], grads["iwae"][n_model:]) > 3 * Z


def test_rws_guide_gradient_is_zero_in_expectation_at_the_exact_posterior(problem):
    model, mean_field, x = problem
    n_model = sum(p.numel() for p in model.parameters())
    exact = ExactPosterior(model, x)
    draws = gradient_draws(RWS(K), model, exact, x, calls=100, repeat=100)[:, n_model:]
    assert draws.std(0).min() > 1e-3, "single draws are noisy; only their expectation vanishes"
    assert max_z(draws, torch.zeros(draws.shape[1])) < Z
    # power: at the mean-field guide the same test rejects zero
    poor = gradient_draws(RWS(K), model, mean_field, x, calls=100, repeat=100)[:, n_model:]
    assert max_z(poor, torch.zeros(poor.shape[1])) > 3 * Z


def test_rws_sleep_phi_mixes_in_the_dream_gradient(problem):
    """sleep_phi = 1: the guide's gradient is -sum_n d log q(h_n|x_n) on dreams from the model, whose
    expectation is -sum_{h,x} p(h, x) d log q(h|x), exact by enumerating h and x (2^18 pairs)."""
    model, guide, x = problem
    params = list(guide.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    xs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=X_DIM)))  # every x
    log_p, values = model.log_joint_table(xs)
    expected = flat_grad(-(log_p.exp().detach() * log_q_table(guide, xs, values)).sum() * len(x), params)
    draws = gradient_draws(RWS(K, sleep_phi=1.0), model, guide, x, calls=100, repeat=100)[:, n_model:]
    assert max_z(draws, expected) < Z
    wake = gradient_draws(RWS(K), model, guide, x, calls=100, repeat=100)[:, n_model:]
    assert max_z(wake, expected) > 3 * Z, "the wake-phi gradient is another one"


# ---------------------------------------------------------------- variance

ENCODER = H_DIM * X_DIM + H_DIM  # the linear encoder's weight and bias, first among the guide's


def guide_variance(draws, n_model, repeat):
    """Summed over the encoder's parameters (not a baseline network's): the variance of one draw's gradient
    on the N points."""
    return (draws[:, n_model:n_model + ENCODER].var(0) * repeat).sum().item()


class _NoBaseline(TraceGraph):
    """tracegraph without any baseline: the plain Rao-Blackwellized score function."""

    def __init__(self):
        super().__init__(average_baseline=False)


def exact_elbo_per_point(model, guide, x):
    log_p, values = model.log_joint_table(x)
    log_q = log_q_table(guide, x, values)
    return (log_q.exp() * (log_p - log_q)).sum(0).detach()


def test_baselines_reduce_tracegraph_guide_gradient_variance(problem):
    model, guide, _ = problem
    # four points whose ELBOs differ by ~14 nats (the two best and two worst of all 2^10 inputs), as MNIST
    # digits differ: one average baseline cannot centre all of them, an input-dependent one can
    every_x = torch.tensor(list(itertools.product((0.0, 1.0), repeat=X_DIM)))
    order = exact_elbo_per_point(model, guide, every_x).argsort()
    x = every_x[torch.cat([order[-2:], order[:2]])]
    n_model = sum(p.numel() for p in model.parameters())
    plain = guide_variance(gradient_draws(_NoBaseline(), model, guide, x, 100, 50), n_model, 50)
    averaged = TraceGraph()
    averaged(model, guide, x.repeat(50, 1))  # one call sets the average
    average = guide_variance(gradient_draws(averaged, model, guide, x, 100, 50), n_model, 50)
    assert average < 0.5 * plain, (average, plain)
    # NVIL: a learned baseline C(x) owned by the guide; train only it, with the model and encoder fixed
    nvil = make_guide(baseline_hidden=(16,))
    nvil.encoder.load_state_dict(guide.encoder.state_dict())
    estimator = TraceGraph()
    optim = torch.optim.Adam(nvil.baseline_h.parameters(), lr=0.05)
    with pyro.validation_enabled(False):
        for _ in range(150):
            optim.zero_grad()
            estimator(model, nvil, x.repeat(25, 1)).backward()
            optim.step()
    with torch.no_grad():  # least squares on the learning signal: average + C(x) -> E[signal | x], the ELBO of x
        baseline = nvil.baseline_h(x) + estimator._averages[nvil]["h"]
    assert (baseline - exact_elbo_per_point(model, guide, x)).abs().max() < 1.0
    learned = guide_variance(gradient_draws(estimator, model, nvil, x, 100, 50), n_model, 50)
    assert learned < 0.5 * average, (learned, average)


def _score_function_iwae(k):
    """The IWAE gradient with the plain score function: sum_k L d log q(h_k) + sum_k w~_k d log w_k."""
    def loss(model, guide, x):
        log_w, (_, guide_tr) = log_weights(model, guide, k, x)
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        log_q = guide_tr.nodes["h"]["fn"].log_prob(guide_tr.nodes["h"]["value"])
        return -(bound.sum() + (bound.detach() * log_q).sum() - (bound.detach() * log_q).sum().detach())
    return loss


@pytest.mark.parametrize("k", [2, 5])
def test_vimco_guide_gradient_variance_is_below_the_plain_score_function(problem, exact_grads, k):
    model, guide, x = problem
    n_model = sum(p.numel() for p in model.parameters())
    plain_draws = gradient_draws(_score_function_iwae(k), model, guide, x, 100, 50)
    vimco_draws = gradient_draws(VIMCO(k), model, guide, x, 100, 50)
    plain, vimco = guide_variance(plain_draws, n_model, 50), guide_variance(vimco_draws, n_model, 50)
    assert vimco < 0.5 * plain, (vimco, plain)
    if k == 2:  # both are unbiased for the same gradient
        assert max_z(plain_draws, exact_grads[0]["iwae"]) < Z


# ---------------------------------------------------------------- evaluation, replay, refusals

def test_is_log_likelihood_matches_the_exact_one(problem):
    model, guide, _ = problem
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(None, batch_size=60)
    data = ArrayDataset(trace.nodes["x"]["value"].numpy(), binarize="none")  # float32, as datasets hold
    exact = model.exact_log_likelihood(data.data.double())
    result = evaluate(model.float(), guide.float(), data, num_samples=2000, quiet=True)
    s = result.summary()
    assert abs(s["log_likelihood"] - exact.mean().item()) < 2 * s["log_likelihood_se"]
    is_error = (torch.as_tensor(result.log_likelihood, dtype=torch.float64) - exact).abs().mean()
    elbo_gap = (exact - torch.as_tensor(result.elbo, dtype=torch.float64)).mean()
    assert elbo_gap > 1.0 and is_error < 0.1 * elbo_gap, (is_error, elbo_gap)


def losses_and_grads(estimator, model, guide, xs):
    params = [*model.parameters(), *guide.parameters()]
    torch.manual_seed(7)
    return [(loss.detach(), flat_grad(loss, params)) for loss in (estimator(model, guide, x) for x in xs)]


@pytest.mark.parametrize("estimator", [VIMCO(3), RWS(3), RWS(3, sleep_phi=0.5), TraceGraph()], ids=repr)
def test_replayed_steps_are_bit_identical_to_eager(problem, estimator):
    model, _, _ = problem
    # NVIL's baseline networks for tracegraph, which trains them; the others would ignore them (and say so)
    guide = make_guide(hidden=(16,), baseline_hidden=(8,) if isinstance(estimator, TraceGraph) else None)
    xs = [(torch.rand(20, X_DIM, generator=torch.Generator().manual_seed(s)) < 0.4).double() for s in range(4)]
    pyro.enable_validation(False)
    eager = losses_and_grads(dataclasses.replace(estimator), model, guide, xs)  # a fresh copy: its own state
    unsafe = getattr(estimator, "replay_unsafe", None)
    with pytest.warns(ReplayWarning, match="eagerly") if unsafe else warnings.catch_warnings():
        if not unsafe:
            warnings.simplefilter("error", ReplayWarning)  # a replay-safe estimator must not fall back
        replayed = Replayed(estimator)
        fast = losses_and_grads(replayed, model, guide, xs)
    if unsafe:
        assert estimator.replay_unsafe in replayed.fallback_reason  # run eagerly, and said why
    else:
        assert replayed.fallback_reason is None and replayed.last_params is not None, "not replayed"
    for (le, ge), (lf, gf) in zip(eager, fast):
        assert torch.equal(le, lf) and torch.equal(ge, gf)


def test_options_and_baselines_are_validated(problem):
    model, guide, x = problem
    with pytest.raises(ValueError, match="num_particles >= 2"):
        VIMCO(1)
    with pytest.raises(ValueError, match="sleep_phi"):
        RWS(sleep_phi=1.5)
    with pytest.raises(ValueError, match="baseline_beta"):
        TraceGraph(baseline_beta=1.0)

    def guide_with(options):
        def g(x):
            logits = guide.encoder(x)
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("h", dist.Bernoulli(logits=logits).to_event(1), infer={"baseline": options})
        return g

    with pytest.raises(UserError, match=r"site 'h': unknown baseline option\(s\) beta"):
        TraceGraph()(model, guide_with({"beta": 0.9}), x)
    with pytest.raises(UserError, match=r"baseline of site 'h' has shape \(3,\)"):
        TraceGraph()(model, guide_with({"baseline_value": torch.zeros(3)}), x)
    # a user's baseline_value that broadcasts is honoured: b = 0 leaves the plain score function
    torch.manual_seed(1)
    a = flat_grad(TraceGraph()(model, guide_with({"baseline_value": torch.zeros(())}), x), list(guide.parameters()))
    torch.manual_seed(1)
    b = flat_grad(_NoBaseline()(model, guide, x), list(guide.parameters()))
    assert torch.allclose(a, b, atol=1e-12)


# ---------------------------------------------------------------- a user's own program: a drawn mixture component

class Mixture(torch.nn.Module):
    """c ~ Categorical(pi), z | c ~ N(mu_c, I), x | z ~ N(z, s^2 I), written as a user would: c is drawn, not
    enumerated. Exact: p(x | c) = N(mu_c, (1 + s^2) I), p(z | x, c) = N((s^2 mu_c + x) / (1 + s^2), s^2 / (1 + s^2))."""

    def __init__(self, classes=3, dim=2, s=0.7):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(classes))
        self.mu = torch.nn.Parameter(2 * torch.randn(classes, dim))
        self.s = s

    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=self.logits))
            z = pyro.sample("z", dist.Normal(self.mu[c], 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, self.s).to_event(1), obs=x)

    def exact_log_likelihood(self, x):
        v = 1 + self.s ** 2
        per_class = dist.Normal(self.mu, v ** 0.5).to_event(1).log_prob(x.unsqueeze(-2))
        return torch.logsumexp(per_class + self.logits.log_softmax(-1), -1)


class MixtureGuide(torch.nn.Module):
    """q(c|x) = Categorical(logits = W x + b), q(z|x, c) = N(A x + B_c, sigma_c): both can hold the exact posterior."""

    def __init__(self, classes=3, dim=2):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.zeros(classes, dim)), torch.nn.Parameter(torch.zeros(classes))
        self.a, self.loc = torch.nn.Parameter(torch.ones(())), torch.nn.Parameter(torch.zeros(classes, dim))
        self.log_scale = torch.nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=x @ self.w.T + self.b))
            scale = self.log_scale.exp()[c].unsqueeze(-1)
            pyro.sample("z", dist.Normal(self.a * x + self.loc[c], scale).to_event(1))

    @torch.no_grad()
    def set_exact(self, model):
        v = 1 + model.s ** 2
        self.w.copy_(model.mu / v)
        self.b.copy_(model.logits.log_softmax(-1) - (model.mu ** 2).sum(-1) / (2 * v))
        self.a.fill_(1 / v)
        self.loc.copy_(model.s ** 2 * model.mu / v)
        self.log_scale.fill_(0.5 * math.log(model.s ** 2 / v))
        return self


@pytest.fixture
def mixture():
    torch.manual_seed(4)
    model = Mixture()
    with torch.no_grad():
        c = dist.Categorical(logits=model.logits).sample((30,))
        x = model.mu[c] + (1 + model.s ** 2) ** 0.5 * torch.randn(30, 2)
    return model, x


@pytest.mark.parametrize("name", sorted(n for n in TARGETS if ESTIMATORS[n].value_from_log_weights))
def test_a_drawn_mixture_component_at_the_exact_posterior_gives_log_likelihood(mixture, name):
    model, x = mixture
    guide = MixtureGuide().set_exact(model)
    exact = model.exact_log_likelihood(x).sum().item()
    for _ in range(2):
        assert abs(-instance(name, 3)(model, guide, x).item() - exact) < 1e-6
    assert -instance(name, 3)(model, MixtureGuide(), x).item() < exact - 1.0


def test_vimco_on_a_mixed_guide_is_unbiased_for_the_iwae_gradient(mixture):
    """c is scored, z keeps its reparameterized path: VIMCO's expected gradient is the plain score-function
    IWAE gradient's (both unbiased for IWAE_3), and not the ELBO's."""
    model, x = mixture
    guide = MixtureGuide()
    with torch.no_grad():
        guide.set_exact(model).w.mul_(0.3)  # a poorer q(c|x)

    def draws(est):
        return gradient_draws(est, model, guide, x, calls=150, repeat=10)

    def plain(model, guide, x):
        log_w, (_, tr) = log_weights(model, guide, 3, x)
        bound = torch.logsumexp(log_w, 0) - math.log(3)
        score = (bound.detach() * tr.nodes["c"]["fn"].log_prob(tr.nodes["c"]["value"])).sum()
        return -(bound.sum() + score - score.detach())

    vimco, reference, elbo = draws(VIMCO(3)), draws(plain), draws(ESTIMATORS["elbo"](num_particles=3))
    diff = vimco.mean(0) - reference.mean(0)
    se = (vimco.var(0) / len(vimco) + reference.var(0) / len(reference)).sqrt()
    assert (diff.abs() / se.clamp_min(1e-12)).max() < Z
    diff = vimco.mean(0) - elbo.mean(0)
    se = (vimco.var(0) / len(vimco) + elbo.var(0) / len(elbo)).sqrt()
    assert (diff.abs() / se.clamp_min(1e-12)).max() > 3 * Z
    assert vimco.var(0).sum() < reference.var(0).sum()


def test_importance_diagnostics_work_and_gaps_refuse_in_one_line(problem):
    from pyro_vae.analysis.gaps import inference_gaps
    from pyro_vae.analysis.importance import KHAT_BAD, importance_diagnostics
    model, guide, x = problem
    exact = model.exact_log_likelihood(x).detach().numpy()
    at_posterior = importance_diagnostics(model, ExactPosterior(model, x), x, num_samples=200)
    assert np.allclose(at_posterior.log_likelihood, exact, atol=1e-9)
    assert np.allclose(at_posterior.ess, 200) and np.all(at_posterior.khat == -np.inf)  # constant weights
    assert set(np.unique(at_posterior.latents["h"])) <= {0.0, 1.0}
    poor = importance_diagnostics(model, guide, x, num_samples=2000)
    assert np.all(poor.ess < 0.5 * 2000) and np.all(poor.elbo < poor.log_likelihood)
    # this mean-field guide's weights are heavy-tailed (its IS estimates are off by up to ~0.7 nats), and
    # k-hat says so at every point
    assert np.all(np.isfinite(poor.khat)) and np.all(poor.khat > KHAT_BAD)
    with pytest.raises(UserError, match=r"latent 'h' is discrete"):
        inference_gaps(model, guide, x, steps=1)


def test_relaxed_guide_has_exact_values_and_a_biased_gradient(problem, exact_grads):
    """Straight-through draws are exact Bernoulli draws: IWAE_2's value is unbiased (its mean over calls is
    the exact IWAE_2 bound) and so is the model's gradient, while the guide's expected gradient is not the
    bound's (the stated bias, measured)."""
    from pyro_vae.estimators import IWAE
    from pyro_vae.guides import RelaxedBernoulliGuide
    model, guide, x = problem
    relaxed = RelaxedBernoulliGuide(RelaxedBernoulliGuide.Config(x_dim=X_DIM, latent_dim=H_DIM))
    relaxed.load_state_dict(guide.state_dict())
    exact_iwae = exact_objectives(model, guide, x)["iwae"].item()
    with torch.no_grad():
        values = torch.stack([-IWAE(K)(model, relaxed, x.repeat(100, 1)) / 100 for _ in range(200)])
    assert abs(values.mean().item() - exact_iwae) < Z * values.std().item() / math.sqrt(len(values))
    draws = gradient_draws(IWAE(K), model, relaxed, x)
    n_model = sum(p.numel() for p in model.parameters())
    assert max_z(draws[:, n_model:], exact_grads[0]["iwae"][n_model:]) > 3 * Z, "straight-through is biased"
    # the model's gradient only needs exact draws: it is IWAE's
    assert max_z(draws[:, :n_model], exact_grads[0]["iwae"][:n_model]) < Z


@pytest.mark.parametrize("name", ["tracegraph", "vimco", "rws"])
def test_two_layer_sbn_gradients_follow_the_dependency_structure(name):
    """h2 -> h -> x in the model, q(h|x) q(h2|h) in the guide (with NVIL baselines on both sites): h's
    learning signal in tracegraph must include the terms downstream of it through q(h2|h) and p(h|h2),
    h2's only those that depend on h2. Exact gradients enumerate (h, h2) jointly (2^8 configurations)."""
    torch.manual_seed(8)
    model = SigmoidBeliefNet(SigmoidBeliefNet.Config(x_dim=X_DIM, latent_dim=5, top_dim=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.2)
    baselines = (8,) if name == "tracegraph" else None  # the others would ignore them (and say so)
    guide = BernoulliGuide(BernoulliGuide.Config(x_dim=X_DIM, latent_dim=5, top_dim=3, baseline_hidden=baselines))
    with torch.no_grad():
        for p in [*guide.encoder.parameters(), *guide.top_encoder.parameters()]:
            p.normal_(0, 0.7)
    x = (torch.rand(N, X_DIM, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    exact, n_model = exact_gradients(model, guide, x)
    draws = gradient_draws(instance(name), model, guide, x, calls=150, repeat=40)
    n = n_model + sum(p.numel() for p in [*guide.encoder.parameters(), *guide.top_encoder.parameters()])
    target, other = TARGETS[name], "iwae" if TARGETS[name] == "elbo" else "elbo"
    assert max_z(draws[:, :n], exact[target][:n]) < Z  # model and encoders; the baseline nets have no target
    assert max_z(draws[:, :n], exact[other][:n]) > 3 * Z


def test_compare_and_diagnose_run_the_discrete_estimators(fake_dataset, capsys, tmp_path):
    """The CLI end to end: compare trains the sbn with each discrete estimator (vimco's SNR curve skips the K=1
    it refuses), diagnose reports k-hat and skips the Gaussian gaps in one line, iwae refuses before training."""
    import csv

    from pyro_vae.cli import main
    torch.set_default_dtype(torch.float32)  # as a user runs it (the fixture restores float64 afterwards)
    tiny = ["--model", "sbn", "--guide", "bernoulli", "--dataset", fake_dataset, "--latent-dim", "6", "--hidden", "16",
            "--batch-size", "50", "--epochs", "1", "--eval-samples", "20", "--eval-points", "30", "--quiet"]
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "tracegraph,vimco:k=3,rws:k=3", "--snr-repeats", "3", "--out", str(out), *tiny])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = [r for r in csv.DictReader(open(out / "compare.csv")) if r["kind"] == "estimator"]
    assert [r["estimator"] for r in rows] == ["tracegraph", "vimco-k3", "rws-k3"]
    assert all(float(r["nll"]) > 0 and -float(r["test_elbo"]) >= float(r["nll"]) - 1.0 for r in rows)
    code = main(["diagnose", str(out / "vimco-k3" / "seed0"), "--points", "10", "--samples", "100", "--gap-points", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "k-hat" in captured.out and "inference gaps: skipped" in captured.out and "'h'" in captured.out
    code = main(["train", "--estimator", "iwae", "--out", str(tmp_path / "iwae"), *tiny])
    err = capsys.readouterr().err
    assert code == 2 and "iwae needs reparameterizable guide sites, but 'h' (Bernoulli) cannot be reparameterized; " \
        "use vimco or rws" in err
    assert not (tmp_path / "iwae" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", ["vimco", "rws"])
def test_vimco_and_rws_say_once_that_they_ignore_a_baseline(problem, name):
    from pyro_vae.estimators._checks import PyroVaeWarning
    model, _, x = problem
    nvil = make_guide(baseline_hidden=(4,))
    with pytest.warns(PyroVaeWarning, match=rf"^{name} ignores the baseline asked for at guide site 'h'"):
        instance(name)(model, nvil, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instance(name)(model, nvil, x)  # once
        TraceGraph()(model, make_guide(baseline_hidden=(4,)), x)  # tracegraph uses it: no warning


def test_rws_refuses_a_point_mass_guide_whose_wake_phi_gradient_is_zero():
    from pyro_vae.guides import PointGuide
    from pyro_vae.models import Autoencoder

    model = Autoencoder(Autoencoder.Config(x_dim=X_DIM, latent_dim=2, hidden=(8,)))
    guide = PointGuide(PointGuide.Config(x_dim=X_DIM, latent_dim=2, hidden=(8,)))
    x = (torch.rand(4, X_DIM, generator=torch.Generator().manual_seed(0)) < 0.4).to(next(model.parameters()).dtype)
    with pytest.raises(UserError, match=r"rws trains the guide .* z is a point mass \(Delta\).*use iwae or elbo"):
        RWS(3)(model, guide, x)
    assert math.isfinite(VIMCO(3)(model, guide, x).item())  # the reparameterized point mass trains under vimco
