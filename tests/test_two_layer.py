"""The two-stochastic-layer VAE of Burda et al. (2016) and its hierarchical guide, with every estimator."""
import math
import warnings

import pyro
import pyro.optim
import pytest
import torch
from conftest import SMALL_NET, prototype_images
from pyro.infer import SVI

from pyro_vae.cli.runs import make_component
from pyro_vae.estimators import ELBO, ESTIMATORS, AnalyticKL
from pyro_vae.estimators._checks import PyroVaeWarning
from pyro_vae.guides import GUIDES, TwoLayerGuide
from pyro_vae.models import MODELS, TwoLayerVAE
from pyro_vae.programs.sites import _trace, check_pairing, latent_sites

SMALL = {**SMALL_NET, "x_dim": 64, "z1_dim": 8, "top_hidden": [16]}


def build(options=SMALL):
    return (make_component(MODELS, "two-layer-vae", "model", options),
            make_component(GUIDES, "two-layer", "guide", options))


def binary_images(n):
    images, _ = prototype_images(n)
    return torch.bernoulli(torch.as_tensor(images.reshape(n, -1) / 255.0, dtype=torch.float32))


def linear_sizes(net):
    return [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]


def test_default_sizes_are_burda_et_al_two_layer_architecture():
    model, guide = TwoLayerVAE(), TwoLayerGuide()
    assert linear_sizes(guide.z1_net) == [(784, 200), (200, 200), (200, 2 * 100)]  # loc and scale of z1
    assert linear_sizes(guide.z2_net) == [(100, 100), (100, 100), (100, 2 * 50)]
    assert linear_sizes(model.z1_net) == [(50, 100), (100, 100), (100, 2 * 100)]
    assert linear_sizes(model.decoder) == [(100, 200), (200, 200), (200, 784)]
    nets = (guide.z1_net, guide.z2_net, model.z1_net, model.decoder)
    assert all(isinstance(m, torch.nn.Tanh) for net in nets for m in net[1::2])


def test_network_options_set_the_top_latent_and_the_x_side_hidden_layers():
    model, guide = build()
    assert linear_sizes(guide.z1_net) == [(64, 32), (32, 16)] and linear_sizes(guide.z2_net) == [(8, 16), (16, 8)]
    assert linear_sizes(model.z1_net) == [(4, 16), (16, 16)] and linear_sizes(model.decoder) == [(8, 32), (32, 64)]
    x = binary_images(5)
    check_pairing(model, guide, x)
    tr = _trace(guide, x)
    assert latent_sites(tr) == ["z1", "z2"]
    assert tr.nodes["z1"]["value"].shape == (5, 8) and tr.nodes["z2"]["value"].shape == (5, 4)
    prior = _trace(model, None, batch_size=7)
    assert prior.nodes["x"]["value"].shape == (7, 64) and set(prior.nodes["x"]["value"].unique().tolist()) <= {0.0, 1.0}
    assert [f.dim for f in prior.nodes["z1"]["cond_indep_stack"]] == [-1]


def elbo_per_point(model, guide, x, particles=200):
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)  # the same draws before and after training
        return -ELBO(num_particles=particles)(model, guide, x).item() / len(x)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_trains_the_two_layer_pair(name):
    model, guide = build()
    x = binary_images(400)
    before = elbo_per_point(model, guide, x)
    losses = []
    with pyro.get_param_store().scope(), warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("error")  # e.g. analytic-kl must not fall into Pyro's biased closed form here
        warnings.simplefilter("always", PyroVaeWarning)  # ... and says once that it takes the Monte Carlo KL
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), loss=ESTIMATORS[name]())
        for step in range(40):
            batch = x[(step % 8) * 50:(step % 8 + 1) * 50]
            losses.append(svi.step(batch))
    expected = ["samples its latents in another order"] if name == "analytic-kl" else []
    assert len(said) == len(expected) and all(e in str(w.message) for e, w in zip(expected, said)), said
    assert all(math.isfinite(v) for v in losses), (name, losses)
    after = elbo_per_point(model, guide, x)
    assert after > before + 8.0, (name, before, after)  # nats per point; each gains 11 to 15 here


def test_analytic_kl_takes_the_monte_carlo_kl_for_a_bottom_up_guide():
    """The guide samples z1 before z2, the model z2 before z1: closed-form KLs given later latents would be
    biased, so analytic-kl must give exactly the elbo estimator's value on the same draw."""
    model, guide = build()
    x = binary_images(20)
    estimator = AnalyticKL()
    estimator(model, guide, x)  # the first call finds the order out, with draws of its own
    torch.manual_seed(4)
    analytic = estimator(model, guide, x)
    torch.manual_seed(4)
    monte_carlo = ELBO()(model, guide, x)
    assert torch.equal(analytic, monte_carlo)
