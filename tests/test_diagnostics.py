"""Posterior diagnostics checked against exact answers on linear-Gaussian models.

With z ~ N(0, I), x | z ~ N(Wz + b, psi I) and orthogonal columns of W, p(z|x) is a diagonal Gaussian, so
a mean-field guide can be exact: then every log-weight equals log p(x), k-hat is as low as it gets, ESS = S,
and both inference gaps vanish. For any Gaussian q, L[q] = log p(x) - KL(q || p(z|x)) in closed form.
"""
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.analysis.gaps import inference_gaps
from pyro_vae.analysis.importance import KHAT_BAD, KHAT_GOOD, importance_diagnostics, point_posterior, save_netcdf
from pyro_vae.analysis.latent_stats import latent_health, mean_kl
from pyro_vae.cli import main
from pyro_vae.cli.diagnose import diagnose
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.guides import LinearGaussianGuide
from pyro_vae.models import LinearGaussian

X_DIM, N = 6, 8


pytestmark = pytest.mark.usefixtures("float64")


def diagonal_model(scales=(2.0, 1.0), seed=1):
    """Orthogonal columns of W (scaled by ``scales``) and isotropic noise: a diagonal posterior covariance."""
    torch.manual_seed(seed)
    model = LinearGaussian(LinearGaussian.Config(x_dim=X_DIM, latent_dim=len(scales)))
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(X_DIM, len(scales)))
        model.weight.copy_(q * torch.tensor(scales))
        model.bias.normal_()
        model.log_psi.fill_(-0.5)
    return model


def guide_for(model, scale_factor=1.0, shift=0.0, full_covariance=False):
    g = LinearGaussianGuide(LinearGaussianGuide.Config(x_dim=X_DIM, latent_dim=model.latent_dim,
                                                       full_covariance=full_covariance)).set_exact(model)
    with torch.no_grad():
        g.log_diag.add_(math.log(scale_factor))
        g.c.add_(shift)
    return g


def kl_to_posterior(model, guide, x):
    """KL(q(z|x) || p(z|x)) per point for the diagonal linear-Gaussian guide, in closed form."""
    a, c, s = model.exact_posterior()
    q = dist.Normal(x @ guide.a.T + guide.c, guide.log_diag.exp()).to_event(1)
    p = dist.MultivariateNormal(x @ a.T + c, covariance_matrix=s)
    with torch.no_grad():
        return (q.log_prob(z := q.sample((20000,))) - p.log_prob(z)).mean(0).numpy()


def test_exact_guide_has_constant_weights_full_ess_and_exact_log_likelihood():
    model = diagonal_model()
    x = model.sample_data(N)
    d = importance_diagnostics(model, guide_for(model), x, num_samples=200)
    assert d.log_weights.shape == (N, 200) and d.latents["z"].shape == (N, 200, 2)
    assert np.all(d.khat < KHAT_GOOD)  # -inf: weights constant to rounding, the best case
    assert np.allclose(d.ess / d.num_samples, 1.0, atol=1e-9)
    assert np.allclose(d.log_likelihood, model.exact_log_likelihood(x).numpy(), atol=1e-9)
    assert np.allclose(d.elbo, d.log_likelihood, atol=1e-9)


def test_khat_rises_and_ess_falls_as_the_guide_narrows():
    model = diagonal_model()
    x = model.sample_data(16)
    result = {}
    for f in (1.5, 0.8, 0.4):
        torch.manual_seed(0)
        result[f] = importance_diagnostics(model, guide_for(model, f), x, num_samples=1000)
    # a wider q bounds the weights (k <= 0); q narrower by 0.4 in sd has k = 1 - 0.4^2 = 0.84 in theory
    assert result[1.5].khat.max() < KHAT_GOOD
    assert result[0.8].khat.mean() < KHAT_GOOD < result[0.4].khat.mean()
    assert result[0.4].khat.mean() > KHAT_BAD
    ess = {f: (r.ess / r.num_samples).mean() for f, r in result.items()}
    assert ess[0.8] > 0.5 > 0.1 > ess[0.4]


def test_too_few_samples_is_a_one_line_user_error():
    model = diagonal_model()
    with pytest.raises(UserError, match="S >= 100"):
        importance_diagnostics(model, guide_for(model), model.sample_data(2), num_samples=50)


