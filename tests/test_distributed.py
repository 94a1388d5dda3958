"""torch.distributed: two gloo processes train and evaluate as one process does on the combined batch."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_npz

from pyro_vae.cli import main
from pyro_vae.training.checkpoint import LATEST, load_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pyro_vae"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def npz(tmp_path) -> Path:
    return write_npz(tmp_path / "data.npz", 240, 60)


def train_args(npz, out, epochs, *extra):
    return ["train", "--dataset", "npz", "--data-root", str(npz), "--latent-dim", "2", "--hidden", "16",
            "--batch-size", "40", "--epochs", str(epochs), "--eval-samples", "8", "--quiet", "--out", str(out),
            *extra]


def torchrun(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def params(run: Path) -> dict:
    ckpt = load_checkpoint(run / LATEST)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"guide.{k}": v for k, v in ckpt["guide"].items()}}


def test_two_processes_end_where_one_process_on_the_combined_batch_ends(npz, tmp_path):
    # the autoencoder with a point guide draws nothing at random: the two runs differ only by how the
    # gradient of each batch was added up (one backward pass, or two halves and an all-reduce)
    opts = ["--model", "autoencoder", "--guide", "point", "--activation", "relu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(npz, one, 2, *opts)) == 0
    torchrun(*train_args(npz, two, 2, *opts))
    a, b = params(one), params(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    rows = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    for r1, r2 in zip(*rows):
        assert r1["train_elbo"] == pytest.approx(r2["train_elbo"], rel=1e-5)
        assert r1["step"] == r2["step"]
    assert rows[0][1]["train_elbo"] > rows[0][0]["train_elbo"], "it trained"


def test_every_estimator_trains_in_two_processes_and_resume_is_exact(npz, tmp_path):
    first, straight = tmp_path / "first", tmp_path / "straight"
    torchrun(*train_args(npz, straight, 2, "--estimator", "dreg", "--particles", "3"))
    torchrun(*train_args(npz, first, 1, "--estimator", "dreg", "--particles", "3"))
    ckpt = load_checkpoint(first / LATEST)
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2
    assert not torch.equal(ckpt["rank_rng"][0]["torch"], ckpt["rank_rng"][1]["torch"]), "one draw stream per rank"
    torchrun("train", "--resume", first, "--epochs", 2, "--quiet", "--eval-samples", 8)
    a, b = params(straight), params(first)
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed two-process run differs from a straight one"
    assert (first / "plots" / "learning_curves.png").exists() and (first / "evaluation.json").exists()


def test_two_process_evaluation_equals_one_process(npz, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(npz, run, 1)) == 0
    assert main(["evaluate", str(run), "--samples", "16", "--quiet"]) == 0
    one = json.loads((run / "evaluation.json").read_text())
    per_point_one = np.load(run / "evaluation.npz")["log_likelihood"]
    torchrun("evaluate", run, "--samples", 16, "--quiet")
    two = json.loads((run / "evaluation.json").read_text())
    per_point_two = np.load(run / "evaluation.npz")["log_likelihood"]
    assert len(per_point_two) == 60
    np.testing.assert_array_equal(per_point_one, per_point_two)
    assert one["log_likelihood"] == two["log_likelihood"]


def test_every_registry_estimator_runs_in_two_processes(npz, tmp_path):
    from pyro_vae.estimators import ESTIMATORS

    for name in ESTIMATORS:
        model = ["--model", "m2", "--guide", "m2", "--labeled", "40"] if name == "enum-elbo" else []
        out = tmp_path / name
        torchrun(*train_args(npz, out, 1, "--estimator", name, *model))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert np.isfinite(rows[-1]["train_elbo"]), name


def test_commands_that_run_in_one_process_say_so(npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["sample", str(tmp_path)]) == 2
    assert "sample runs in one process" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "5")
    assert main(train_args(npz, tmp_path / "x", 1)) == 2
    assert "RANK 5 is not within WORLD_SIZE 2" in capsys.readouterr().err


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path):
    data = write_npz(tmp_path / "big.npz", 2400, 100)
    run, straight = tmp_path / "run", tmp_path / "straight"
    args = ["train", "--dataset", "npz", "--data-root", data, "--latent-dim", "2", "--hidden", "16",
            "--batch-size", "20", "--eval-samples", "5", "--quiet"]
    proc = subprocess.Popen([*TORCHRUN, *map(str, args), "--epochs", "40", "--out", str(run)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the agent and both workers get it
    err = proc.communicate(timeout=300)[1]
    # the two ranks write to one pipe, so their lines may run together: find the messages, not lines
    stopped = re.findall(r"pyro-vae: interrupted (at epoch \d+, step \d+|after epoch \d+)", err)
    assert len(stopped) == 2 and len(set(stopped)) == 1, err[-2000:]
    saved = load_checkpoint(run / LATEST)
    assert 2 <= saved["epoch"] < 40
    epochs = saved["epoch"] + 2
    torchrun("train", "--resume", run, "--epochs", epochs, "--quiet", "--eval-samples", 5)
    torchrun(*args, "--epochs", epochs, "--out", straight)
    a, b = params(straight), params(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "an interrupted and resumed run differs from a straight one"


def test_two_process_diagnostics_cover_every_point_once(npz, tmp_path):
    import csv

    run = tmp_path / "run"
    assert main(train_args(npz, run, 1)) == 0
    opts = ["--points", "10", "--samples", "120", "--gap-points", "6", "--gap-steps", "20", "--quiet"]
    assert main(["diagnose", str(run), *opts]) == 0
    one = json.loads((run / "diagnostics" / "summary.json").read_text())
    torchrun("diagnose", run, *opts)
    two = json.loads((run / "diagnostics" / "summary.json").read_text())
    for part in ("importance", "gaps"):
        assert one[part]["num_points"] == two[part]["num_points"]
    for name, n in (("points.csv", 10), ("gaps.csv", 6)):
        rows = list(csv.DictReader((run / "diagnostics" / name).open()))
        assert [int(r["point"]) for r in rows] == list(range(n)), name  # each point once, in order
        assert all(np.isfinite(float(r["log_likelihood"])) for r in rows)
    # the same points, other draws (a stream per rank): the estimates agree to Monte Carlo error
    assert abs(one["importance"]["log_likelihood"] - two["importance"]["log_likelihood"]) < 1.0
