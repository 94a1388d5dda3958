"""Property-based tests: option parsing and data validation never crash, and accept only what is valid."""
import argparse

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyro_vae.cli.compare import parse_estimators
from pyro_vae.cli.parser import _positive, _sizes
from pyro_vae.cli.parser import build_parser as _parser
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.training.config import TrainConfig

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str), st.floats().map(str)))
def test_positive_int_accepts_exactly_the_positive_integers(text):
    try:
        value = _positive(int)(text)
    except argparse.ArgumentTypeError:
        try:
            assert int(text) <= 0
        except ValueError:
            pass
    else:
        assert isinstance(value, int) and value > 0 and value == int(text)


@SETTINGS
@given(st.text(alphabet="0123456789,- x", max_size=20))
def test_layer_sizes_parse_or_refuse(text):
    try:
        sizes = _sizes(text)
    except argparse.ArgumentTypeError:
        return
    assert sizes and all(isinstance(s, int) and s > 0 for s in sizes)


@SETTINGS
@given(st.lists(st.sampled_from(["--epochs", "--batch-size", "--lr", "--eval-samples", "--latent-dim"]), min_size=1,
                max_size=3),
       st.lists(st.one_of(st.integers(-5, 5).map(str), st.floats(-2, 2).map(str), st.text(max_size=4)), min_size=3,
                max_size=3))
def test_train_options_parse_to_valid_values_or_exit_2(flags, values):
    argv = ["train"]
    for flag, value in zip(flags, values):
        argv += [flag, value]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    for name in ("epochs", "batch_size", "lr", "eval_samples", "latent_dim"):
        value = getattr(args, name)
        assert value is None or value > 0


@SETTINGS
@given(st.one_of(st.text(alphabet="abcdefiklorstwyn-:=,.0123456789", max_size=30),
                 st.sampled_from(["iwae:k=inf", "renyi:alpha=nan", "dreg:k=1e400", "iwae:k=-0", "stl:k=2.5"])))
def test_estimator_lists_parse_or_raise_a_user_error(text):
    try:
        parsed = parse_estimators(text)
    except UserError:
        return
    assert parsed and all(isinstance(options, dict) for _, _, options in parsed)


@SETTINGS
@given(st.integers(-3, 3), st.integers(-3, 3), st.one_of(st.floats(-1, 1), st.just(float("nan"))), st.sampled_from(["auto", "cpu", "gpu"]))
def test_train_config_is_valid_or_refused(epochs, batch, lr, device):
    try:
        cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, device=device)
    except UserError:
        return
    assert cfg.epochs > 0 and cfg.batch_size > 0 and cfg.lr > 0 and cfg.device in ("auto", "cpu")


@SETTINGS
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.integers(0, 5)),
                  elements=st.one_of(st.floats(-2, 2), st.sampled_from([np.nan, np.inf, -np.inf]))),
       st.sampled_from(["dynamic", "static", "none"]))
def test_dataset_validation_accepts_only_what_it_can_serve(x, mode):
    try:
        data = ArrayDataset(x, binarize=mode)
    except UserError:
        bad = x.size == 0 or not np.isfinite(x).all() or (mode != "none" and ((x < 0) | (x > 1)).any())
        assert bad, "a valid array was refused"
        return
    batch, _ = next(data.batches(len(data), shuffle=False, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(batch).all() and batch.shape == (x.shape[0], x.shape[1])
    if mode != "none":
        assert set(batch.unique().tolist()) <= {0.0, 1.0}
