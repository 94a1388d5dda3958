"""The fast path is never silently wrong: for programs a user writes, the default path equals eager SVI
bit for bit, or warns once (naming the reason) and equals it from the first step.

Each case is a small Pyro program written the way a user would, outside the zoo, trained by ``fit`` (or
by the user's own loop over ``pyro.infer.SVI``) once eagerly and once on the default path.
"""
import json
import random
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.optim
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.utils.prune
from conftest import prototype_images
from pyro.infer import SVI
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from pyro_vae.data import ArrayDataset
from pyro_vae.data.semi_supervised import PartiallyLabeled
from pyro_vae.estimators import ESTIMATORS, EnumELBO
from pyro_vae.guides import DiagonalNormalGuide, M2Guide
from pyro_vae.models import M2, BernoulliVAE
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import TIMING, fit
from pyro_vae.training.replay import Replayed
from pyro_vae.training.run_dir import RunDir

Z, H, D = 4, 32, 64


class UserVAE(PyroModule):
    """A user's own VAE: z ~ N(0, I), x | z ~ Bernoulli(logits = decoder(z) * sharpness())."""

    def __init__(self, decoder: nn.Module | None = None):
        super().__init__()
        self.decoder = decoder or nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, D))

    def logits(self, z, x):
        return self.decoder(z)

    def forward(self, x=None, *, batch_size=None, **kwargs):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.logits(z, x, **kwargs)).to_event(1), obs=x)


class UserGuide(PyroModule):
    def __init__(self, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder or nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 2 * Z))

    def forward(self, x, **kwargs):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


# ---- case 1: attributes that change between steps, side effects in forward --------------------------
class Tempered(UserVAE):
    """A temperature set by the trainer's set_step (a float attribute, changed twice)."""

    temperature = 1.0

    def set_step(self, step):
        self.temperature = 1.0 if step < 6 else (0.7 if step < 12 else 0.5)

    def logits(self, z, x):
        return self.decoder(z) / self.temperature


class TensorScaled(UserVAE):
    """A tensor attribute reassigned (not filled in place) every step."""

    prior_scale = torch.tensor(1.0)

    def set_step(self, step):
        self.prior_scale = torch.tensor(1.0 if step < 10 else 0.5)

    def forward(self, x=None, *, batch_size=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), self.prior_scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Counting(UserVAE):
    """A side effect in forward: a call counter that changes the computation."""

    calls = 0

    def logits(self, z, x):
        self.calls += 1
        return self.decoder(z) * (1.0 if self.calls % 2 else 0.9)


# ---- case 2: NumPy / Python randomness inside forward ----------------------------------------------
class NumpyJitter(UserVAE):
    def logits(self, z, x):
        return self.decoder(z) * float(np.random.uniform(0.9, 1.1))


class PythonJitter(UserVAE):
    def logits(self, z, x):
        return self.decoder(z) * random.uniform(0.9, 1.1)


# ---- case 8: a custom autograd.Function (straight-through rounding) --------------------------------
class RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Quantized(UserVAE):
    def logits(self, z, x):
        return self.decoder(RoundStraightThrough.apply(z * 2.0) / 2.0)


# ---- case 11: a size read from the data -------------------------------------------------------------
class ObservedOnly(UserVAE):
    """Pixels marked -1 are missing; the likelihood is rescaled by the count of observed ones."""

    def forward(self, x=None, *, batch_size=None):
        seen = x >= 0
        n_seen = x[seen].shape[0]  # a size that depends on the data, no .item()
        with pyro.plate("data", x.shape[0], dim=-1), poutine.scale(scale=x.numel() / n_seen):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).mask(seen).to_event(1), obs=x.clamp(min=0))


def dropout_pair():
    return (UserVAE(nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Dropout(0.3), nn.Linear(H, D))), UserGuide())


def batchnorm_pair():
    return UserVAE(), UserGuide(nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.Tanh(), nn.Linear(H, 2 * Z)))


def frozen_guide_pair():
    model, guide = UserVAE(), UserGuide()
    guide.encoder[0].requires_grad_(False)
    return model, guide


def after_epoch_1(action):
    """An on_epoch callback that changes the programs once, after the first epoch."""
    def callback(model, guide):
        def on_epoch(row):
            if row["epoch"] == 1:
                action(model, guide)
        return on_epoch
    return callback


