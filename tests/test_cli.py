"""The pyro-vae command: a whole run on generated data, and one clear line for each user mistake."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.cli import main

TINY = ["--dataset", "fake", "--latent-dim", "2", "--hidden", "16", "--batch-size", "50",
        "--eval-samples", "20", "--eval-points", "40", "--quiet"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, match):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def test_train_evaluate_sample_and_resume(fake_dataset, capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY, "--epochs", "2", "--out", run)
    assert code == 0, err
    assert "test ELBO" in out and "test log-likelihood" in out and "K=20" in out
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "evaluation.json", "evaluation.npz"):
        assert (run / name).is_file(), name
    for name in ("learning_curves", "reconstructions", "prior_samples", "latents_2d"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((run / "evaluation.json").read_text())
    assert summary["num_points"] == 40 and summary["num_samples"] == 20
    config = json.loads((run / "config.json").read_text())
    assert config["spec"]["network"]["latent_dim"] == 2 and config["versions"]["device"] == "cpu"

    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", "4", "--quiet", "--eval-samples", "5")
    assert code == 0, err
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]

    code, out, err = run_cli(capsys, "evaluate", run, "--samples", "30", "--points", "25", "--quiet")
    assert code == 0, err
    assert "K=30, 25 test points" in out
    code, out, err = run_cli(capsys, "sample", run, "--num", "16", "--out", tmp_path / "s.png")
    assert code == 0, err
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_existing_run_is_never_overwritten(fake_dataset, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    before = (run / "checkpoint.pt").read_bytes()
    one_line_error(capsys, "train", *TINY, "--epochs", "1", "--out", run, match="already holds a run")
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_with_another_latent_size_is_refused(fake_dataset, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    one_line_error(capsys, "train", "--resume", run, "--latent-dim", "3", match="another model/data config")


@pytest.mark.parametrize("argv,match", [
    (["train", "--model", "nope"], "invalid choice: 'nope' (choose from"),
    (["train", "--guide", "nope"], "'diagonal-normal'"),
    (["train", "--dataset", "nope"], "choose from"),
    (["train", "--estimator", "nope"], "'analytic-kl', 'dreg', 'elbo'"),
    (["train", "--epochs", "0"], "must be positive"),
    (["train", "--batch-size", "-3"], "must be positive"),
    (["train", "--eval-samples", "0"], "must be positive"),
    (["train", "--epochs", "ten"], "not a valid int"),
    (["train", "--lr", "0"], "must be positive"),
    (["train", "--hidden", "200,x"], "comma-separated list of integers"),
    (["evaluate", "RUN", "--samples", "0"], "must be positive"),
    (["frobnicate"], "invalid choice"),
    (["train", "--seed", "-1"], "must be in [0, 2**32)"),
    (["evaluate", "RUN", "--seed", str(2**64)], "must be in [0, 2**32)"),
    (["compare", "--estimators", "elbo", "--snr-repeats", "1"], "at least 2 draws"),
    (["train", "--beta", "-1"], "must be positive"),
    (["train", "--kl-warmup", "-2"], "must be a finite number >= 0"),
    (["train", "--aux-weight", "nan"], "must be a finite number >= 0"),
    (["train", "--labeled", "0"], "must be positive"),
    (["sample", "RUN", "--label", "-1"], "must be a finite number >= 0"),
])
def test_bad_options_get_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err


def test_cuda_without_cuda(fake_dataset, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(capsys, "train", *TINY, "--device", "cuda", "--out", tmp_path / "r", match="no usable CUDA")


def test_unwritable_run_folder(fake_dataset, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(capsys, "train", *TINY, "--out", blocker / "run", match="cannot write to run folder")


def test_bernoulli_likelihood_with_grayscale_data(fake_dataset, capsys, tmp_path):
    one_line_error(capsys, "train", *TINY, "--binarize", "none", "--out", tmp_path / "r",
                   match="outside the support")


def test_evaluate_a_folder_that_is_not_a_run(capsys, tmp_path):
    one_line_error(capsys, "evaluate", tmp_path, match="is not a run folder")


def test_checkpoint_that_does_not_fit_the_data(fake_dataset, capsys, tmp_path, monkeypatch):
    from pyro_vae import data
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    small = data.DATASETS["fake"](None)
    monkeypatch.setitem(data.DATASETS, "fake", lambda root: tuple(
        data.Split(s.images[:, :4, :], s.labels) for s in small))  # 32 pixels instead of 64
    one_line_error(capsys, "evaluate", run, match="does not fit")


def test_module_and_console_script_entry_points():
    for cmd in ([sys.executable, "-m", "pyro_vae", "--help"], [str(Path(sys.executable).parent / "pyro-vae"), "--help"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and "train" in res.stdout and "evaluate" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--epochs", "0"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "must be positive" in res.stderr


@pytest.mark.parametrize("argv,match", [
    (["evaluate", "{file}"], "is not a run folder"),
    (["train", "--resume", "{file}"], "is not a run folder"),
    (["train", "--device", "gpu", "--out", "{tmp}/r"], "unknown device 'gpu'"),
    (["sample", "{tmp}", "--out", "{tmp}/grid.xyz"], "give a path ending in .png"),
    (["train", "--dataset", "npz", "--data-root", "{npy}", "--out", "{tmp}/r"], "is a single array, not an .npz"),
    (["compare", "--estimators", "iwae:k=inf", "--out", "{tmp}/c"], "num_particles must be a positive integer"),
])
def test_more_user_mistakes_get_one_line(capsys, tmp_path, argv, match):
    import numpy as np
    (tmp_path / "file.txt").write_text("x")
    np.save(tmp_path / "arr.npy", np.zeros((3, 4)))
    argv = [a.format(file=tmp_path / "file.txt", tmp=tmp_path, npy=tmp_path / "arr.npy") for a in argv]
    one_line_error(capsys, *argv, match=match)


def test_resume_may_not_change_the_learning_rate_or_batch(fake_dataset, capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    one_line_error(capsys, "train", "--resume", run, "--lr", "0.01", "--batch-size", "10",
                   match="--batch-size, --lr differ from the run's")


@pytest.mark.parametrize("shape,image", [((5,), False), ((6, 6, 3), True)])
def test_vectors_and_colour_images_from_a_file(capsys, tmp_path, shape, image):
    import numpy as np
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=rng.integers(0, 256, (60, *shape), dtype=np.uint8),
             x_test=rng.integers(0, 256, (20, *shape), dtype=np.uint8))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", "npz", "--data-root", path, "--latent-dim", "2", "--hidden",
                             "8", "--epochs", "1", "--batch-size", "20", "--eval-samples", "5", "--quiet", "--out", run)
    assert code == 0, err
    assert (run / "plots" / "latents_2d.png").is_file()
    assert (run / "plots" / "reconstructions.png").is_file() == image
    if image:
        assert run_cli(capsys, "sample", run, "--num", "4")[0] == 0
    else:
        one_line_error(capsys, "sample", run, match="not images to draw")
