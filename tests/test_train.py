"""Training: the ELBO rises, runs are isolated, divergence stops cleanly, checkpoints round-trip."""
import json

import pyro
import pytest
import torch

from pyro_vae.errors import UserError
from pyro_vae.estimators import ELBO
from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.models import BernoulliVAE
from pyro_vae.training.checkpoint import LATEST, PREVIOUS, load_checkpoint
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.device import resolve_device
from pyro_vae.training.fit import TIMING, TrainingDiverged, fit
from pyro_vae.training.run_dir import RunDir

CFG = dict(x_dim=64, latent_dim=4, hidden=(32,))


def pair():
    return BernoulliVAE(BernoulliVAE.Config(**CFG)), DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG))


def test_short_run_raises_the_elbo_by_a_clear_margin(small_data):
    train, test = small_data
    hist = fit(*pair(), ELBO(), train, test, TrainConfig(epochs=15, batch_size=50, lr=3e-3), quiet=True)
    first, last = hist.rows[0]["test_elbo"], hist.rows[-1]["test_elbo"]
    # 64 pixels drawn from 4 prototypes at p=0.9/0.1: the best possible is about -64*H(0.1) = -20.8 nats
    assert last > first + 5, (first, last)
    assert last > -35


def test_two_runs_in_one_process_both_train(small_data):
    train, test = small_data
    cfg = TrainConfig(epochs=5, batch_size=50, lr=3e-3)
    runs = [pair(), pair()]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m, _ in runs]
    histories = [fit(m, g, ELBO(), train, test, cfg, quiet=True) for m, g in runs]
    for (m, g), init, h in zip(runs, before, histories):
        changed = [not torch.equal(init[k], v) for k, v in m.state_dict().items()]
        assert all(changed), "some model parameters never trained"
        assert h.rows[-1]["test_elbo"] > h.rows[0]["test_elbo"]
    assert len(pyro.get_param_store()) == 0, "a run leaked parameters into the global store"


def test_diverging_run_stops_and_keeps_last_good_checkpoint(small_data, tmp_path):
    train, test = small_data
    run = RunDir(tmp_path / "run").create(fresh=True)
    model, guide = pair()
    fit(model, guide, ELBO(), train, test, TrainConfig(epochs=1, batch_size=50), run_dir=run, quiet=True)
    good = load_checkpoint(run.path / LATEST)

    class NaNFromThirdStep:
        """An estimator whose loss turns NaN on its third training step, as a diverging run's does."""
        steps = 0

        def __call__(self, model, guide, *args):
            loss = ELBO()(model, guide, *args)
            if torch.is_grad_enabled():
                self.steps += 1
                if self.steps >= 3:
                    return loss * float("nan")
            return loss

    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 13"):
        # eager: the estimator keeps Python state between steps, which a replayed graph would not see
        fit(model, guide, NaNFromThirdStep(), train, test, TrainConfig(epochs=3, batch_size=50, replay=False),
            run_dir=run, resume=True, quiet=True)
    kept = load_checkpoint(run.path / LATEST)
    assert kept["epoch"] == 1
    assert all(torch.equal(good["guide"][k], v) for k, v in kept["guide"].items())
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]


def test_checkpoint_round_trip_gives_identical_outputs(small_data, tmp_path):
    train, test = small_data
    run = RunDir(tmp_path / "run").create(fresh=True)
    model, guide = pair()
    fit(model, guide, ELBO(), train, test, TrainConfig(epochs=2, batch_size=50), run_dir=run, quiet=True)
    ckpt = load_checkpoint(run.path / LATEST)
    assert (run.path / PREVIOUS).exists()
    model2, guide2 = pair()
    model2.load_state_dict(ckpt["model"])
    guide2.load_state_dict(ckpt["guide"])
    x = test.data[:10]
    assert torch.equal(guide.encoder(x), guide2.encoder(x))
    z = torch.randn(5, 4)
    assert torch.equal(model.decoder(z), model2.decoder(z))


def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(small_data, tmp_path):
    train, test = small_data
    full_dir = RunDir(tmp_path / "full").create(fresh=True)
    full = fit(*pair(), ELBO(), train, test, TrainConfig(epochs=3, batch_size=50), run_dir=full_dir, quiet=True)
    part_dir = RunDir(tmp_path / "part").create(fresh=True)
    torch.manual_seed(0)
    fit(*pair(), ELBO(), train, test, TrainConfig(epochs=1, batch_size=50), run_dir=part_dir, quiet=True)
    torch.manual_seed(123)  # the global RNG state here must not matter: resume restores it
    resumed = fit(*pair(), ELBO(), train, test, TrainConfig(epochs=3, batch_size=50), run_dir=part_dir,
                  resume=True, quiet=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(resumed.rows) == strip(full.rows)
    a, b = load_checkpoint(full_dir.path / LATEST), load_checkpoint(part_dir.path / LATEST)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_another_latent_size_is_a_clear_error(small_data, tmp_path):
    train, test = small_data
    run = RunDir(tmp_path / "run").create(fresh=True)
    fit(*pair(), ELBO(), train, test, TrainConfig(epochs=1, batch_size=50), run_dir=run, quiet=True)
    other = dict(CFG, latent_dim=6)
    with pytest.raises(UserError, match="does not fit this model/guide"):
        fit(BernoulliVAE(BernoulliVAE.Config(**other)), DiagonalNormalGuide(DiagonalNormalGuide.Config(**other)),
            ELBO(), train, test, TrainConfig(epochs=2, batch_size=50), run_dir=run, resume=True, quiet=True)


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no usable CUDA"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_raises_the_elbo(small_data):
    train, test = small_data
    model, guide = pair()
    hist = fit(model, guide, ELBO(), train, test, TrainConfig(epochs=5, batch_size=50, lr=3e-3, device="cuda"),
               quiet=True)
    assert next(model.parameters()).is_cuda
    assert hist.rows[-1]["test_elbo"] > hist.rows[0]["test_elbo"]


def test_quiet_fit_prints_nothing(small_data, capsys):
    train, test = small_data
    fit(*pair(), ELBO(), train, test, TrainConfig(epochs=2, batch_size=100), quiet=True)
    out, err = capsys.readouterr()
    assert out == "" and err == "", (out, err)
    fit(*pair(), ELBO(), train, test, TrainConfig(epochs=2, batch_size=100))
    assert capsys.readouterr().out.count("train_elbo=") == 2  # not quiet: a line per epoch
