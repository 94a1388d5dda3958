"""pyro-vae compare: seeds, paired differences, budgets, parallel and torchrun runs, resuming, bad input."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import write_npz

from pyro_vae.cli import main
from pyro_vae.cli.compare import parse_estimators
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.training import budget as budget_module

UNCAPPED = ["--dataset", "fake", "--latent-dim", "2", "--hidden", "16", "--batch-size", "50", "--eval-samples", "20",
            "--eval-points", "30", "--quiet"]
TINY = [*UNCAPPED, "--epochs", "2"]
TIMING = {"train_seconds", "seconds_per_epoch", "images_per_s"}  # wall clock: differs between any two runs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def table(out):
    """compare.csv without its timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(open(out / "compare.csv"))]


def npz_args(npz, *extra):
    return ["compare", "--estimators", "elbo,iwae:k=3", "--dataset", "npz", "--data-root", str(npz),
            "--latent-dim", "2", "--hidden", "16", "--batch-size", "20", "--eval-samples", "10", "--eval-points",
            "40", "--snr-repeats", "3", "--curve-points", "20", "--curve-samples", "10", "--quiet", *extra]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("data") / "data.npz", 600, 60)


@pytest.fixture(scope="module")
def straight(npz, tmp_path_factory):
    """A comparison run straight through, in this process (one thread, as the conftest sets)."""
    out = tmp_path_factory.mktemp("straight") / "cmp"
    assert main(npz_args(npz, "--epochs", "6", "--out", str(out))) == 0
    return out


