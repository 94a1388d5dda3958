"""Training budgets: fit stops within one step of a seconds budget and at exactly an evals budget, and resumes it."""
import dataclasses
import itertools
import json
import time

import pytest
import torch

from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.models import BernoulliVAE
from pyro_vae.training import budget as budget_module
from pyro_vae.training.checkpoint import LATEST, load_checkpoint
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit
from pyro_vae.training.run_dir import RunDir

CFG = dict(x_dim=64, latent_dim=4, hidden=(32,))


def pair():
    torch.manual_seed(0)
    return BernoulliVAE(BernoulliVAE.Config(**CFG)), DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG))


def with_k(name: str, k: int):
    cls = ESTIMATORS[name]
    return cls(num_particles=k) if "num_particles" in cls.__dataclass_fields__ else cls()


def test_a_seconds_budget_stops_after_the_step_that_reaches_it(small_data, monkeypatch):
    train, test = small_data  # 500 points, batch 50: 10 steps an epoch
    ticks = itertools.count()
    monkeypatch.setattr(budget_module, "clock", lambda: 0.1 * next(ticks))  # every step takes 0.1 s
    hist = fit(*pair(), with_k("iwae", 3), train, test,
               TrainConfig(epochs=100, batch_size=50, max_seconds=1.05), quiet=True)
    # 10 steps make 1.0 s < 1.05; the 11th reaches 1.1: it stops there, one step into epoch 2
    assert [r["step"] for r in hist.rows] == [10, 11]
    assert hist.rows[-1]["train_seconds"] == pytest.approx(1.1)
    assert hist.rows[-1]["evals"] == 3 * 550
    assert "test_elbo" in hist.rows[-1], "a run stopped by its budget ends like a last epoch"


def test_a_seconds_budget_on_the_real_clock(small_data, monkeypatch):
    calls = []

    def clock():  # the real clock, its readings kept: the last two bound the last step
        calls.append(time.perf_counter())
        return calls[-1]

    monkeypatch.setattr(budget_module, "clock", clock)
    train, test = small_data
    hist = fit(*pair(), with_k("elbo", 1), train, test,
               TrainConfig(epochs=200, batch_size=10, max_seconds=0.5), quiet=True)
    last = hist.rows[-1]
    assert len(hist.rows) < 200, "it did not stop at its budget"
    assert 0.5 <= last["train_seconds"] < 0.5 + (calls[-1] - calls[-2]), "not within one step of the budget"
    assert sum(r["seconds"] for r in hist.rows) == pytest.approx(last["train_seconds"], rel=0.05, abs=0.05)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_an_evals_budget_is_met_exactly_whatever_the_particles(small_data, name):
    train, test = small_data
    counts = {}
    for k in (1, 3):
        if k == 1 and name == "vimco":
            continue  # its leave-one-out baseline needs K >= 2
        est = with_k(name, k)
        particles = getattr(est, "num_particles", 1)
        budget = 3 * (50 * 7 + 13)  # a multiple of 1 and 3 that no whole number of batches of 50 makes
        hist = fit(*pair(), est, train, None, TrainConfig(epochs=100, batch_size=50, max_evals=budget), quiet=True)
        counts[particles] = (hist.rows[-1]["evals"], hist.rows[-1]["step"])
    assert {c for c, _ in counts.values()} == {1089}
    if 3 in counts:  # K=3 sees a third of the points: 7 full batches and a last one cut to 13 points
        assert counts[3][1] == 8
    if 1 in counts:
        assert counts[1][1] == 22


def test_a_resumed_run_continues_the_same_evals_budget(small_data, tmp_path):
    train, test = small_data
    cfg = TrainConfig(epochs=100, batch_size=50, max_evals=5 * 1234)
    straight = RunDir(tmp_path / "straight").create(fresh=True)
    fit(*pair(), with_k("dreg", 5), train, test, cfg, run_dir=straight, quiet=True)

    class Stop(Exception):
        pass

    def stop_after_first(row):
        raise Stop  # after epoch 1's checkpoint, as a killed process leaves it

    run = RunDir(tmp_path / "run").create(fresh=True)
    with pytest.raises(Stop):
        fit(*pair(), with_k("dreg", 5), train, test, cfg, run_dir=run, quiet=True, on_epoch=stop_after_first)
    assert load_checkpoint(run.path / LATEST)["budget"]["evals"] == 5 * 500
    fit(*pair(), with_k("dreg", 5), train, test, cfg, run_dir=run, resume=True, quiet=True)
    a, b = load_checkpoint(straight.path / LATEST), load_checkpoint(run.path / LATEST)
    assert a["budget"]["evals"] == b["budget"]["evals"] == 5 * 1234
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["evals"] for r in rows] == [2500, 5000, 6170] and rows[-1]["step"] == 25
    # a finished budget stays finished: resuming trains nothing more
    fit(*pair(), with_k("dreg", 5), train, test, cfg, run_dir=run, resume=True, quiet=True)
    assert load_checkpoint(run.path / LATEST)["step"] == 25


@pytest.mark.parametrize("field,value", [("max_seconds", 0), ("max_seconds", float("inf")), ("max_evals", 0),
                                         ("max_evals", 2.5)])
def test_bad_budgets_are_refused(field, value):
    with pytest.raises(UserError, match="budget must be a positive"):
        dataclasses.replace(TrainConfig(), **{field: value})
