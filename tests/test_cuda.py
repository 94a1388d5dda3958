"""The CUDA path.

Two kinds of test:

- Tests of the GPU path itself, run on ``PYRO_VAE_TEST_DEVICE`` (default ``cuda``): they skip, with the
  reason, where that device is CUDA and there is none. ``PYRO_VAE_TEST_DEVICE=cpu`` runs the same tests
  on the CPU, which is what ``python3 dev.py gpu-check --dry-run`` does to check them before GPU time is
  spent.
- CPU-only tests of the CUDA bookkeeping (random streams, seeding, process groups, benchmark rows),
  against a stand-in for ``torch.cuda``'s generator functions that holds N device generators and
  raises the real functions' IndexError for a device the machine lacks. They run everywhere.
"""
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

# cuBLAS reads this when it starts; deterministic algorithms on CUDA need it (set before any CUDA use)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import SMALL_NET, prototype_images  # noqa: E402
from test_models import PAIRS, build, fits  # noqa: E402

from pyro_vae.data import ArrayDataset  # noqa: E402
from pyro_vae.errors import UserError  # noqa: E402
from pyro_vae.estimators import ESTIMATORS  # noqa: E402
from pyro_vae.training import checkpoint as checkpoint_module  # noqa: E402
from pyro_vae.training import state as state_module  # noqa: E402
from pyro_vae.training.checkpoint import LATEST, load_checkpoint  # noqa: E402
from pyro_vae.training.config import TrainConfig  # noqa: E402
from pyro_vae.training.fit import TIMING, fit  # noqa: E402
from pyro_vae.training.replay import Replayed  # noqa: E402
from pyro_vae.training.run_dir import RunDir  # noqa: E402

DEVICE = torch.device(os.environ.get("PYRO_VAE_TEST_DEVICE", "cuda"))
on_device = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA device (PYRO_VAE_TEST_DEVICE=cpu runs these tests on the CPU)")


def on(device: torch.device, *modules) -> bool:
    return all(t.device.type == device.type for m in modules for t in (*m.parameters(), *m.buffers()))


TIME_LIMIT = "past the time limit that gpu-check gave the tests"


