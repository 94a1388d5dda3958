"""The plain autoencoder as a Pyro program (loss = reconstruction NLL under every estimator), and the
generation metrics that show why its latent space does not generate while a VAE's does."""
import json
import math

import pytest
import torch
from conftest import prototype_images

from pyro_vae.analysis.generation import (
    codes,
    decode,
    fit_gaussian,
    generation_report,
    generator_log_likelihood,
    prior_latents,
    support_fraction,
)
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.estimators._weights import log_weights
from pyro_vae.guides import GUIDES, PointGuide
from pyro_vae.models import MODELS, Autoencoder
from pyro_vae.programs.sites import _trace
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit

NET = {"x_dim": 20, "latent_dim": 3, "hidden": (16,), "activation": "tanh"}


def _pair() -> tuple[Autoencoder, PointGuide]:
    return Autoencoder(Autoencoder.Config(**NET)), PointGuide(PointGuide.Config(**NET))


def _x(n: int = 6) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, NET["x_dim"]), 0.4))


def _reconstruction_nll(model, guide, x) -> torch.Tensor:
    logits = model.decoder(guide.encoder(x))
    return -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum()


def test_registered():
    assert MODELS["autoencoder"] is Autoencoder and GUIDES["point"] is PointGuide


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimators_loss_is_the_reconstruction_nll(name):
    model, guide = _pair()
    x = _x()
    if name == "rws":  # its guide gradient is d log q / d phi at fixed draws: none for a point mass
        with pytest.raises(UserError, match="z is a point mass"):
            ESTIMATORS[name]()(model, guide, x)
        return
    loss = ESTIMATORS[name]()(model, guide, x)
    expected = _reconstruction_nll(model, guide, x)
    assert abs(loss.item() - expected.item()) < 1e-4 * abs(expected.item())