def assign_state(model, guide):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def new_decoder(model, guide):
    torch.manual_seed(5)
    model.decoder = nn.Sequential(nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, D))


def prune_decoder(model, guide):
    torch.nn.utils.prune.l1_unstructured(model.decoder[0], "weight", amount=0.5)


STALE_PARAMETER = r"parameter 'decoder\$\$\$0\.weight' is not a parameter of the model or guide module"

# case id -> (programs, on_epoch callback, expected warning: None = replays without one)
CASES = {
    "1 set_step temperature": (lambda: (Tempered(), UserGuide()), None, None),
    "1 tensor attribute reassigned": (lambda: (TensorScaled(), UserGuide()), None, None),
    "1 counter in forward": (lambda: (Counting(), UserGuide()), None, r"attribute calls"),
    "2 numpy.random": (lambda: (NumpyJitter(), UserGuide()), None, r"numpy\.random"),
    "2 random": (lambda: (PythonJitter(), UserGuide()), None, r"Python's random module"),
    "3 submodule eval()": (dropout_pair, after_epoch_1(lambda m, g: m.decoder.eval()), None),
    "4 requires_grad_(False)": (lambda: (UserVAE(), UserGuide()),
                                after_epoch_1(lambda m, g: g.encoder.requires_grad_(False)), None),
    "4 unfreeze": (frozen_guide_pair, after_epoch_1(lambda m, g: g.encoder.requires_grad_(True)), None),
    # Pyro's param store keeps the replaced tensors (eager trains those): the fast path says so
    "5 load_state_dict assign": (lambda: (UserVAE(), UserGuide()), after_epoch_1(assign_state), STALE_PARAMETER),
    "5 new submodule": (lambda: (UserVAE(), UserGuide()), after_epoch_1(new_decoder), STALE_PARAMETER),
    # pruning's forward pre-hook sets decoder.0.weight on every call: a side effect of the program
    "5 prune": (lambda: (UserVAE(), UserGuide()), after_epoch_1(prune_decoder), r"attribute weight \(of decoder\.0\)"),
    "8 autograd.Function": (lambda: (Quantized(), UserGuide()), None, r"autograd\.Function RoundStraightThrough"),
    "9 batch-norm buffers": (batchnorm_pair, None, None),
}


def binary_data(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, D, generator=g) < 0.5
    labels = torch.randint(0, 4, (n,), generator=g)
    return torch.where(protos[labels], 0.9, 0.1).bernoulli(generator=g)


def train(programs, replay, *, data=None, on_epoch=None, epochs=3, estimator=None, run_dir=None, resume=False,
          **config):
    """Fit from seed 0; returns (epoch rows without timings, every parameter and buffer, fast-path warnings)."""
    torch.manual_seed(0)
    model, guide = programs()
    data = data if data is not None else ArrayDataset(binary_data(), binarize="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = fit(model, guide, estimator or ESTIMATORS["elbo"](), data, None,
                   TrainConfig(epochs=epochs, batch_size=50, lr=1e-2, replay=replay, **config), quiet=True,
                   on_epoch=on_epoch(model, guide) if on_epoch else None, run_dir=run_dir, resume=resume)
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in hist.rows]
    state = {k: v.clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}
    return rows, state, fast_path_warnings(caught)


def fast_path_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
            and ("eager" in str(w.message) or "compile" in str(w.message))]


def assert_same(a, b):
    rows_a, state_a, _ = a
    rows_b, state_b, _ = b
    assert rows_a == rows_b
    assert state_a.keys() == state_b.keys()
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, f"these differ from eager: {different}"


def assert_warned(warned, pattern):
    if pattern is None:
        assert warned == [], warned
    else:
        assert len(warned) == 1 and re.search(pattern, warned[0]), warned


@pytest.mark.parametrize("case", list(CASES))
def test_default_path_equals_eager_or_warns_once(case):
    programs, on_epoch, pattern = CASES[case]
    eager = train(programs, replay=False, on_epoch=on_epoch)
    fast = train(programs, replay=True, on_epoch=on_epoch)
    assert eager[0][-1]["train_elbo"] > eager[0][0]["train_elbo"] - 5  # a real run, not a degenerate one
    assert_same(fast, eager)
    assert_warned(fast[2], pattern)


