"""Faults: kill -9, Ctrl-C, damaged or hostile checkpoints, full disks, diverging runs; and determinism."""
import errno
import json
import os
import random
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
from pyro_vae.errors import UserError
from pyro_vae.training import checkpoint
from pyro_vae.training.checkpoint import LATEST, PREVIOUS, load_checkpoint
from pyro_vae.training.fit import TIMING


@pytest.fixture
def npz(tmp_path) -> Path:
    return write_npz(tmp_path / "data.npz", 600, 100)


def train_args(npz, out, epochs, *extra):
    return ["train", "--dataset", "npz", "--data-root", str(npz), "--latent-dim", "2", "--hidden", "16",
            "--batch-size", "20", "--epochs", str(epochs), "--eval-samples", "5", "--eval-points", "20",
            "--quiet", "--out", str(out), *extra]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_final_state(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / LATEST), load_checkpoint(b / LATEST)
    for part in ("model", "guide"):
        assert ca[part].keys() == cb[part].keys()
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"]) and torch.equal(ca["data_rng"], cb["data_rng"])
    assert ca["step"] == cb["step"]
    for name, state in ca["optimizer"].items():
        other = cb["optimizer"][name]["state"]
        for idx, slot in state["state"].items():
            assert all(torch.equal(v, other[idx][k]) for k, v in slot.items() if torch.is_tensor(v)), name
    assert metrics(a) == metrics(b)


def wait_for_step(proc, run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if load_checkpoint(run / LATEST)["step"] >= step:
                return
        except UserError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"training ended or stalled before step {step} (rc={proc.poll()})")