def test_gaps_add_up_and_match_the_closed_form_kl():
    model = diagonal_model()
    x = model.sample_data(N)
    guide = guide_for(model, scale_factor=1.6, shift=0.4)
    torch.manual_seed(0)
    gaps = inference_gaps(model, guide, x, steps=200, particles=32, lr=0.05, num_samples=2000)
    exact = model.exact_log_likelihood(x).numpy()
    assert np.allclose(gaps.amortization_gap + gaps.approximation_gap, gaps.log_likelihood - gaps.elbo_amortized,
                       atol=1e-12)
    # q* reaches the (mean-field) posterior: log p(x) is exact, no approximation gap is left
    assert np.allclose(gaps.log_likelihood, exact, atol=1e-3)
    assert np.all(np.abs(gaps.approximation_gap) < 1e-3)
    # the amortization gap is then KL(q || p(z|x)), up to the Monte Carlo error of L[q]
    kl = kl_to_posterior(model, guide, x)
    err = 4 * np.hypot(gaps.elbo_amortized_se, gaps.elbo_local_se) + 0.02
    assert np.all(np.abs(gaps.amortization_gap - kl) < err), (gaps.amortization_gap, kl)
    assert np.all(gaps.amortization_gap > 0.1)
    assert np.all(gaps.elbo_amortized < gaps.elbo_local)
    assert gaps.history[-1] > gaps.history[0]


def test_gaps_vanish_for_the_exact_guide():
    model = diagonal_model()
    x = model.sample_data(N)
    torch.manual_seed(0)
    gaps = inference_gaps(model, guide_for(model), x, steps=100, particles=32, lr=0.05, num_samples=1000)
    exact = model.exact_log_likelihood(x).numpy()
    assert np.allclose(gaps.elbo_amortized, exact, atol=1e-9)
    assert np.all(np.abs(gaps.amortization_gap) < 1e-3)
    assert np.all(np.abs(gaps.approximation_gap) < 1e-3)


def test_approximation_gap_of_a_correlated_posterior_is_the_mean_field_kl():
    """A full-covariance guide at the exact posterior beats any mean-field q*: the approximation gap is the KL
    of the best mean-field Gaussian, 0.5 (sum_d log Lambda_dd - log det Lambda), Lambda the posterior precision,
    and the amortization gap is its negative (q's family is richer than q*'s)."""
    model = diagonal_model()
    with torch.no_grad():  # nearly parallel columns: z1 and z2 explain x almost alike, so they anti-correlate
        model.weight[:, 1] = 0.8 * model.weight[:, 0] + 0.3 * model.weight[:, 1]
    x = model.sample_data(N)
    guide = guide_for(model, full_covariance=True)
    precision = torch.linalg.inv(model.exact_posterior()[2])
    expected = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision)).item()
    assert expected > 0.3
    torch.manual_seed(0)
    gaps = inference_gaps(model, guide, x, steps=300, particles=32, lr=0.05, num_samples=4000)
    err = 4 * gaps.elbo_local_se + 0.01
    assert np.all(np.abs(gaps.approximation_gap - expected) < err), (gaps.approximation_gap, expected, err)
    assert np.all(np.abs(gaps.amortization_gap + expected) < err)


def test_inference_data_round_trips_through_netcdf(tmp_path):
    import arviz as az

    model = diagonal_model()
    x = model.sample_data(5)
    labels = torch.arange(5)
    d = importance_diagnostics(model, guide_for(model, 0.7), x, labels, num_samples=120, points=np.arange(10, 15))
    idata = d.to_inference_data()
    assert idata.posterior["z"].dims == ("point", "draw", "latent")
    assert idata.sample_stats["log_weight"].dims == ("point", "draw")
    assert list(idata.posterior["point"].values) == [10, 11, 12, 13, 14]
    back = az.from_netcdf(save_netcdf(idata, tmp_path / "d.nc"))
    assert np.array_equal(back.posterior["z"].values, d.latents["z"])
    assert np.array_equal(back.sample_stats["log_weight"].values, d.log_weights)
    for name, values in (("khat", d.khat), ("ess", d.ess), ("log_likelihood", d.log_likelihood)):
        assert np.array_equal(back.sample_stats[name].values, values), name
    assert np.array_equal(back.observed_data["x"].values, x.numpy())
    assert np.array_equal(back.constant_data["label"].values, labels.numpy())
    one = point_posterior(back, 12)
    assert one.posterior["z"].shape == (1, 120, 2)
    assert np.array_equal(one.posterior["z"].values[0], d.latents["z"][2])


