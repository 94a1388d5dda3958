"""M2's guide computes what its concatenated network defines; labeled batches can be oversampled."""
import json

import pyro.poutine as poutine
import pytest
import torch
from conftest import prototype_images
from test_cli import TINY, one_line_error, run_cli

from pyro_vae.data import ArrayDataset
from pyro_vae.data.semi_supervised import PartiallyLabeled
from pyro_vae.errors import UserError
from pyro_vae.estimators import EnumELBO
from pyro_vae.guides import M2Guide
from pyro_vae.models import M2
from pyro_vae.models.cvae import one_hot_like
from pyro_vae.nets import split_loc_scale

NET = {"x_dim": 64, "latent_dim": 3, "hidden": (16,), "num_classes": 4}


@pytest.mark.parametrize("hidden", [(16,), (16, 8), ()])
@pytest.mark.parametrize("y_shape", ["labeled", "enumerated", "particles"])
def test_guide_encoder_equals_the_concatenated_network(hidden, y_shape):
    """q(z|x,y) is encoder([x, onehot y]); the guide's split first layer must give the same numbers."""
    g = M2Guide(M2Guide.Config(**{**NET, "hidden": hidden}))
    x = torch.rand(5, 64)
    y = {"labeled": torch.tensor([0, 3, 1, 2, 3]), "enumerated": torch.arange(4).view(4, 1),
         "particles": torch.randint(0, 4, (2, 1, 5))}[y_shape]
    batch = torch.broadcast_shapes(y.shape, x.shape[:-1])
    concatenated = g.encoder(torch.cat([x.expand(*batch, 64), one_hot_like(y, 4, batch)], -1))
    split = g._encode(x, y)
    assert split.shape == concatenated.shape == (*batch, 6)
    assert torch.allclose(split, concatenated, atol=1e-6)
    # and the guide's z site uses it: its location is the first half for the given labels
    tr = poutine.trace(g).get_trace(x, torch.tensor([0, 3, 1, 2, 3]))
    loc, _ = split_loc_scale(g.encoder(torch.cat([x, one_hot_like(torch.tensor([0, 3, 1, 2, 3]), 4, (5,))], -1)))
    assert torch.allclose(tr.nodes["z"]["fn"].base_dist.loc, loc, atol=1e-6)


def test_enumerated_loss_and_gradients_equal_the_concatenated_form(monkeypatch):
    m, g = M2(M2.Config(**NET)), M2Guide(M2Guide.Config(**NET, aux_weight=2.0))
    x = torch.bernoulli(torch.rand(6, 64))

    def loss_and_grads(y=None):
        g.zero_grad()
        m.zero_grad()
        torch.manual_seed(0)
        loss = EnumELBO()(m, g, x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in g.parameters()]

    for y in (None, torch.tensor([0, 1, 2, 3, 0, 1])):
        split = loss_and_grads(y)
        with monkeypatch.context() as mp:
            def concatenated(self, x, y):
                batch = torch.broadcast_shapes(y.shape, x.shape[:-1])
                return self.encoder(torch.cat([x.expand(*batch, 64), one_hot_like(y, 4, batch)], -1))
            mp.setattr(M2Guide, "_encode", concatenated)
            reference = loss_and_grads(y)
        assert torch.allclose(split[0], reference[0], rtol=1e-5)
        for a, b in zip(split[1], reference[1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert any(float(a.abs().sum()) > 0 for a in split[1])


def _part(labeled_every, n_labeled=12, n=300):
    images, labels = prototype_images(n, classes=4)
    return PartiallyLabeled(ArrayDataset(images, labels, binarize="none"), n_labeled, seed=1,
                            labeled_every=labeled_every)


def test_oversampling_places_a_labeled_batch_after_every_k_unlabeled():
    part = _part(labeled_every=2)
    batches = list(part.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    kinds = "".join("L" if y is not None else "U" for _, y in batches)
    unlabeled = -(-(300 - 12) // 32)  # 9 unlabeled batches
    assert kinds == "UUL" * (unlabeled // 2) + "U" * (unlabeled % 2)
    labeled = [(x, y) for x, y in batches if y is not None]
    # 4 labeled batches of all 12 labeled points each: every pass serves each labeled point once
    assert [len(x) for x, _ in labeled] == [12] * 4
    known = {tuple(r.tolist()) for r in part.labeled.data}
    for x, y in labeled:
        assert {tuple(r.tolist()) for r in x} == known
        assert torch.bincount(y, minlength=4).tolist() == [3, 3, 3, 3]
    # passes are reshuffled, and the unlabeled points are still each served once
    assert not all(torch.equal(labeled[0][0], x) for x, _ in labeled[1:])
    assert sum(len(x) for x, y in batches if y is None) == 288
    again = list(part.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_oversampling_cycles_a_labeled_set_larger_than_a_batch():
    part = _part(labeled_every=1, n_labeled=40)
    labeled = [(x, y) for x, y in part.batches(16, shuffle=True, generator=torch.Generator().manual_seed(2))
               if y is not None]
    # 260 unlabeled points: 17 batches, so 17 labeled ones of sizes 16, 16, 8 (a pass of 40), repeated
    assert [len(x) for x, _ in labeled] == ([16, 16, 8] * 6)[:17]
    first_pass = torch.cat([x for x, _ in labeled[:3]])
    assert len({tuple(r.tolist()) for r in first_pass}) == 40


def test_default_schedule_unchanged_and_bad_labeled_every_refused():
    default = [y is not None for _, y in _part(None).batches(32, shuffle=True,
                                                             generator=torch.Generator().manual_seed(0))]
    assert sum(default) == 1  # 12 labels in batches of 32: one labeled batch per epoch
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="labeled_every must be a positive integer"):
            _part(bad)


def test_cli_labeled_every_schedules_the_run(fake_dataset, capsys, tmp_path):
    m2 = ["--model", "m2", "--guide", "m2", "--estimator", "enum-elbo", "--aux-weight", "5"]
    one_line_error(capsys, "train", *TINY, *m2, "--labeled-every", "2", "--out", tmp_path / "a",
                   match="give --labeled N")
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    code, out, err = run_cli(capsys, "train", *TINY, *m2, "--labeled", "20", "--labeled-every", "3",
                             "--epochs", "1", "--out", tmp_path / "b")
    assert code == 0, err
    spec = json.loads((tmp_path / "b" / "config.json").read_text())["spec"]
    assert spec["data"]["labeled_every"] == 3
    # 580 unlabeled points in batches of 50: 12 unlabeled and 4 labeled steps (of all 20 labels each)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 16
    assert "test accuracy" in out