def test_case_10_an_out_of_support_batch_raises_as_eager_does():
    x = binary_data()
    x[400, 3] = 0.5  # not a Bernoulli value; the probe batch (the first 64 points) is fine
    data = ArrayDataset(x, binarize="none")
    errors, states = [], []
    for replay in (False, True):
        torch.manual_seed(0)
        model, guide = UserVAE(), UserGuide()
        with pytest.raises(ValueError, match="support") as caught:
            fit(model, guide, ESTIMATORS["elbo"](), data, None, TrainConfig(epochs=3, batch_size=50, replay=replay),
                quiet=True)
        errors.append(str(caught.value))
        states.append({**model.state_dict(), **guide.state_dict()})
    assert errors[0] == errors[1]
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items()), "stopped at another step"


def test_case_11_a_size_read_from_the_data_runs_eagerly():
    x = binary_data()
    x[torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.2] = -1.0  # missing pixels
    data = ArrayDataset(x, binarize="none")
    eager = train(lambda: (ObservedOnly(), UserGuide()), replay=False, data=data)
    fast = train(lambda: (ObservedOnly(), UserGuide()), replay=True, data=data)
    assert_same(fast, eager)
    assert_warned(fast[2], r"result size depends on the data")


# ---- cases 6 and 7: the user's own loop over pyro.infer.SVI, with Replayed as the loss --------------
class WithOptions(UserVAE):
    """Reads a mutable options object passed as a keyword argument."""

    def logits(self, z, x, opts=None):
        return self.decoder(z) * opts.sharpness


def user_loop(loss, steps=24, wrap=lambda step: poutine.scale(scale=1.0), kwargs=lambda step: {}):
    """A user's training loop: SVI + Pyro's Adam, each step inside ``wrap(step)``."""
    torch.manual_seed(0)
    model, guide = (WithOptions() if kwargs(0) else UserVAE()), UserGuide()
    xs = binary_data().split(50)
    losses = []
    with pyro.get_param_store().scope(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyro.set_rng_seed(0)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=loss)
        for step in range(steps):
            with wrap(step):
                losses.append(svi.step(xs[step % len(xs)], **kwargs(step)))
    return losses, {**model.state_dict(), **guide.state_dict()}, fast_path_warnings(caught)


class Options:
    """A user's mutable options object (hashable by identity, as plain classes are)."""

    sharpness = 1.0


MASKS = [torch.ones(50, dtype=torch.bool), torch.arange(50) % 3 > 0]
OPTS = Options()


def set_sharpness(step):
    OPTS.sharpness = 1.0 if step < 8 else 1.5
    return {"opts": OPTS}