class TwoSiteModel(nn.Module):
    """z1 ~ N(0, I_2), z2 ~ N(0, 1) (a scalar site), x ~ N(W [z1, z2], 0.5^2 I): two latent sites."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(X_DIM, 3))

    def forward(self, x=None, *, batch_size=None):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n, dim=-1):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(torch.tensor(0.0), 1.0))
            loc = torch.cat([z1, z2.unsqueeze(-1)], -1) @ self.weight.T
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)


class TwoSiteGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(0.1 * torch.randn(3, X_DIM))

    def forward(self, x, **kwargs):
        loc = x @ self.a.T
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z1", dist.Normal(loc[..., :2], 0.5).to_event(1))
            pyro.sample("z2", dist.Normal(loc[..., 2], 0.5))


def test_several_latent_sites_each_get_their_own_variable_and_gaps():
    torch.manual_seed(0)
    model, guide = TwoSiteModel(), TwoSiteGuide()
    x = torch.randn(4, X_DIM)
    idata = importance_diagnostics(model, guide, x, num_samples=100).to_inference_data()
    assert idata.posterior["z1"].dims == ("point", "draw", "latent_z1") and idata.posterior["z1"].shape == (4, 100, 2)
    assert idata.posterior["z2"].dims == ("point", "draw", "latent_z2") and idata.posterior["z2"].shape == (4, 100, 1)
    gaps = inference_gaps(model, guide, x, steps=150, particles=16, lr=0.05, num_samples=1000)
    assert set(gaps.local_loc) == {"z1", "z2"} and gaps.local_loc["z2"].shape == (4,)
    # the encoder is random: q* must do far better than it, and the posterior is Gaussian, so q* nearly exact
    assert np.all(gaps.amortization_gap > 1.0)
    assert np.all(gaps.approximation_gap > -0.05)


def test_latent_health_counts_units_that_ignore_x_as_inactive():
    model = diagonal_model(scales=(2.0, 0.0, 0.0))  # z2, z3 do not reach x: their posterior is the prior
    guide = guide_for(model).float()
    data = ArrayDataset(model.sample_data(300), binarize="none")  # float32, as datasets are
    model.float()
    health = latent_health(model, guide, data)
    kl, act = health.kl["z"], health.activity["z"]
    # E_x E_q[z1|x] = 0 and Var_x E_q[z1|x] = 1 - s^2 (s^2 the posterior variance): E_x KL = -log s
    s2 = model.exact_posterior()[2][0, 0].item()
    assert abs(act[0] - (1 - s2)) < 0.2 and np.allclose(act[1:], 0.0, atol=1e-10)
    assert abs(kl[0] + 0.5 * math.log(s2)) < 0.15 and np.allclose(kl[1:], 0.0, atol=1e-6)
    assert np.isclose(kl.sum(), mean_kl(model, guide, data, num_samples=200), rtol=0.02)
    assert health.active == 1 and health.total == 3 and health.collapsed
    assert "1 of 3 latent units are active" in health.warning()


def test_diagnose_writes_consistent_files(tmp_path):
    model = diagonal_model()
    guide = guide_for(model, 0.7).float()
    data = ArrayDataset(model.sample_data(30), binarize="none")
    d = diagnose(model.float(), guide, data, tmp_path, points=10, samples=150, gap_points=5, gap_steps=20,
                 quiet=True, write_plots=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["importance"]["num_points"] == 10 and summary["gaps"]["num_points"] == 5
    assert math.isclose(summary["importance"]["khat_mean"], float(np.mean(d.importance.khat)))
    rows = (tmp_path / "points.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("point,label,khat")
    assert "## Inference gaps" in (tmp_path / "report.md").read_text()


TINY = ["--dataset", "fake", "--latent-dim", "2", "--hidden", "16", "--batch-size", "50",
        "--eval-samples", "20", "--eval-points", "40", "--quiet"]


def test_cli_diagnose_writes_files_and_reports(fake_dataset, capsys, tmp_path):
    torch.set_default_dtype(torch.float32)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    code = main(["diagnose", str(run), "--points", "12", "--samples", "100", "--gap-points", "4", "--gap-steps", "10",
                 "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "k-hat: mean" in out and "ESS/S: mean" in out and "amortization" in out and "of 2 active" in out
    diag = run / "diagnostics"
    for name in ("importance.nc", "points.csv", "gaps.csv", "latents.csv", "summary.json", "report.md"):
        assert (diag / name).stat().st_size > 100, name
    for name in ("khat", "marginals", "kl_per_unit", "gaps", "interpolation", "traversals", "reconstructions",
                 "prior_samples", "latents_2d"):
        assert (diag / "plots" / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((diag / "summary.json").read_text())
    assert summary["importance"]["num_samples"] == 100 and summary["latents"]["total_units"] == 2
    assert f"mean {summary['importance']['khat_mean']:.2f}" in out


def test_cli_diagnose_bad_options_are_one_line_errors(capsys, tmp_path):
    code = main(["diagnose", str(tmp_path), "--samples", "50"])  # checked before the run is loaded
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "S >= 100" in err, err
    for argv, match in ((["--points", "0"], "must be positive"), (["--gap-steps", "x"], "not a valid int")):
        with pytest.raises(SystemExit) as exit_info:
            main(["diagnose", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_cli_diagnose_of_a_folder_without_a_run_is_a_one_line_error(capsys, tmp_path):
    code = main(["diagnose", str(tmp_path / "nothing")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a run folder" in err
