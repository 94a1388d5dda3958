"""Every model x guide pair: matching site names, a finite loss of the right shape, clear pairing errors."""
import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_vae.errors import UserError
from pyro_vae.estimators import ELBO
from pyro_vae.guides import GUIDES
from pyro_vae.models import MODELS
from pyro_vae.runs import make_component
from pyro_vae.sites import _trace, check_data_fits, check_pairing, latent_sites

from conftest import SMALL_NET

PAIRS = list(itertools.product(sorted(MODELS), sorted(GUIDES)))


def build(model_name, guide_name, x_dim=64):
    opts = {**SMALL_NET, "x_dim": x_dim}
    return make_component(MODELS, model_name, "model", opts), make_component(GUIDES, guide_name, "guide", opts)


@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_pair_sites_match_and_loss_is_finite(model_name, guide_name):
    model, guide = build(model_name, guide_name)
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    check_pairing(model, guide, x)
    assert set(latent_sites(_trace(model, x))) == set(latent_sites(_trace(guide, x)))
    loss = ELBO()(model, guide, x)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_data_plate_is_dim_minus_one_and_prior_sampling_works(model_name):
    model, _ = build(model_name, sorted(GUIDES)[0])
    tr = _trace(model, torch.zeros(3, 64))
    frames = {f.name: f.dim for s in tr.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]}
    assert frames["data"] == -1
    prior = _trace(model, None, batch_size=7)
    assert all(prior.nodes[n]["value"].shape[0] == 7 for n in latent_sites(prior))


class _OtherSiteGuide(PyroModule):
    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("w", dist.Normal(torch.zeros(x.shape[0], 4), 1.0).to_event(1))


def test_pairing_error_names_missing_and_extra_sites():
    model, _ = build("vae", "diagonal-normal")
    with pytest.raises(UserError, match=r"no site for the model's latent\(s\) z.*samples w"):
        check_pairing(model, _OtherSiteGuide(), torch.zeros(2, 64))


def test_bernoulli_likelihood_rejects_grayscale_and_wrong_width():
    model, _ = build("vae", "diagonal-normal")
    with pytest.raises(UserError, match="outside the support"):
        check_data_fits(model, torch.full((2, 64), 0.5))
    with pytest.raises(UserError, match=r"data of shape \(10,\)"):
        check_data_fits(model, torch.zeros(2, 10))


def test_unknown_component_lists_known_names():
    with pytest.raises(UserError, match=r"known: .*\bvae\b"):
        make_component(MODELS, "vea", "model", {})