def test_gradient_is_the_reconstruction_gradient():
    """The code is the encoder's output itself, so the encoder trains through the decoder."""
    model, guide = _pair()
    x = _x()
    params = list(model.parameters()) + list(guide.parameters())
    got = torch.autograd.grad(ESTIMATORS["elbo"]()(model, guide, x), params)
    want = torch.autograd.grad(_reconstruction_nll(model, guide, x), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    first_encoder_weight = len(list(model.parameters()))
    assert params[first_encoder_weight] is guide.encoder[0].weight and got[first_encoder_weight].abs().sum() > 0


def test_generation_draws_z_from_the_standard_normal():
    model, _ = _pair()
    torch.manual_seed(0)
    tr = _trace(model, None, batch_size=4000)
    z = tr.nodes["z"]["value"]
    assert z.shape == (4000, 3) and tr.nodes["x"]["value"].shape == (4000, 20)
    assert z.mean(0).abs().max() < 0.1 and (z.std(0) - 1).abs().max() < 0.1


def test_importance_weights_are_the_reconstruction_term_so_no_likelihood_is_claimed():
    """With the prior masked and a point-mass proposal, every importance weight is log p(x | encoder(x)):
    the IS 'log-likelihood' would be the reconstruction term for any K. The flags say so."""
    model, guide = _pair()
    x = _x(4)
    lw, _ = log_weights(model, guide, 5, x)
    per_point = torch.distributions.Bernoulli(logits=model.decoder(guide.encoder(x))).log_prob(x).sum(-1)
    assert torch.allclose(lw, per_point.expand(5, 4), atol=1e-5)
    assert Autoencoder.has_likelihood is False and PointGuide.has_density is False


def test_generator_log_likelihood_is_the_monte_carlo_mixture():
    """log (1/S) sum_s p(x | z_s), checked against the decoder applied by hand."""
    model, _ = _pair()
    data = ArrayDataset(_x(7).numpy(), binarize="none")
    z = torch.randn(11, 3)
    got = generator_log_likelihood(model, {"z": z}, data, max_pairs=20)  # chunks of 2 draws x 7 points
    x = data._x
    lp = torch.distributions.Bernoulli(logits=model.decoder(z)[:, None]).log_prob(x).sum(-1)  # (11, 7)
    want = torch.logsumexp(lp.double(), 0) - math.log(11)
    assert got.shape == (7,) and torch.allclose(got, want, atol=1e-5)


def test_decode_gives_the_decoder_mean_of_the_data_site():
    model, _ = _pair()
    z = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(decode(model, {"z": z}), torch.sigmoid(model.decoder(z)), atol=1e-6)


def test_support_fraction():
    torch.manual_seed(0)
    ref, cal, fresh = torch.randn(400, 2), torch.randn(400, 2), torch.randn(2000, 2)
    assert abs(support_fraction(fresh, ref, cal) - 0.95) < 0.04  # same distribution: about the quantile
    assert support_fraction(fresh + 10.0, ref, cal) == 0.0        # far away: none
    assert support_fraction(0.3 * fresh, ref, cal) == 1.0         # the dense core: all


def test_fit_gaussian_and_codes_of_a_point_guide():
    model, guide = _pair()
    data = ArrayDataset(_x(50).numpy(), binarize="none")
    c = codes(model, guide, data)
    with torch.no_grad():
        assert torch.allclose(c, guide.encoder(data._x).double(), atol=1e-6)
    assert torch.equal(codes(model, guide, data, mean=False), c)  # a point mass: the draw is the mean
    g = fit_gaussian(c)
    assert torch.allclose(g.loc, c.mean(0)) and torch.allclose(g.covariance_matrix, torch.cov(c.T), atol=1e-6)
    assert prior_latents(model, 9, ["z"])["z"].shape == (9, 3)


def test_generation_separates_a_trained_vae_from_a_trained_autoencoder():
    """Same data, nets and budget. Decoding N(0, I) draws: the VAE scores held-out data as well as when it
    decodes a Gaussian fitted to its codes; the autoencoder scores far worse, and recovers most of it with
    the fitted Gaussian. Prior draws and the autoencoder's codes overlap little, either way."""
    images, labels = prototype_images(600)
    train, test = ArrayDataset(images[:500], labels[:500]), ArrayDataset(images[500:], labels[500:])
    net = {"x_dim": 64, "latent_dim": 2, "hidden": (32,), "activation": "relu"}
    out = {}
    for model_name, guide_name in [("vae", "diagonal-normal"), ("autoencoder", "point")]:
        torch.manual_seed(0)
        model = MODELS[model_name](MODELS[model_name].Config(**net))
        guide = GUIDES[guide_name](GUIDES[guide_name].Config(**net))
        fit(model, guide, ESTIMATORS["elbo"](), train, None,
            TrainConfig(epochs=10, batch_size=50, lr=1e-2, seed=0), quiet=True)
        out[model_name] = generation_report(model, guide, train, test, num_samples=200)
    vae, ae = out["vae"], out["autoencoder"]

    def mean_se(a):
        return float(a.mean()), float(a.std() / math.sqrt(len(a)))

    worse, se = mean_se(vae.prior_log_likelihood - ae.prior_log_likelihood)
    assert worse > max(1.5, 5 * se)
    ae_gap, ae_se = mean_se(ae.fitted_log_likelihood - ae.prior_log_likelihood)
    vae_gap, _ = mean_se(vae.fitted_log_likelihood - vae.prior_log_likelihood)
    assert ae_gap > max(1.5, 5 * ae_se) and abs(vae_gap) < 1.0
    assert vae.prior_in_support - ae.prior_in_support > 0.15
    # and the prior reaches nearly all of the VAE's codes, but few of the autoencoder's
    assert vae.codes_in_prior_support > 0.8 and ae.codes_in_prior_support < 0.4


def test_cli_autoencoder_run_says_there_is_no_log_likelihood(fake_dataset, capsys, tmp_path):
    from pyro_vae.cli import main
    run = tmp_path / "ae"
    code = main(["train", "--dataset", fake_dataset, "--model", "autoencoder", "--guide", "point", "--latent-dim",
                 "2", "--hidden", "16", "--activation", "relu", "--epochs", "1", "--quiet", "--out", str(run)])
    out = capsys.readouterr().out
    assert code == 0 and "no test log-likelihood: Autoencoder defines no p(x)" in out
    assert json.loads((run / "evaluation.json").read_text())["log_likelihood"] is None
    assert main(["evaluate", str(run), "--quiet"]) == 0
    assert "no test log-likelihood" in capsys.readouterr().out