LOOP_CASES = {
    "6 poutine.scale with a changing factor": dict(wrap=lambda step: poutine.scale(scale=1.0 if step < 8 else 0.25)),
    "6 poutine.mask": dict(wrap=lambda step: poutine.mask(mask=MASKS[step >= 8])),
    "7 a mutable keyword argument": dict(kwargs=set_sharpness),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_user_loops_over_svi_with_a_replayed_loss_equal_eager(case):
    eager = user_loop(ESTIMATORS["elbo"](), **LOOP_CASES[case])
    fast = user_loop(Replayed(ESTIMATORS["elbo"]()), **LOOP_CASES[case])
    assert eager[0] == fast[0]
    assert all(torch.equal(v, fast[1][k]) for k, v in eager[1].items())
    assert fast[2] == []


def test_case_6_a_handler_around_fit_changed_by_a_callback():
    handler = poutine.scale(scale=1.0)

    def on_epoch(model, guide):
        return lambda row: setattr(handler, "scale", 0.5)

    with handler:
        eager = train(lambda: (UserVAE(), UserGuide()), replay=False, on_epoch=on_epoch)
    handler.scale = 1.0
    with handler:
        fast = train(lambda: (UserVAE(), UserGuide()), replay=True, on_epoch=on_epoch)
    assert_same(fast, eager)
    assert fast[2] == []


# ---- what nothing can key: the audit ----------------------------------------------------------------
SHARPNESS = [1.0]  # a module-level global, read by forward and set by a callback: no signature holds it


class GlobalSharpness(UserVAE):
    flip_at = 10**9  # steps done before the global changes

    def set_step(self, step):
        SHARPNESS[0] = 2.0 if step >= self.flip_at else 1.0

    def logits(self, z, x):
        return self.decoder(z) * SHARPNESS[0]


def flipping(at):
    def programs():
        model = GlobalSharpness()
        model.flip_at = at
        return model, UserGuide()
    return programs


def audit_lines(run):
    path = run / "fast_path.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_global_changed_on_an_audited_step_is_caught_there_and_the_run_equals_eager(tmp_path):
    # 7 steps done: step 8 is the first to read the new value, and step 8 is audited
    eager = train(flipping(7), replay=False)
    fast = train(flipping(7), replay=True, run_dir=RunDir(tmp_path / "run").create(fresh=True))
    assert_same(fast, eager)
    assert_warned(fast[2], r"eagerly from step 8 on, because the replayed step 8 differed from eager Pyro")
    assert [e["step"] for e in audit_lines(tmp_path / "run")] == [8]


def test_a_global_changed_between_audits_is_caught_at_the_next_one_and_the_run_finishes_eagerly(tmp_path):
    eager = train(flipping(9), replay=False)
    unaudited = train(flipping(9), replay=True, audit=False)
    assert unaudited[2] == [] and unaudited[0] != eager[0]  # what the audit is for: silently different
    fast = train(flipping(9), replay=True, run_dir=RunDir(tmp_path / "run").create(fresh=True))
    assert_warned(fast[2], r"eagerly from step 16 on, because the replayed step 16 differed from eager Pyro "
                           r"\(the (loss|gradient)")
    assert [e["step"] for e in audit_lines(tmp_path / "run")] == [16]
    # steps 10-15 replayed the old value, step 16 on ran eagerly: epoch 1 (steps 1-10) differs only at step 10
    assert fast[0][0] != eager[0][0] and fast[0] == unaudited[0][:1] + fast[0][1:]


AUDITED = {
    "zoo elbo": (lambda: (BernoulliVAE(BernoulliVAE.Config(x_dim=D, latent_dim=Z, hidden=(H,))),
                          DiagonalNormalGuide(DiagonalNormalGuide.Config(x_dim=D, latent_dim=Z, hidden=(H,)))),
                 "elbo", {}),
    "dreg": (lambda: (UserVAE(), UserGuide()), "dreg", {"num_particles": 3}),
    "batch-norm buffers": (batchnorm_pair, "elbo", {}),
    "dropout draws": (dropout_pair, "iwae", {"num_particles": 2}),
}


@pytest.mark.parametrize("case", list(AUDITED))
def test_the_audit_changes_nothing_in_a_run(case):
    programs, name, opts = AUDITED[case]
    on = train(programs, replay=True, estimator=ESTIMATORS[name](**opts), epochs=2)
    off = train(programs, replay=True, estimator=ESTIMATORS[name](**opts), epochs=2, audit=False)
    eager = train(programs, replay=False, estimator=ESTIMATORS[name](**opts), epochs=2)
    assert on[2] == [] and off[2] == []
    assert_same(on, off)
    assert_same(on, eager)


class StopAtStep(UserVAE):
    """Raises (as a kill would stop the run) when it is told that ``stop_at`` steps are done."""

    stop_at = None

    def set_step(self, step):
        if step == self.stop_at:
            raise KeyboardInterrupt


class FlippingStopAtStep(GlobalSharpness):
    flip_at = 7
    stop_at = None

    def set_step(self, step):
        StopAtStep.set_step(self, step)
        super().set_step(step)


@pytest.mark.parametrize("program", ["static", "audit mismatch before the stop"])
def test_stop_and_resume_with_the_audit_is_bit_identical_to_an_uninterrupted_run(program, tmp_path):
    base = StopAtStep if program == "static" else FlippingStopAtStep

    def programs(stop_at=None):
        def make():
            model = base()
            model.stop_at = stop_at
            return model, UserGuide()
        return make

    config = dict(epochs=3, checkpoint_every=4)
    full = train(programs(), replay=True, run_dir=RunDir(tmp_path / "full").create(fresh=True), **config)
    run = RunDir(tmp_path / "part").create(fresh=True)
    with pytest.raises(KeyboardInterrupt):
        train(programs(stop_at=13), replay=True, run_dir=run, **config)  # the last checkpoint: step 12
    torch.manual_seed(123)  # resume restores every stream
    resumed = train(programs(), replay=True, run_dir=run, resume=True, **config)
    assert_same(resumed, full)
    if program == "static":
        assert resumed[2] == [] and audit_lines(run.path) == []
    else:  # switched to eager at step 8 before the stop, and it stays eager after the resume
        assert_warned(resumed[2], r"switched to eager at step 8 before the run was resumed")
        assert [e["step"] for e in audit_lines(run.path)] == [8] == [e["step"] for e in audit_lines(tmp_path / "full")]


# ---- estimators that keep Python state, and Pyro's own fallback ------------------------------------
@dataclass
class RunningBaselineELBO:
    """The ELBO with its gradient scaled by how the loss compares with a running average of past losses."""

    replay_unsafe: ClassVar[str | None] = "its baseline is a running average kept in Python between steps"
    baseline: object = 0.0

    def __call__(self, model, guide, *args, **kwargs):
        loss = ESTIMATORS["elbo"]()(model, guide, *args, **kwargs)
        centred = loss.detach() - self.baseline
        self.baseline = 0.9 * self.baseline + 0.1 * loss.detach()
        return loss + 1e-3 * centred * (loss - loss.detach())


def test_an_estimator_that_declares_replay_unsafe_runs_eagerly_and_says_why():
    eager = train(lambda: (UserVAE(), UserGuide()), replay=False, estimator=RunningBaselineELBO())
    fast = train(lambda: (UserVAE(), UserGuide()), replay=True, estimator=RunningBaselineELBO())
    assert_same(fast, eager)
    assert_warned(fast[2], r"RunningBaselineELBO declares replay_unsafe: its baseline is a running average")


def test_enum_elbo_falls_back_to_eager_once_and_equals_it():
    images, labels = prototype_images(400, classes=4)
    data = PartiallyLabeled(ArrayDataset(images, labels), 8, seed=0)

    def programs():
        net = {"x_dim": 64, "latent_dim": 3, "hidden": (16,)}
        return M2(M2.Config(**net, num_classes=4)), M2Guide(M2Guide.Config(**net, num_classes=4))

    eager = train(programs, replay=False, data=data, estimator=EnumELBO(), epochs=2)
    fast = train(programs, replay=True, data=data, estimator=EnumELBO(), epochs=2)
    assert_same(fast, eager)
    assert_warned(fast[2], r"runs EnumELBO eagerly")


# ---- the warning itself -----------------------------------------------------------------------------
def test_the_fallback_warning_is_one_whole_sentence_at_the_users_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        fit(Quantized(), UserGuide(), ESTIMATORS["elbo"](), ArrayDataset(binary_data(), binarize="none"), None,
            TrainConfig(epochs=1, batch_size=50), quiet=True)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "eager" in str(w.message)]
    assert len(ours) == 1 and ours[0].category.__name__ == "ReplayWarning"
    w = ours[0]
    assert w.filename == __file__, w.filename  # the user's call, not a library line
    text = str(w.message)
    assert text == ("pyro-vae runs ELBO eagerly from step 2 on, because it calls the torch.autograd.Function "
                    "RoundStraightThrough, whose own backward a recorded graph would drop.")


