"""The fast training path: a replayed loss and SharedAdam give the eager path's losses, gradients and updates."""
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from conftest import prototype_images
from pyro.nn import PyroModule
from test_models import PAIRS, build, fits

from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.models import BernoulliVAE
from pyro_vae.models.beta_vae import BetaVAE
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit
from pyro_vae.training.optim import SharedAdam
from pyro_vae.training.replay import Replayed, ReplayWarning

CFG = dict(x_dim=64, latent_dim=4, hidden=(32,))
ESTIMATOR_CASES = [("elbo", {}), ("analytic-kl", {}), ("iwae", {"num_particles": 3}), ("dreg", {"num_particles": 3}),
                   ("stl", {}), ("elbo", {"num_particles": 2})]


def pair(model_cls=BernoulliVAE):
    torch.manual_seed(0)
    return model_cls(model_cls.Config(**CFG)), DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG))


def batch(n=20, seed=1, p=0.3):
    return (torch.rand(n, 64, generator=torch.Generator().manual_seed(seed)) < p).float()


def losses_and_grads(loss_fn, model, guide, xs):
    """Each call's loss and the gradients of every parameter, from one seed."""
    out = []
    params = list(model.parameters()) + list(guide.parameters())
    torch.manual_seed(7)
    for x in xs:
        loss = loss_fn(model, guide, x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append((loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    return out


@pytest.mark.parametrize("name,opts", ESTIMATOR_CASES, ids=lambda v: str(v))
def test_replayed_loss_and_gradients_are_bit_identical_to_eager(name, opts):
    model, guide = pair()
    xs = [batch(seed=s) for s in range(4)]
    pyro.enable_validation(False)
    eager = losses_and_grads(ESTIMATORS[name](**opts), model, guide, xs)
    replayed = Replayed(ESTIMATORS[name](**opts))
    fast = losses_and_grads(replayed, model, guide, xs)
    assert replayed.fallback_reason is None and replayed.last_params is not None, "the last calls were not replayed"
    assert len(replayed.last_params) == len(list(model.parameters())) + len(list(guide.parameters()))
    for (le, ge), (lf, gf) in zip(eager, fast):
        assert torch.equal(le, lf), (le, lf)
        assert all(torch.equal(a, b) for a, b in zip(ge, gf))


@pytest.mark.parametrize("name,opts", [("elbo", {}), ("dreg", {"num_particles": 2})], ids=["elbo", "dreg"])
def test_fixed_seed_training_matches_the_eager_path_epoch_by_epoch(small_data, name, opts):
    train, test = small_data
    results = {}
    for replay in (False, True):
        model, guide = pair()
        # batch 70 leaves a last batch of 10: two signatures, each recorded on its second sighting
        hist = fit(model, guide, ESTIMATORS[name](**opts), train, test,
                   TrainConfig(epochs=3, batch_size=70, lr=3e-3, replay=replay), quiet=True)
        results[replay] = (hist.rows, {**model.state_dict(), **guide.state_dict()})
    (eager_rows, eager_state), (fast_rows, fast_state) = results[False], results[True]
    for a, b in zip(eager_rows, fast_rows):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6, abs=1e-6)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-6, abs=1e-6)
    assert eager_rows[-1]["train_elbo"] > eager_rows[0]["train_elbo"]  # it trained
    for k, v in eager_state.items():
        assert torch.allclose(v, fast_state[k], rtol=1e-5, atol=1e-6), k


def test_kl_warmup_changes_the_program_and_falls_back_to_eager(small_data):
    train, test = small_data
    rows = {}
    for replay in (False, True):
        torch.manual_seed(0)
        model = BetaVAE(BetaVAE.Config(**CFG, beta=2.0, kl_warmup_steps=40))
        guide = DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows[replay] = fit(model, guide, ESTIMATORS["elbo"](), train, test,
                               TrainConfig(epochs=4, batch_size=100, replay=replay), quiet=True).rows
        if replay:
            assert any("input signatures" in str(w.message) for w in caught)
    for a, b in zip(rows[False], rows[True]):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6)