@pytest.fixture(autouse=True)
def _within_the_time_limit():
    """Under ``gpu-check``, tests that would start after its limit (PYRO_VAE_TEST_DEADLINE, a Unix time) are
    skipped, so the report is written and counts what ran."""
    deadline = os.environ.get("PYRO_VAE_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(TIME_LIMIT)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test: an op without a deterministic kernel raises,
    naming itself, instead of silently making two runs differ."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def pair_data():
    images, labels = prototype_images(90, side=8)
    binary = (images > 127).astype("float32")  # fixed binary data: in the support of every likelihood
    return (ArrayDataset(binary[:60], labels[:60], binarize="none", image_shape=(8, 8)),
            ArrayDataset(binary[60:], labels[60:], binarize="none", image_shape=(8, 8)))


# ---------------------------------------------------------------------------------------------------
# The GPU path: every registered program, the CLI, replay and resume, on DEVICE
# ---------------------------------------------------------------------------------------------------

CLI_RUNS = {"vae": [], "cvae": ["--model", "cvae", "--guide", "conditional"]}


@on_device
@pytest.mark.parametrize("name", sorted(CLI_RUNS))
def test_train_evaluate_diagnose_and_sample_on_the_device(name, fake_dataset, capsys, tmp_path):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    common = ["--device", str(DEVICE), "--quiet"]
    steps = [
        ["train", "--dataset", fake_dataset, "--latent-dim", "3", "--hidden", "16", "--batch-size", "100",
         "--epochs", "1", "--eval-samples", "20", "--eval-points", "40", "--out", run, *CLI_RUNS[name], *common],
        ["evaluate", run, "--samples", "20", "--points", "30", *common],
        ["diagnose", run, "--points", "8", "--samples", "100", "--gap-points", "4", "--gap-steps", "5", *common],
        ["sample", run, "--num", "16", "--out", tmp_path / "s.png", "--device", str(DEVICE)],
    ]
    for argv in steps:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, f"{argv[0]}: {err}"
    # the labelled test set makes latents_2d colour by label: the plot that ended every CUDA run before
    for path in ("plots/latents_2d.png", "plots/prior_samples.png", "diagnostics/plots/latents_2d.png",
                 "diagnostics/summary.json", "evaluation.json"):
        assert (run / path).stat().st_size > 100, path
    assert (tmp_path / "s.png").stat().st_size > 1000
    versions = json.loads((run / "config.json").read_text())["versions"]
    assert versions["device"].startswith(DEVICE.type)
    assert ("gpu" in versions) == (DEVICE.type == "cuda")


REPLAY_CASES = [("elbo", {}), ("analytic-kl", {}), ("iwae", {"num_particles": 3}), ("dreg", {"num_particles": 3}),
                ("stl", {}), ("renyi", {})]


def _vae(device):
    from pyro_vae.guides import DiagonalNormalGuide
    from pyro_vae.models import BernoulliVAE

    cfg = dict(x_dim=64, latent_dim=4, hidden=(32,))
    torch.manual_seed(0)
    return (BernoulliVAE(BernoulliVAE.Config(**cfg)).to(device),
            DiagonalNormalGuide(DiagonalNormalGuide.Config(**cfg)).to(device))


def _losses_and_grads(loss_fn, model, guide, xs):
    params = [*model.parameters(), *guide.parameters()]
    torch.manual_seed(7)  # seeds the CPU and every CUDA generator alike, for both paths
    out = []
    for x in xs:
        loss = loss_fn(model, guide, x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append((loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]))
    return out


@on_device
@pytest.mark.parametrize("name,opts", REPLAY_CASES, ids=[c[0] for c in REPLAY_CASES])
def test_replayed_loss_and_gradients_equal_eager_on_the_device(name, opts, deterministic):
    model, guide = _vae(DEVICE)
    gen = torch.Generator().manual_seed(1)
    xs = [(torch.rand(20, 64, generator=gen) < 0.3).float().to(DEVICE) for _ in range(4)]
    with pyro.validation_enabled(False):
        eager = _losses_and_grads(ESTIMATORS[name](**opts), model, guide, xs)
        replayed = Replayed(ESTIMATORS[name](**opts))
        fast = _losses_and_grads(replayed, model, guide, xs)
    assert replayed.fallback_reason is None, replayed.fallback_reason
    for i, ((le, ge), (lf, gf)) in enumerate(zip(eager, fast)):
        assert le.device.type == DEVICE.type
        assert torch.equal(le, lf), (i, le, lf)
        assert all(torch.equal(a, b) for a, b in zip(ge, gf)), f"call {i}: gradients differ"


@on_device
def test_fixed_seed_training_on_the_device_matches_the_eager_path(small_data, deterministic):
    train, test = small_data
    results = {}
    for replay in (False, True):
        torch.manual_seed(0)
        model, guide = build("vae", "diagonal-normal")
        hist = fit(model, guide, ESTIMATORS["elbo"](), train, test,
                   TrainConfig(epochs=2, batch_size=70, lr=3e-3, replay=replay, device=str(DEVICE)), quiet=True)
        results[replay] = (hist.rows, {**model.state_dict(), **guide.state_dict()})
    (eager_rows, eager_state), (fast_rows, fast_state) = results[False], results[True]
    # the eager path steps pyro.optim.Adam and the fast path SharedAdam: the same updates to float rounding
    for a, b in zip(eager_rows, fast_rows):
        assert a["train_elbo"] == pytest.approx(b["train_elbo"], rel=1e-6, abs=1e-6)
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-6, abs=1e-6)
    for k, v in eager_state.items():
        assert torch.allclose(v, fast_state[k], rtol=1e-5, atol=1e-6), k


