"""IS log-likelihood: above the ELBO, tighter with more samples, bounded memory."""

import numpy as np
import pytest

import pyro_vae.analysis.evaluation as evaluation
from pyro_vae.analysis.evaluation import evaluate
from pyro_vae.errors import UserError
from pyro_vae.estimators import ELBO
from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.models import BernoulliVAE
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit

CFG = dict(x_dim=64, latent_dim=4, hidden=(32,))


@pytest.fixture
def trained(small_data):
    train, test = small_data
    model, guide = BernoulliVAE(BernoulliVAE.Config(**CFG)), DiagonalNormalGuide(DiagonalNormalGuide.Config(**CFG))
    fit(model, guide, ELBO(), train, test, TrainConfig(epochs=8, batch_size=50, lr=3e-3), quiet=True)
    return model, guide, test.head(60)


def test_is_log_likelihood_is_above_the_elbo_and_tightens_with_k(trained):
    model, guide, test = trained
    results = {k: evaluate(model, guide, test, num_samples=k, quiet=True) for k in (1, 10, 500)}
    ll = {k: r.summary()["log_likelihood"] for k, r in results.items()}
    # K=1 is an unbiased one-sample ELBO; with 500 draws the gap to the ELBO is well above MC noise
    e500 = results[500]
    gap = e500.log_likelihood - e500.elbo
    assert (gap >= -1e-9).all(), "logmeanexp of log-weights can never fall below their mean"
    assert gap.mean() > 0.1
    assert ll[1] < ll[10] < ll[500], ll
    assert abs(ll[1] - e500.summary()["elbo"]) < 5 * results[1].summary()["log_likelihood_se"]


def test_particles_are_chunked_so_memory_is_bounded(trained, monkeypatch):
    model, guide, test = trained
    seen = []
    real = evaluation.log_weights

    def spy(model, guide, k, x):
        seen.append(k * x.shape[0])
        return real(model, guide, k, x)

    monkeypatch.setattr(evaluation, "log_weights", spy)
    out = evaluate(model, guide, test, num_samples=1000, batch_size=20, max_particles_per_chunk=500, quiet=True)
    assert max(seen) <= 500
    assert sum(seen) == 1000 * len(test)
    assert out.log_likelihood.shape == (len(test),) and np.isfinite(out.log_likelihood).all()


def test_summary_reports_mean_and_standard_error(trained):
    model, guide, test = trained
    s = evaluate(model, guide, test, num_samples=20, quiet=True).summary()
    assert s["num_points"] == len(test) and s["nll"] == -s["log_likelihood"]
    assert 0 < s["log_likelihood_se"] < abs(s["log_likelihood"])


@pytest.mark.parametrize("bad", [dict(num_samples=0), dict(batch_size=0), dict(num_samples=-5)])
def test_non_positive_sizes_are_refused(trained, bad):
    model, guide, test = trained
    with pytest.raises(UserError, match="must be positive"):
        evaluate(model, guide, test, quiet=True, **bad)