class BranchyModel(BernoulliVAE):
    """Python control flow on data values: a graph recorded for one batch would be wrong for another."""

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0]
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z)
            if x.mean() > 0.3:
                logits = logits + 1.0
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class GlobalParamGuide(PyroModule):
    """A guide with a pyro.param created inside forward: not a module parameter."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        loc, _ = self.encoder(x).chunk(2, -1)
        log_scale = pyro.param("log_scale", torch.zeros(4))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_programs_that_cannot_be_replayed_run_eagerly_with_the_same_results():
    xs = [batch(seed=0, p=0.1), batch(seed=1, p=0.6), batch(seed=2, p=0.1), batch(seed=3, p=0.6)]
    model, guide = pair(BranchyModel)
    pyro.enable_validation(False)
    eager = losses_and_grads(ESTIMATORS["elbo"](), model, guide, xs)
    replayed = Replayed(ESTIMATORS["elbo"]())
    with pytest.warns(RuntimeWarning, match="could not be recorded"):
        fast = losses_and_grads(replayed, model, guide, xs)
    assert replayed.fallback_reason is not None
    for (le, ge), (lf, gf) in zip(eager, fast):
        assert torch.equal(le, lf) and all(torch.equal(a, b) for a, b in zip(ge, gf))

    model, _ = pair()
    guide = GlobalParamGuide(DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG)).encoder)
    replayed = Replayed(ESTIMATORS["elbo"]())
    with pytest.warns(RuntimeWarning, match="could not be recorded|would be frozen|not a parameter"):
        for x in xs:
            replayed(model, guide, x)
    assert replayed.fallback_reason is not None


def test_a_bare_gradient_hook_is_refused_but_scale_grad_is_kept():
    class HookedELBO:
        def __call__(self, model, guide, x):
            loss = ESTIMATORS["elbo"]()(model, guide, x)
            x2 = loss * 1.0
            x2.register_hook(lambda g: g * 3.0)
            return x2

    model, guide = pair()
    replayed = Replayed(HookedELBO())
    xs = [batch(seed=s) for s in range(3)]
    pyro.enable_validation(False)
    eager = losses_and_grads(HookedELBO(), model, guide, xs)
    with pytest.warns(RuntimeWarning, match="gradient hook"):
        fast = losses_and_grads(replayed, model, guide, xs)
    for (_, ge), (_, gf) in zip(eager, fast):
        assert all(torch.equal(a, b) for a, b in zip(ge, gf))


@pytest.mark.parametrize("clip", [None, {"clip_norm": 0.05}])
def test_shared_adam_makes_pyro_adams_updates_and_shares_its_checkpoint_format(clip):
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(3), torch.randn(2, 2)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    def run(optim, steps, start, state=None):
        with pyro.get_param_store().scope():
            params = [pyro.param(f"p{i}", v.clone()).unconstrained() for i, v in enumerate(start)]
            if state is not None:
                optim.set_state(state)
            for s in steps:
                for p, g in zip(params, grads[s]):
                    p.grad = g.clone()
                # the last parameter sits out odd steps: Pyro steps only the parameters it is given
                optim(params if s % 2 == 0 else params[:2])
            return [p.detach().clone() for p in params], optim.get_state()

    kw = {"clip_args": clip} if clip else {}
    ref, _ = run(pyro.optim.Adam({"lr": 0.1}, **kw), range(6), init)
    ours, _ = run(SharedAdam({"lr": 0.1}, **kw), range(6), init)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ref, ours))
    assert not torch.allclose(ref[0], init[0])

    # three steps with one optimizer, its state saved, three more with the other: the same end point
    for first, second in ((pyro.optim.Adam, SharedAdam), (SharedAdam, pyro.optim.Adam)):
        mid, state = run(first({"lr": 0.1}, **kw), range(3), init)
        end, _ = run(second({"lr": 0.1}, **kw), range(3, 6), mid, state)
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ref, end)), (first, second)


def test_compiled_replay_trains_like_the_eager_path_to_float_tolerance(small_data):
    train, test = small_data
    rows = {}
    for replay, compile in ((False, False), (True, True)):
        model, guide = pair()
        rows[compile] = fit(model, guide, ESTIMATORS["elbo"](), train, test,
                            TrainConfig(epochs=2, batch_size=100, lr=3e-3, replay=replay, compile=compile),
                            quiet=True).rows
    for a, b in zip(rows[False], rows[True]):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-5)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-5)


def test_compile_needs_replay():
    with pytest.raises(UserError, match="cannot be combined with --eager"):
        TrainConfig(replay=False, compile=True)


class TwoDrawsModel(BernoulliVAE):
    """Two latent draws of the same shape: the graph holds two `empty` + `normal_` of one shape."""

    def forward(self, x=None, *, batch_size=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z + 0.5 * u)).to_event(1), obs=x)


class TwoDrawsGuide(DiagonalNormalGuide):
    def forward(self, x, **kwargs):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))
            pyro.sample("u", dist.Normal(loc.detach() * 0.5, 1.0).to_event(1))


class NoGradWeightedELBO:
    """An estimator with a no_grad block whose result scales the loss: its gradient must stay out."""

    def __call__(self, model, guide, x):
        loss = ESTIMATORS["elbo"]()(model, guide, x)
        with torch.no_grad():
            weight = 1.0 + loss / (loss.abs() + 1.0)
        return loss * weight * 1.0


@pytest.mark.parametrize("case", ["two draws of one shape", "a no_grad block"])
def test_graph_trimming_keeps_same_shaped_draws_apart_and_no_grad_blocks(case):
    torch.manual_seed(0)
    model = TwoDrawsModel(BernoulliVAE.Config(**CFG)) if case == "two draws of one shape" else pair()[0]
    guide = TwoDrawsGuide(DiagonalNormalGuide.Config(**CFG)) if case == "two draws of one shape" else pair()[1]
    make = (lambda: ESTIMATORS["elbo"]()) if case == "two draws of one shape" else NoGradWeightedELBO
    xs = [batch(seed=s) for s in range(4)]
    pyro.enable_validation(False)
    eager = losses_and_grads(make(), model, guide, xs)
    replayed = Replayed(make())
    fast = losses_and_grads(replayed, model, guide, xs)
    assert replayed.fallback_reason is None and replayed.last_params is not None
    for (le, ge), (lf, gf) in zip(eager, fast):
        assert torch.equal(le, lf) and all(torch.equal(a, b) for a, b in zip(ge, gf))


@pytest.mark.parametrize("model_name,guide_name", [p for p in PAIRS if fits(*p)])
def test_every_registry_pair_replays_without_falling_back_and_equals_eager(model_name, guide_name):
    images, labels = prototype_images(200, side=8)
    data = ArrayDataset((images > 127).astype("float32"), labels, binarize="none", image_shape=(8, 8))
    results = {}
    for replay in (False, True):
        torch.manual_seed(0)
        model, guide = build(model_name, guide_name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = fit(model, guide, ESTIMATORS["elbo"](), data, None,
                       TrainConfig(epochs=1, batch_size=50, lr=1e-2, device="cpu", replay=replay), quiet=True)
        assert not [w for w in caught if w.category is ReplayWarning], [str(w.message) for w in caught]
        results[replay] = (hist.rows[0]["train_elbo"], {**model.state_dict(), **guide.state_dict()})
    assert results[True][0] == results[False][0]
    assert all(torch.equal(v, results[True][1][k]) for k, v in results[False][1].items())