# ---- torch.compile: failures at any point fall back, and the process-wide config is left alone ------
def test_compile_leaves_inductors_global_config_alone():
    import torch._inductor.config as inductor

    before = inductor.fallback_random, torch.distributions.Distribution._validate_args
    rows, _, warned = train(lambda: (UserVAE(), UserGuide()), replay=True, compile=True, epochs=1)
    assert (inductor.fallback_random, torch.distributions.Distribution._validate_args) == before and warned == []
    assert rows[0]["train_elbo"] == pytest.approx(train(lambda: (UserVAE(), UserGuide()), replay=False,
                                                        epochs=1)[0][0]["train_elbo"], rel=1e-5)


def test_a_compile_failure_in_the_first_backward_falls_back_to_the_uncompiled_graph(monkeypatch):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def fails(gm, example_inputs):
        raise RuntimeError("no backward compiler here")

    broken = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm.forward), bw_compiler=fails)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=broken, dynamic=False))
    torch._dynamo.reset()
    fast = train(lambda: (UserVAE(), UserGuide()), replay=True, compile=True, epochs=2)
    torch._dynamo.reset()
    assert_warned(fast[2], r"torch\.compile failed on the recorded graph \(.*no backward compiler here.*\), so the "
                           r"graph is replayed uncompiled\.$")
    assert_same(fast, train(lambda: (UserVAE(), UserGuide()), replay=False, epochs=2))