def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(npz, tmp_path, capsys):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(train_args(npz, full, 12, "--checkpoint-every", "7")) == 0
    seed = random.randrange(2**32)
    target = random.Random(seed).randint(8, 250)  # any step: mid-epoch, on a boundary, or mid-write
    proc = subprocess.Popen([sys.executable, "-m", "pyro_vae", *train_args(npz, killed, 12, "--checkpoint-every", "7")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(proc, killed, target)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert load_checkpoint(killed / LATEST)["step"] < 360, "the run was killed before it finished"
    assert main(train_args(npz, killed, 12, "--checkpoint-every", "7")[:-2] + ["--resume", str(killed)]) == 0
    capsys.readouterr()
    assert_same_final_state(full, killed), f"kill target {target} (seed {seed})"
    epochs = [r["epoch"] for r in metrics(killed)]
    assert epochs == list(range(1, 13)), f"duplicated or missing epochs (killed at step >= {target}, seed {seed})"


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(npz, tmp_path, capsys):
    run, full = tmp_path / "run", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "-m", "pyro_vae", *train_args(npz, run, 200)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run, 30)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved, continue with --resume" in err
    saved = load_checkpoint(run / LATEST)
    assert saved["step"] < 200 * 30 and saved["batch"] > 0, "the checkpoint records the step it stopped at"
    # resumed to 6 epochs (or more, if it got that far) it equals a run that was never interrupted
    epochs = max(6, saved["epoch"] + 1)
    assert main(["train", "--resume", str(run), "--epochs", str(epochs), "--quiet", "--eval-samples", "5"]) == 0
    assert main(train_args(npz, full, epochs)) == 0
    capsys.readouterr()
    assert_same_final_state(full, run)


def test_truncated_checkpoint_is_named_and_resume_uses_the_previous_one(npz, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(npz, run, 2)) == 0
    data = (run / LATEST).read_bytes()
    (run / LATEST).write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "5"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / LATEST} is truncated or corrupted" in err and "Traceback" not in err
    assert load_checkpoint(run / PREVIOUS)["epoch"] == 1
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet", "--eval-samples", "5"]) == 0
    err = capsys.readouterr().err
    assert f"using {run / PREVIOUS}" in err
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3]
    assert (run / f"{LATEST}.damaged").read_bytes() == data[: len(data) // 2], "the damaged file is kept aside"
    assert load_checkpoint(run / PREVIOUS)["epoch"] == 2, "the good previous one was not rotated away"


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "run"
    evil.mkdir()
    torch.save({"model": {}, "guide": {}, "extra": _Payload(marker)}, evil / LATEST)
    (evil / "config.json").write_text(json.dumps({"spec": {}}))
    with pytest.raises(UserError, match="refusing to load .* pickled objects"):
        load_checkpoint(evil / LATEST)
    assert main(["evaluate", str(evil)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("fail_at", ["save", "torch-save", "replace"])
def test_disk_full_or_permission_denied_keeps_the_last_checkpoint_and_metrics(npz, tmp_path, capsys, monkeypatch,
                                                                            fail_at):
    run = tmp_path / "run"
    assert main(train_args(npz, run, 2)) == 0
    before_ckpt, before_metrics = (run / LATEST).read_bytes(), (run / "metrics.jsonl").read_bytes()
    if fail_at == "save":
        def full_disk(obj, f, *a, **k):
            Path(f).write_bytes(b"half")  # a partial file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint.torch, "save", full_disk)
        expected = "No space left on device"
    elif fail_at == "torch-save":
        def full_disk_torch(obj, f, *a, **k):  # what torch.save itself raises on a full disk
            Path(f).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        monkeypatch.setattr(checkpoint.torch, "save", full_disk_torch)
        expected = "file write failed"
    else:
        real_replace = os.replace

        def denied(src, dst):
            if Path(dst).name == LATEST:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_replace(src, dst)
        monkeypatch.setattr(checkpoint.os, "replace", denied)
        expected = "Permission denied"
    code = main(["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    monkeypatch.undo()
    assert load_checkpoint(run / LATEST)["epoch"] == 2
    if fail_at != "replace":
        assert (run / LATEST).read_bytes() == before_ckpt
    assert (run / "metrics.jsonl").read_bytes() == before_metrics
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_gradient_clipping_bounds_the_gradients_adam_sees(npz, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(npz, run, 1, "--clip-norm", "0.001")) == 0
    clipped = load_checkpoint(run / LATEST)["optimizer"]
    assert main(train_args(npz, tmp_path / "free", 1)) == 0
    free = load_checkpoint(tmp_path / "free" / LATEST)["optimizer"]
    biggest = lambda opt: max(float(s["exp_avg"].abs().max()) for o in opt.values() for s in o["state"].values())
    assert biggest(clipped) <= 0.001 + 1e-9 < biggest(free)


def test_same_seed_same_metrics_and_versions_recorded(npz, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(npz, a, 2)) == 0 and main(train_args(npz, b, 2)) == 0
    assert metrics(a) == metrics(b)
    evaluations = [json.loads((r / "evaluation.json").read_text()) for r in (a, b)]
    assert [{k: v for k, v in e.items() if k not in TIMING} for e in evaluations] == [
        {k: v for k, v in evaluations[0].items() if k not in TIMING}] * 2
    versions = json.loads((a / "config.json").read_text())["versions"]
    assert versions["torch"] == torch.__version__ and versions["device"] == "cpu" and "pyro" in versions


@pytest.mark.parametrize("arrays,match", [
    (dict(x_train=np.zeros(10), x_test=np.zeros(10)), "must be shaped"),
    (dict(x_train=np.full((10, 4), np.nan), x_test=np.zeros((5, 4))), "NaN"),
    (dict(x_train=np.full((10, 4), 2.0), x_test=np.zeros((5, 4))), r"needs values in \[0, 1\]"),
    (dict(x_train=np.zeros((0, 4)), x_test=np.zeros((5, 4))), "empty"),
    (dict(x_train=np.zeros((10, 4)), x_test=np.zeros((5, 3))), "x_test points"),
    (dict(x_train=np.zeros((10, 4)), y_train=np.zeros(9), x_test=np.zeros((5, 4))), "y_train must have shape"),
    (dict(x_test=np.zeros((5, 4))), "has no x_train"),
])
def test_bad_data_files_get_one_clear_line(tmp_path, capsys, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    code = main(train_args(path, tmp_path / "run", 1))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err
    import re
    assert re.search(match, err), err


def test_grayscale_file_with_bernoulli_likelihood_and_no_binarization(tmp_path, capsys):
    path = tmp_path / "gray.npz"
    np.savez(path, x_train=np.full((10, 4), 0.5), x_test=np.full((5, 4), 0.5))
    assert main(train_args(path, tmp_path / "run", 1, "--binarize", "none")) == 2
    assert "outside the support" in capsys.readouterr().err


def test_not_an_npz_file(tmp_path, capsys):
    path = tmp_path / "junk.npz"
    path.write_text("not a zip")
    assert main(train_args(path, tmp_path / "run", 1)) == 2
    assert f"{path} is not a readable .npz file" in capsys.readouterr().err