class _Killed(Exception):
    pass


@on_device
def test_a_run_killed_mid_epoch_on_the_device_resumes_to_the_same_parameters(small_data, tmp_path, monkeypatch,
                                                                            deterministic):
    train, test = small_data
    cfg = TrainConfig(epochs=2, batch_size=50, lr=3e-3, checkpoint_every=4, device=str(DEVICE))

    def run(path, resume=False):
        torch.manual_seed(0)
        model, guide = build("vae", "diagonal-normal")
        run_dir = RunDir(path) if resume else RunDir(path).create(fresh=True)
        hist = fit(model, guide, ESTIMATORS["elbo"](), train, test, cfg, run_dir=run_dir, resume=resume, quiet=True)
        return hist

    full = run(tmp_path / "full")
    real_save = checkpoint_module.save_checkpoint

    def save_then_die(run_dir, payload):  # the process dies right after its second mid-epoch checkpoint
        path = real_save(run_dir, payload)
        if payload["batch"] and payload["step"] == 8:
            raise _Killed
        return path

    monkeypatch.setattr(state_module, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run(tmp_path / "killed")
    monkeypatch.setattr(state_module, "save_checkpoint", real_save)
    killed = load_checkpoint(tmp_path / "killed" / LATEST)
    assert (killed["epoch"], killed["step"], killed["batch"]) == (1, 8, 8)
    if DEVICE.type == "cuda":
        assert "cuda_device" in killed["rng"], "a CUDA run saves its device's random stream"
    torch.manual_seed(123)  # the global streams here must not matter: resume restores them
    resumed = run(tmp_path / "killed", resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(resumed.rows) == strip(full.rows)
    a, b = load_checkpoint(tmp_path / "full" / LATEST), load_checkpoint(tmp_path / "killed" / LATEST)
    for part in ("model", "guide"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@on_device
def test_generation_metrics_on_the_device_leave_the_callers_streams_alone(pair_data):
    from pyro_vae.analysis.generation import generation_report

    train, test = pair_data
    torch.manual_seed(0)
    model, guide = build("vae", "diagonal-normal")
    model.to(DEVICE), guide.to(DEVICE)
    before = torch.get_rng_state(), (torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None)
    report = generation_report(model, guide, train, test, num_samples=50, device=DEVICE).summary()
    after = torch.get_rng_state(), (torch.cuda.get_rng_state(DEVICE) if DEVICE.type == "cuda" else None)
    assert torch.equal(before[0], after[0])
    if DEVICE.type == "cuda":
        assert torch.equal(before[1], after[1]), "the device's CUDA generator was reseeded and not restored"
    assert math.isfinite(report["prior_log_likelihood"]) and math.isfinite(report["fitted_log_likelihood"])


@on_device
def test_linear_gaussian_draws_data_on_the_device():
    from pyro_vae.models import LinearGaussian

    model = LinearGaussian().to(DEVICE)
    x = model.sample_data(7)
    assert x.shape == (7, 10) and x.device.type == DEVICE.type


# ---------------------------------------------------------------------------------------------------
# CPU-only: the CUDA bookkeeping, against a stand-in for torch.cuda's generators
# ---------------------------------------------------------------------------------------------------


class FakeCuda:
    """``n`` CUDA generators on a machine without a GPU, behind torch.cuda's own RNG functions.

    Each generator's state is a 16-byte tensor (as a real CUDA generator's is); asking for a device the
    machine lacks raises IndexError, as torch.cuda's functions do."""

    def __init__(self, monkeypatch, n: int):
        self.states = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(n)]
        patches = {
            "is_available": lambda: True, "device_count": lambda: n, "current_device": lambda: 0,
            "get_rng_state": self.get, "set_rng_state": self.set,
            "get_rng_state_all": lambda: [self.get(i) for i in range(n)],
            "set_rng_state_all": lambda states: [self.set(s, i) for i, s in enumerate(states)],
            "manual_seed": lambda seed: self.seed(seed, 0),
            "manual_seed_all": lambda seed: [self.seed(seed, i) for i in range(n)],
            "default_generators": tuple(_FakeGenerator(self, i) for i in range(n)),
        }
        for name, value in patches.items():
            monkeypatch.setattr(torch.cuda, name, value)
        # torch's own code (the optimizers' graph-capture check) asks for the accelerator: still none
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)

    @staticmethod
    def _index(device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return 0 if device.index is None else device.index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        index = self._index(device)
        self.states[index]  # IndexError for a device this machine lacks, as in torch.cuda.set_rng_state
        self.states[index] = state.clone()

    def seed(self, seed: int, index: int) -> None:
        self.states[index] = torch.full((16,), seed % 256, dtype=torch.uint8)

    def snapshot(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]


class _FakeGenerator:
    def __init__(self, cuda: FakeCuda, index: int):
        self.cuda, self.index = cuda, index

    def manual_seed(self, seed):
        self.cuda.seed(seed, self.index)
        return self

    def get_state(self):
        return self.cuda.get(self.index)

    def set_state(self, state):
        self.cuda.set(state, self.index)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_cpu_run_saves_no_cuda_state_and_resumes_on_a_machine_with_fewer_gpus(small_data, tmp_path, monkeypatch):
    """Written on a machine with 4 GPUs (training on its CPU), resumed on one with 1: the checkpoint holds no
    CUDA stream, so the resume cannot index a device that is not there, and it ends where an uninterrupted
    run ends."""
    train, test = small_data
    cfg = TrainConfig(epochs=2, batch_size=100, device="cpu")

    def run(path, epochs, resume=False):
        torch.manual_seed(0)
        model, guide = build("vae", "diagonal-normal", x_dim=64)
        run_dir = RunDir(path) if resume else RunDir(path).create(fresh=True)
        fit(model, guide, ESTIMATORS["elbo"](), train, test, dataclasses.replace(cfg, epochs=epochs),
            run_dir=run_dir, resume=resume, quiet=True)

    with monkeypatch.context() as m:
        FakeCuda(m, 4)
        run(tmp_path / "part", 1)
    saved = load_checkpoint(tmp_path / "part" / LATEST)["rng"]
    with monkeypatch.context() as m:
        FakeCuda(m, 1)
        run(tmp_path / "part", 2, resume=True)  # restoring 4 device streams here raised IndexError
    assert not {"cuda", "cuda_device"} & set(saved), sorted(saved)
    run(tmp_path / "full", 2)
    a, b = load_checkpoint(tmp_path / "full" / LATEST), load_checkpoint(tmp_path / "part" / LATEST)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_cuda_run_saves_only_its_device_and_restores_it_on_the_resuming_device(monkeypatch):
    from pyro_vae.training.rng import rng_state, set_rng_state

    two = FakeCuda(monkeypatch, 2)
    state = rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda_device"], two.states[1]) and "cuda" not in state
    monkeypatch.undo()
    one = FakeCuda(monkeypatch, 1)
    set_rng_state(state, torch.device("cuda", 0))  # the run's stream follows the run to its new device
    assert torch.equal(one.states[0], two.states[1])
    with pytest.raises(IndexError):  # the stand-in refuses a missing device as torch.cuda does
        one.set(state["cuda_device"], 1)


def test_an_older_checkpoint_with_more_gpus_than_this_machine_restores(monkeypatch, capsys):
    from pyro_vae.training.rng import rng_state, set_rng_state

    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    state = {**rng_state(), "cuda": eight}  # the older format: every device of an 8-GPU machine
    one = FakeCuda(monkeypatch, 1)
    set_rng_state(state, "cpu")  # a CPU run uses no CUDA stream: nothing to restore, nothing to fail
    assert torch.equal(one.states[0], torch.full((16,), 100, dtype=torch.uint8))
    set_rng_state(state, "cuda:0")
    assert torch.equal(one.states[0], eight[0])
    assert capsys.readouterr().err == ""


def test_a_cuda_resume_from_a_state_without_cuda_says_so(monkeypatch, capsys):
    from pyro_vae.training.rng import rng_state, set_rng_state

    state = rng_state("cpu")
    one = FakeCuda(monkeypatch, 1)
    before = one.snapshot()
    set_rng_state(state, "cuda")
    err = capsys.readouterr().err
    assert "no saved CUDA random state for cuda" in err and "differ" in err, err
    assert _same(one.snapshot(), before)


def test_seeded_blocks_touch_only_the_generators_they_put_back(monkeypatch):
    from pyro_vae.training.rng import seeded

    two = FakeCuda(monkeypatch, 2)
    before, cpu = two.snapshot(), torch.get_rng_state()
    with seeded(5, "cuda:1"):
        assert torch.equal(two.states[1], torch.full((16,), 5, dtype=torch.uint8))
        assert torch.equal(two.states[0], before[0])
        inside = torch.rand(3)
    assert _same(two.snapshot(), before) and torch.equal(torch.get_rng_state(), cpu)
    with seeded(5):
        assert torch.equal(torch.rand(3), inside)  # the same CPU draws from the same seed
        assert _same(two.snapshot(), before)


def test_building_scoring_and_plotting_never_reseed_a_cuda_generator(pair_data, monkeypatch, tmp_path):
    """The functions that seed their own draws (building a run's networks, the generation metrics, the
    prior-sample grid) must put back every generator they seed: with 2 (stand-in) GPUs and a CPU run, no
    CUDA generator may change and the CPU stream must be where it was."""
    from pyro_vae.analysis.generation import codes, generation_report, prior_latents
    from pyro_vae.cli.experiment import build as build_run
    from pyro_vae.cli.runs import RunSpec
    from pyro_vae.plots.latent import prior_draws
    from pyro_vae.plots.run import prior_samples

    train, test = pair_data
    torch.manual_seed(0)
    model, guide = build("vae", "diagonal-normal")
    two = FakeCuda(monkeypatch, 2)
    calls = {
        "build": lambda: build_run(RunSpec(network=dict(SMALL_NET)), 64),
        "codes": lambda: codes(model, guide, train, device="cpu"),
        "prior_latents": lambda: prior_latents(model, 10, ["z"]),
        "generation_report": lambda: generation_report(model, guide, train, test, num_samples=20),
        "prior_samples": lambda: prior_samples(model, test, tmp_path / "p.png", n=8),
        "prior_draws": lambda: prior_draws(model, n=10),
    }
    for name, call in calls.items():
        before, cpu = two.snapshot(), torch.get_rng_state()
        call()
        assert _same(two.snapshot(), before), f"{name} reseeded a CUDA generator and left it so"
        assert torch.equal(torch.get_rng_state(), cpu), f"{name} moved the caller's CPU stream"


def test_linear_gaussian_draws_its_data_where_its_parameters_are():
    """On the meta device (shapes without storage, no GPU needed) a draw made without a device would be a
    CPU tensor and the product with the weights would fail, as it does on CUDA."""
    from pyro_vae.models import LinearGaussian

    x = LinearGaussian().to("meta").sample_data(5)
    assert x.device.type == "meta" and x.shape == (5, 10)
    torch.manual_seed(3)
    cpu = LinearGaussian()
    torch.manual_seed(4)
    a = cpu.sample_data(4)
    torch.manual_seed(4)
    z, noise = torch.randn(4, 3), torch.randn(4, 10)  # the draws in the order the docstring's model makes them
    assert torch.equal(a, (z @ cpu.weight.T + cpu.bias + (0.5 * cpu.log_psi).exp() * noise).detach())


def test_the_process_group_is_bound_to_each_ranks_gpu(monkeypatch):
    from pyro_vae.training import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **kw: seen.update(args=a, **kw))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.update(current=d))
    distributed.start(distributed.World(rank=3, size=4, local_rank=1), "cuda")
    assert seen["args"] == ("nccl",) and seen["device_id"] == torch.device("cuda", 1) and seen["current"] == 1
    seen.clear()
    distributed.start(distributed.World(rank=1, size=2, local_rank=1), "cpu")
    assert seen["args"] == ("gloo",) and "device_id" not in seen


