"""Label-using models: the conditional VAE, beta-VAE's KL weight, M2's enumeration, semi-supervised data."""
import json
import math

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from conftest import prototype_images
from test_cli import TINY, one_line_error, run_cli

from pyro_vae.analysis.evaluation import classification_accuracy
from pyro_vae.data import ArrayDataset
from pyro_vae.data.semi_supervised import PartiallyLabeled
from pyro_vae.errors import UserError
from pyro_vae.estimators import ELBO, AnalyticKL, EnumELBO
from pyro_vae.guides import DiagonalNormalGuide, M2Guide
from pyro_vae.models import M2, BetaVAE, ConditionalVAE
from pyro_vae.programs.labels import check_labels, sample_kwargs
from pyro_vae.training.config import TrainConfig
from pyro_vae.training.fit import fit

NET = {"x_dim": 64, "latent_dim": 3, "hidden": (16,)}


def test_cvae_samples_follow_the_conditioning_shape():
    model = ConditionalVAE(ConditionalVAE.Config(**NET, num_classes=4))
    kw = sample_kwargs(model, 6, label=2)
    assert kw["y"].tolist() == [2] * 6
    tr = poutine.trace(model).get_trace(None, batch_size=6, **kw)
    assert tr.nodes["x"]["value"].shape == (6, 64) and tr.nodes["z"]["value"].shape == (6, 3)
    # the class picks the prior: move class 2's mean and the draws follow it
    with torch.no_grad():
        model.prior_loc[2] = 50.0
    z = poutine.trace(model).get_trace(None, batch_size=6, **kw).nodes["z"]["value"]
    assert (z > 40).all()
    assert sample_kwargs(model, 8)["y"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.zeros(5, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="out of range"):
        sample_kwargs(model, 4, label=4)


def test_label_checks_name_the_problem():
    cvae = ConditionalVAE(ConditionalVAE.Config(**NET, num_classes=4))
    with pytest.raises(UserError, match="needs a label for every data point, but the data has none"):
        check_labels(cvae, None)
    with pytest.raises(UserError, match="2 missing"):
        check_labels(cvae, torch.tensor([0, -1, 1, -1]))
    with pytest.raises(UserError, match=r"labels in \[0, 7\].*4 classes"):
        check_labels(cvae, torch.tensor([0, 7]))
    m2 = M2(M2.Config(**NET, num_classes=4))
    check_labels(m2, torch.tensor([0, -1, 3]))  # hidden labels are fine for a semi-supervised model
    with pytest.raises(UserError, match="semi-supervised and needs some labeled points"):
        check_labels(m2, torch.full((5,), -1), training=True)


def test_beta_weights_exactly_the_kl_in_both_elbo_estimators():
    beta = 3.0
    model = BetaVAE(BetaVAE.Config(**NET, beta=beta))
    guide = DiagonalNormalGuide(DiagonalNormalGuide.Config(**NET))
    x = torch.bernoulli(torch.full((7, 64), 0.4))
    torch.manual_seed(1)
    loss = ELBO()(model, guide, x)
    torch.manual_seed(1)
    g = poutine.trace(guide).get_trace(x)
    m = poutine.trace(poutine.replay(model, trace=g)).get_trace(x)
    recon = m.nodes["x"]["fn"].log_prob(x).sum()
    z = g.nodes["z"]["value"]
    kl_mc = (g.nodes["z"]["fn"].log_prob(z) - m.nodes["z"]["fn"].log_prob(z)).sum()
    assert torch.allclose(loss, -(recon - beta * kl_mc), rtol=1e-5)
    torch.manual_seed(1)
    loss = AnalyticKL()(model, guide, x)
    kl = torch.distributions.kl_divergence(g.nodes["z"]["fn"], m.nodes["z"]["fn"]).sum()
    assert torch.allclose(loss, -(recon - beta * kl), rtol=1e-5)


def test_kl_warmup_rises_linearly_to_beta():
    model = BetaVAE(BetaVAE.Config(**NET, beta=2.0, kl_warmup_steps=4))
    seen = []
    for step in range(6):
        model.set_step(step)
        seen.append(model.kl_scale)
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def _m2_pair(aux_weight=0.0, net=NET):
    m = M2(M2.Config(**net, num_classes=4))
    g = M2Guide(M2Guide.Config(**net, num_classes=4, aux_weight=aux_weight))
    return m, g


def test_m2_enumeration_is_the_exact_sum_over_labels():
    """Unlabeled loss = sum_y q(y|x) * labeled loss(x, y) + sum_y q(y|x) log q(y|x), up to the z draws' noise."""
    m, g = _m2_pair()
    x = torch.bernoulli(torch.full((3, 64), 0.3))
    draws = 400
    with torch.no_grad():
        enum = torch.stack([EnumELBO()(m, g, x) for _ in range(draws)])
        q = torch.softmax(g.classifier(x), -1)  # (3, 4)
        labeled = torch.stack([torch.stack([torch.stack([ELBO()(m, g, x[i:i + 1], torch.tensor([c]))
                                                         for c in range(4)]) for i in range(3)])
                               for _ in range(draws)])  # (draws, 3, 4)
    exact_part = (q * q.log()).sum()
    expected = (q * labeled).sum((1, 2)) + exact_part
    diff = enum.mean() - expected.mean()
    se = math.sqrt(enum.var() / draws + expected.var() / draws)
    assert torch.isfinite(enum).all()
    assert abs(diff) < 4 * se, (diff, se)
    # the check has power: dropping the entropy term is many SE off
    assert abs(enum.mean() - (expected.mean() - exact_part)) > 10 * se


def test_m2_aux_weight_adds_the_classification_loss():
    m, g = _m2_pair(aux_weight=5.0)
    m0, g0 = _m2_pair()
    g0.load_state_dict(g.state_dict())
    m0.load_state_dict(m.state_dict())
    x, y = torch.bernoulli(torch.full((6, 64), 0.3)), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(3)
    with_aux = EnumELBO()(m, g, x, y)
    torch.manual_seed(3)
    without = EnumELBO()(m0, g0, x, y)
    nll = -torch.distributions.Categorical(logits=g.classifier(x)).log_prob(y).sum()
    assert torch.allclose(with_aux - without, 5.0 * nll, rtol=1e-5)


def test_partially_labeled_epoch_serves_every_point_once():
    images, labels = prototype_images(300, classes=4)
    data = ArrayDataset(images, labels, binarize="none")
    part = PartiallyLabeled(data, 20, seed=1)
    assert int((part.labels >= 0).sum()) == 20
    assert torch.bincount(part.labels[part.labels >= 0]).tolist() == [5, 5, 5, 5]
    batches = list(part.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    labeled = [b for b in batches if b[1] is not None]
    assert sum(len(x) for x, _ in batches) == len(part) == 300
    assert sum(len(x) for x, _ in labeled) == 20 and batches[0][1] is None
    rows = {tuple(r.tolist()) for x, _ in batches for r in x}
    assert len(rows) == len({tuple(r.tolist()) for r in data.data})  # no point twice, none missing
    again = list(part.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    with pytest.raises(UserError, match="between 4"):
        PartiallyLabeled(data, 3)


def test_m2_learns_a_classifier_from_few_labels():
    images, labels = prototype_images(1200, classes=4)
    train = PartiallyLabeled(ArrayDataset(images[:1000], labels[:1000]), 8, seed=0)
    test = ArrayDataset(images[1000:], labels[1000:])
    m, g = _m2_pair(aux_weight=10.0, net={"x_dim": 64, "latent_dim": 4, "hidden": (32,)})
    before = classification_accuracy(m, g, test)
    fit(m, g, EnumELBO(), train, None, TrainConfig(epochs=5, batch_size=50, device="cpu"), quiet=True)
    after = classification_accuracy(m, g, test)
    # 200 test points, chance is 1/4: 0.7 is far outside what a guess or the untrained net gets
    assert after > 0.7 and after > before + 0.3, (before, after)


def test_cli_conditional_run_samples_a_class(fake_dataset, capsys, tmp_path):
    run = tmp_path / "cvae"
    code, out, err = run_cli(capsys, "train", *TINY, "--model", "cvae", "--guide", "conditional",
                             "--epochs", "1", "--out", run)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["spec"]["model"] == "cvae"
    code, out, err = run_cli(capsys, "sample", run, "--label", "3", "--num", "8", "--out", tmp_path / "three.png")
    assert code == 0 and (tmp_path / "three.png").stat().st_size > 500, err
    one_line_error(capsys, "sample", run, "--label", "9", match="label 9 is out of range")


def test_cli_label_mistakes_get_one_line(fake_dataset, capsys, tmp_path):
    run = tmp_path / "vae"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    one_line_error(capsys, "sample", run, "--label", "1", match="not conditioned on labels")
    one_line_error(capsys, "train", *TINY, "--model", "vae", "--guide", "conditional", "--out", tmp_path / "b",
                   match="ConditionalGuide does not fit BernoulliVAE")
    one_line_error(capsys, "train", *TINY, "--labeled", "2", "--model", "m2", "--guide", "m2",
                   "--estimator", "enum-elbo", "--out", tmp_path / "c", match="need between")


def test_cli_conditional_model_on_unlabeled_data(capsys, tmp_path):
    images, _ = prototype_images(300)
    path = tmp_path / "unlabeled.npz"
    np.savez(path, x_train=images[:200], x_test=images[200:])
    one_line_error(capsys, "train", "--dataset", "npz", "--data-root", path, "--model", "cvae", "--guide",
                   "conditional", "--latent-dim", "2", "--hidden", "8", "--quiet", "--out", tmp_path / "r",
                   match="needs a label for every data point, but the training data has none")
    one_line_error(capsys, "train", "--dataset", "npz", "--data-root", path, "--model", "m2", "--guide", "m2",
                   "--estimator", "enum-elbo", "--latent-dim", "2", "--hidden", "8", "--quiet",
                   "--out", tmp_path / "s", match="semi-supervised")


def test_plots_summarize_discrete_latents_by_mode_and_decode_means():
    from pyro_vae.plots.run import decode, posterior_means
    m, g = _m2_pair()
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    means = posterior_means(g, x)
    assert means["y"].dtype == torch.long
    assert torch.equal(means["y"], g.classifier(x).argmax(-1))
    images = decode(m, means, 5, ["x"])
    assert images.shape == (5, 64) and ((images > 0.01) & (images < 0.99)).any()  # means, not 0/1 draws
