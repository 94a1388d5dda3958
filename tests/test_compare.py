"""pyro-vae compare, and estimator selection on the command line."""
import csv
import json

import pytest

from pyro_vae.cli import main
from pyro_vae.cli.compare import parse_estimators
from pyro_vae.errors import UserError

TINY = ["--dataset", "fake", "--latent-dim", "2", "--hidden", "16", "--batch-size", "50", "--epochs", "2",
        "--eval-samples", "20", "--eval-points", "30", "--quiet"]


def test_compare_trains_each_estimator_and_writes_table_and_plots(fake_dataset, capsys, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo,analytic-kl,iwae:k=3,dreg:k=3,stl,renyi:alpha=0.5:k=3",
                 "--snr-repeats", "5", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["estimator"] for r in rows] == ["elbo", "analytic-kl", "iwae-k3", "dreg-k3", "stl", "renyi-alpha0.5-k3"]
    assert {r["snr_repeats"] for r in rows} == {"5"} and "SNR from 5 gradient draws" in captured.out
    for r in rows:
        assert float(r["nll"]) > 0 and float(r["kl"]) > 0 and 0 <= int(r["active_units"]) <= 2
        assert -float(r["test_elbo"]) >= float(r["nll"]) - 1.0  # the ELBO is below log p(x) (MC slack)
    assert "| iwae-k3 |" in (out / "compare.md").read_text() and "Budget: 2 epochs" in captured.out
    for name in ("learning_curves", "nll", "snr_vs_k"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    cfg = json.loads((out / "dreg-k3" / "config.json").read_text())
    assert cfg["spec"]["estimator"] == "dreg" and cfg["spec"]["estimator_options"] == {"num_particles": 3}
    seeds = {json.loads((out / r["estimator"] / "config.json").read_text())["spec"]["train"]["seed"] for r in rows}
    assert seeds == {0}


@pytest.mark.parametrize("text,match", [
    ("elbo,nope", "unknown estimator 'nope'; known: analytic-kl, dreg, elbo, enum-elbo, iwae, renyi, stl"),
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
    from pyro_vae.cli.compare import SNR_KS, auto_snr_repeats

    assert auto_snr_repeats(2000, 100, 1, True) == 10  # a tiny run: the floor, not 50
    assert auto_snr_repeats(20 * 60000, 100, 5, True) == 50  # 20 MNIST epochs: the ceiling
    n = 40 * 100 * (5 + sum(SNR_KS)) * 10 // 5  # exactly 40 repeats' worth at a tenth
    assert auto_snr_repeats(n, 100, 5, True) == 40
    assert auto_snr_repeats(n, 100, 5, False) > 40  # without a K curve each repeat is cheaper