def test_batches_for_the_cpu_are_unchanged_by_the_pinned_copy_path():
    """The CUDA path copies from pinned memory; the CPU path must serve exactly the draws it always did."""
    images, labels = prototype_images(30, side=4)
    data = ArrayDataset(images, labels)
    got = list(data.batches(8, shuffle=True, generator=torch.Generator().manual_seed(2), device="cpu"))
    gen = torch.Generator().manual_seed(2)
    order = torch.randperm(30, generator=gen)
    for i, (x, y) in enumerate(got):
        idx = order[8 * i: 8 * i + 8]
        assert torch.equal(x, torch.bernoulli(data.data[idx], generator=gen)) and torch.equal(y, data.labels[idx])


def test_cuda_benchmark_memory_is_the_cuda_allocators_peak_not_host_rss():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import performance
    finally:
        sys.path.pop(0)
    row = {"k": 10, "points": 5, "seconds": 1.0, "log_likelihood": -1.0}
    cuda_rows = [{**row, "evaluator": kind, "rss_growth_mb": 3.0, "cuda_peak_mb": peak}
                 for kind, peak in (("plain", 250.0), ("project", 260.0))]
    cpu_rows = [{**row, "evaluator": kind, "rss_growth_mb": rss} for kind, rss in (("plain", 30.0), ("project", 40.0))]
    (cuda,), (cpu,) = performance.summarize_eval(cuda_rows), performance.summarize_eval(cpu_rows)
    assert (cuda["memory"], cuda["plain_mem_mb"], cuda["project_mem_mb"]) == ("cuda_peak_mb", 250.0, 260.0)
    assert (cpu["memory"], cpu["plain_mem_mb"], cpu["project_mem_mb"]) == ("rss_growth_mb", 30.0, 40.0)
    md = performance.markdown([], [cuda], torch.device("cpu"), "cmd", 1.0)
    assert "cuda_peak_mb" in md and "max_memory_allocated" in md


