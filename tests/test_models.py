"""Every model x guide pair: matching site names, a finite loss of the right shape, clear pairing errors."""
import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import SMALL_NET, prototype_images
from pyro.infer import SVI
from pyro.nn import PyroModule

from pyro_vae.cli.runs import make_component
from pyro_vae.data import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import EnumELBO
from pyro_vae.estimators._weights import log_weights
from pyro_vae.guides import GUIDES
from pyro_vae.models import MODELS
from pyro_vae.programs.labels import eval_kwargs, sample_kwargs, train_kwargs
from pyro_vae.programs.sites import _trace, check_data_fits, check_pairing, latent_sites
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit

# What each registered component samples, written out by hand from the docstrings: a new entry must be
# added here, and the tests below then check that its program really has these sites.
MODEL_LATENTS = {
    "vae": {"z"}, "beta-vae": {"z"}, "cvae": {"z"}, "m2": {"z", "y"}, "linear-gaussian": {"z"},
    "conv-vae": {"z"}, "gaussian-vae": {"z"}, "autoencoder": {"z"}, "two-layer-vae": {"z1", "z2"},
    "sbn": {"h"},
}
GUIDE_LATENTS = {
    "auto": None,  # built from the model: its latents are the model's
    "diagonal-normal": {"z"}, "conditional": {"z"}, "m2": {"z", "y"}, "linear-gaussian": {"z"}, "conv": {"z"},
    "iaf": {"z"}, "point": {"z"}, "two-layer": {"z1", "z2"}, "bernoulli": {"h"},
    "relaxed-bernoulli": {"h"},
}
NEEDS_LABELS = {"conditional"}  # guides that cannot run without labels
GIVEN_LABELS = {"m2": {"z"}}  # guides whose latents change when labels are given: y is then observed
REQUIRES_LABELS = {"cvae"}
PAIRS = list(itertools.product(sorted(MODELS), sorted(GUIDES)))
SHAPE = (8, 8)


def build(model_name, guide_name, x_dim=64, **extra):
    opts = {**SMALL_NET, "x_dim": x_dim, "image_shape": SHAPE, "num_classes": 4, **extra}
    model = make_component(MODELS, model_name, "model", opts)
    # a guide built from the model (the auto guide) reads it on a labeled training batch of binary data
    example = (torch.bernoulli(torch.full((6, x_dim), 0.5)), train_kwargs(model, torch.arange(6) % 4))
    return model, make_component(GUIDES, guide_name, "guide", opts, model=model, example=example)


def guide_latents(model_name, guide_name):
    if GUIDE_LATENTS[guide_name] is None:  # scored as the tests below score: the model's latents, all of them
        return MODEL_LATENTS[model_name]
    labeled = model_name in REQUIRES_LABELS
    return GIVEN_LABELS.get(guide_name, GUIDE_LATENTS[guide_name]) if labeled else GUIDE_LATENTS[guide_name]


def fits(model_name, guide_name):
    labels_ok = guide_name not in NEEDS_LABELS or model_name in REQUIRES_LABELS
    return MODEL_LATENTS[model_name] == guide_latents(model_name, guide_name) and labels_ok


def test_the_site_tables_cover_the_registries():
    assert set(MODEL_LATENTS) == set(MODELS) and set(GUIDE_LATENTS) == set(GUIDES)


@pytest.fixture(scope="module")
def pair_data():
    images, labels = prototype_images(700, side=SHAPE[0])
    binary = (images > 127).astype("float32")  # fixed binary data: in the support of every likelihood here
    return (ArrayDataset(binary[:600], labels[:600], binarize="none", image_shape=SHAPE),
            ArrayDataset(binary[600:], labels[600:], binarize="none", image_shape=SHAPE))


@pytest.mark.parametrize("model_name,guide_name", PAIRS)
def test_every_pair_matches_sites_or_is_refused_clearly(model_name, guide_name, pair_data):
    model, guide = build(model_name, guide_name)
    x, y = next(pair_data[1].batches(5, shuffle=False, generator=torch.Generator()))
    kw = eval_kwargs(model, y)  # labels where required; a model with optional labels gets none: y is latent
    assert set(latent_sites(_trace(model, x, **kw))) == MODEL_LATENTS[model_name]
    if not fits(model_name, guide_name):
        with pytest.raises(UserError, match=f"{type(guide).__name__} does not fit {type(model).__name__}"):
            check_pairing(model, guide, x, **kw)
        return
    check_pairing(model, guide, x, **kw)
    assert set(latent_sites(_trace(guide, x, **kw))) == guide_latents(model_name, guide_name)
    # one SVI step through the trainer's estimator: a finite scalar loss, and the parameters move
    before = [p.detach().clone() for p in [*model.parameters(), *guide.parameters()]]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=EnumELBO())
    with pyro.get_param_store().scope():
        loss = svi.step(x, **kw)
    assert isinstance(loss, float) and math.isfinite(loss)
    after = [*model.parameters(), *guide.parameters()]
    assert any(not torch.equal(b, a) for b, a in zip(before, after))


@torch.no_grad()
def per_point_elbo(model, guide, data, k=8):
    """Mean over k draws of log p(x, z) - log q(z|x) per point (for the autoencoder: its reconstruction term)."""
    x, y = next(data.batches(len(data), shuffle=False, generator=torch.Generator()))
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(0)
        return log_weights(model, guide, k, x, **eval_kwargs(model, y))[0].mean(0).numpy()


@pytest.mark.parametrize("model_name,guide_name", [p for p in PAIRS if fits(*p)])
def test_a_short_run_improves_the_elbo(model_name, guide_name, pair_data):
    train, test = pair_data
    model, guide = build(model_name, guide_name)
    start = per_point_elbo(model, guide, test)
    fit(model, guide, EnumELBO(), train, None, TrainConfig(epochs=4, batch_size=50, lr=1e-2, device="cpu"),
        quiet=True)
    end = per_point_elbo(model, guide, test)
    gain = end - start  # per test point, paired
    assert gain.mean() > 5 * gain.std() / math.sqrt(len(gain)) and gain.mean() > 1.0, (start.mean(), end.mean())


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_data_plate_is_dim_minus_one_and_prior_sampling_works(model_name):
    model, _ = build(model_name, sorted(GUIDES)[0])
    kw = train_kwargs(model, torch.zeros(3, dtype=torch.long))
    tr = _trace(model, torch.zeros(3, 64), **kw)
    frames = {f.name: f.dim for s in tr.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]}
    assert frames["data"] == -1
    prior = _trace(model, None, batch_size=7, **sample_kwargs(model, 7))
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