def test_compare_trains_each_estimator_and_writes_table_and_plots(fake_dataset, capsys, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo,analytic-kl,iwae:k=3,dreg:k=3,stl,renyi:alpha=0.5:k=3",
                 "--snr-repeats", "5", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(open(out / "compare.csv")))
    labels = ["elbo", "analytic-kl", "iwae-k3", "dreg-k3", "stl", "renyi-alpha0.5-k3"]
    assert [r["estimator"] for r in rows if r["kind"] == "estimator"] == labels
    assert [(r["estimator"], r["seed"]) for r in rows if r["kind"] == "run"] == [(label, "0") for label in labels]
    assert {r["snr_repeats"] for r in rows if r["kind"] == "run"} == {"5"}
    assert "SNR from 5 gradient draws" in captured.out
    for r in rows:
        assert float(r["nll"]) > 0 and float(r["kl"]) > 0 and 0 <= float(r["active_units"]) <= 2
        assert -float(r["test_elbo"]) >= float(r["nll"]) - 1.0  # the ELBO is below log p(x) (MC slack)
        assert (r["dnll"] == "") == (r["estimator"] == "elbo"), "every estimator but the baseline is paired"
    md = (out / "compare.md").read_text()
    assert "| iwae-k3 |" in md and "Budget: 2 epochs" in captured.out and "One seed: ± and the 95% intervals" in md
    for name in ("nll", "paired", "bound_vs_time", "snr_vs_k"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000 and f"(plots/{name}.png)" in md
    cfg = json.loads((out / "dreg-k3" / "seed0" / "config.json").read_text())
    assert cfg["spec"]["estimator"] == "dreg" and cfg["spec"]["estimator_options"] == {"num_particles": 3}
    curve = json.loads((out / "dreg-k3" / "seed0" / "compare_run.json").read_text())["curve"]
    assert [c["epoch"] for c in curve] == [1, 2] and all(c["log_likelihood"] < 0 for c in curve)


def test_seeds_and_baseline(fake_dataset, capsys, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo,iwae:k=3", "--seeds", "2", "--baseline", "iwae:k=3",
                 "--snr-repeats", "3", "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "compare.csv")))
    runs = {(r["estimator"], r["seed"]): r for r in rows if r["kind"] == "run"}
    assert set(runs) == {(e, s) for e in ("elbo", "iwae-k3") for s in ("0", "1")}
    elbo = next(r for r in rows if r["kind"] == "estimator" and r["estimator"] == "elbo")
    assert float(elbo["nll"]) == pytest.approx((float(runs["elbo", "0"]["nll"]) + float(runs["elbo", "1"]["nll"])) / 2)
    # the combined paired difference is the mean of the two seeds' paired differences
    per_seed = [float(runs["elbo", s]["dnll"]) for s in ("0", "1")]
    assert float(elbo["dnll"]) == pytest.approx(sum(per_seed) / 2)
    assert float(elbo["nll_se_seeds"]) == pytest.approx(abs(float(runs["elbo", "0"]["nll"])
                                                            - float(runs["elbo", "1"]["nll"])) / 2)
    seeds = {json.loads((out / "elbo" / f"seed{s}" / "config.json").read_text())["spec"]["train"]["seed"]
             for s in (0, 1)}
    assert seeds == {0, 1}
    assert "Δ NLL vs iwae-k3" in (out / "compare.md").read_text()


def test_a_seconds_budget_stops_every_run_within_one_step(fake_dataset, capsys, tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setattr(budget_module, "clock", lambda: 0.1 * next(ticks))  # every step takes 0.1 s
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo,iwae:k=3,dreg:k=5", "--budget", "seconds=1.45",
                 "--snr-repeats", "3", "--out", str(out), *UNCAPPED])
    assert code == 0, capsys.readouterr().err
    for r in csv.DictReader(open(out / "compare.csv")):
        # 14 steps make 1.4 s; the 15th reaches 1.5: 12 steps an epoch (600 points, batch 50), so 2 epochs
        assert float(r["train_seconds"]) == pytest.approx(1.5) and float(r["steps"]) == 15, r
        assert float(r["epochs"]) == 2
    assert "Budget: 1.45 s of training per run" in (out / "compare.md").read_text()


def test_an_evals_budget_gives_runs_with_different_k_the_same_count(fake_dataset, capsys, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo,iwae:k=3,dreg:k=5", "--budget", "evals=1515", "--snr-repeats",
                 "3", "--out", str(out), *UNCAPPED])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in csv.DictReader(open(out / "compare.csv")) if r["kind"] == "run"]
    assert {r["evals"] for r in rows} == {"1515"}
    assert [int(r["steps"]) for r in rows] == [31, 11, 7]  # 1515 points; 505 (ten batches and 5); 303
    for label in ("elbo", "iwae-k3", "dreg-k5"):
        metrics = (out / label / "seed0" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["evals"] == 1515


def test_jobs_2_gives_the_same_table_as_jobs_1(npz, straight, capsys, tmp_path):
    out = tmp_path / "cmp"
    assert main(npz_args(npz, "--epochs", "6", "--jobs", "2", "--out", str(out))) == 0
    capsys.readouterr()
    assert table(out) == table(straight) and len(table(out)) == 2 + 2
    assert (out / "iwae-k3" / "seed0" / "compare.log").exists(), "a worker's output goes to its run's folder"


def test_a_killed_comparison_finishes_without_retraining_finished_runs(npz, straight, capsys, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "pyro_vae", *npz_args(npz, "--epochs", "6", "--out", str(out))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = out / "iwae-k3" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (second.exists() and second.read_text()):
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no chance to write anything more
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, f"the comparison finished before it could be killed: {err[-2000:]}"
    first = out / "elbo" / "seed0"
    assert (first / "compare_run.json").exists() and not (out / "iwae-k3" / "seed0" / "compare_run.json").exists()
    kept = {name: ((first / name).stat().st_mtime_ns, (first / name).read_bytes())
            for name in ("checkpoint.pt", "compare_run.json", "evaluation.npz")}
    # the same command again (without --quiet, to see what it says it does)
    assert main([a for a in npz_args(npz, "--epochs", "6", "--out", str(out)) if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 runs already finished" in err and "iwae-k3 seed 0: resuming" in err, err
    for name, (mtime, data) in kept.items():
        assert (first / name).stat().st_mtime_ns == mtime and (first / name).read_bytes() == data, name
    assert table(out) == table(straight), "the resumed comparison differs from one run straight through"


def test_under_torchrun_the_runs_are_dealt_to_the_ranks(npz, straight, tmp_path):
    out = tmp_path / "cmp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pyro_vae"]
    done = subprocess.run([*torchrun, *npz_args(npz, "--epochs", "6", "--out", str(out))], capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {label: json.loads((out / label / "seed0" / "compare_run.json").read_text())["rank"]
             for label in ("elbo", "iwae-k3")}
    assert ranks == {"elbo": 0, "iwae-k3": 1}
    assert done.stdout.count("Budget: 6 epochs") == 1, "only rank 0 reports"
    assert table(out) == table(straight)


@pytest.mark.parametrize("extra,match", [
    (["--baseline", "iwae:k=7"], "--baseline 'iwae:k=7' is not one of the estimators: elbo, iwae-k3"),
    (["--jobs", "3"], "--jobs 3 is more than the 2 runs of this comparison"),
    (["--budget", "evals=1000"], "evals=1000 is not a multiple of the particles of iwae-k3"),
    (["--budget", "epochs=3"], "--epochs 2 and --budget epochs=3 disagree"),
])
def test_bad_comparisons_get_one_line_before_any_training(fake_dataset, capsys, tmp_path, extra, match):
    out = tmp_path / "cmp"
    assert main(["compare", "--estimators", "elbo,iwae:k=3", "--out", str(out), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert not out.exists()


@pytest.mark.parametrize("budget,match", [
    ("seconds=0", "a budget of 0 seconds trains nothing"),
    ("evals=-5", "a budget of -5 evals trains nothing"),
    ("steps=100", "unknown budget kind 'steps'; known: epochs, seconds, evals"),
    ("epochs", "is not KIND=VALUE"),
    ("evals=2.5", "must be a whole number"),
])
def test_bad_budgets_get_one_line(capsys, budget, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--estimators", "elbo", "--budget", budget])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("text,match", [
    ("elbo,nope", f"unknown estimator 'nope'; known: {', '.join(sorted(ESTIMATORS))}"),
    ("iwae:beta=2", "has no option beta; its options: num_particles"),
    ("iwae:k", "is not key=value"),
    ("renyi:alpha=x", "needs a number"),
    ("iwae:k=0", "num_particles must be a positive integer"),
    ("elbo,elbo", "the same estimator twice"),
    ("", "at least one estimator"),
])
def test_bad_estimator_lists_are_refused(text, match):
    with pytest.raises(UserError, match=match):
        parse_estimators(text)


def test_train_with_estimator_options(fake_dataset, capsys, tmp_path):
    code = main(["train", "--estimator", "renyi", "--alpha", "0.5", "--particles", "4", "--out", str(tmp_path / "r"),
                 *TINY])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["spec"]["estimator_options"] == {"num_particles": 4, "alpha": 0.5}
    code = main(["train", "--estimator", "elbo", "--alpha", "0.5", "--out", str(tmp_path / "e"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "estimator 'elbo' has no option alpha; its options: num_particles" in err


def test_snr_repeats_scale_with_the_training_budget():
    """The SNR's gradient draws cost about a tenth of the training's particle-points, within [10, 50]."""
    from pyro_vae.cli.compare_run import SNR_KS, auto_snr_repeats

    assert auto_snr_repeats(2000, 100, 1, True) == 10  # a tiny run: the floor, not 50
    assert auto_snr_repeats(20 * 60000, 100, 5, True) == 50  # 20 MNIST epochs: the ceiling
    n = 40 * 100 * (5 + sum(SNR_KS)) * 10 // 5  # exactly 40 repeats' worth at a tenth
    assert auto_snr_repeats(n, 100, 5, True) == 40
    assert auto_snr_repeats(n, 100, 5, False) > 40  # without a K curve each repeat is cheaper