# Last, as the longest: every registered program, so a time limit cuts it and not the others
TRIPLES = [(m, g, e) for m, g in PAIRS if fits(m, g) for e in sorted(ESTIMATORS)]


def _train(model_name, guide_name, estimator, data, device):
    torch.manual_seed(0)
    model, guide = build(model_name, guide_name)
    try:
        # 60 points in batches of 20: the first step eager, the second recorded, the third replayed
        hist = fit(model, guide, ESTIMATORS[estimator](), data, None,
                   TrainConfig(epochs=1, batch_size=20, lr=1e-3, device=str(device)), quiet=True)
    except UserError as e:
        return model, guide, None, str(e)
    return model, guide, hist, None


@on_device
@pytest.mark.parametrize("model_name,guide_name,estimator", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_every_model_guide_and_estimator_trains_on_the_device(model_name, guide_name, estimator, pair_data):
    model, guide, hist, refused = _train(model_name, guide_name, estimator, pair_data[0], DEVICE)
    if refused is not None:  # a refusal must be the estimator's, the same on the CPU, never the device's
        assert _train(model_name, guide_name, estimator, pair_data[0], torch.device("cpu"))[3] == refused
        return
    assert math.isfinite(hist.rows[-1]["train_elbo"]), hist.rows
    assert on(DEVICE, model, guide), "a parameter or buffer is not on the training device"
