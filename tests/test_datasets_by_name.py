"""Image datasets by name through torchvision: layouts, labels, the offline error, all without a network."""
import socket
import struct

import numpy as np
import pytest
import torch
import torchvision

from pyro_vae import data
from pyro_vae.cli import main
from pyro_vae.cli.parser import build_parser as _parser
from pyro_vae.data import DATASETS, TORCHVISION_DATASETS, load_dataset, load_mnist
from pyro_vae.errors import UserError
from pyro_vae.plots import run as plots


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# How each torchvision class holds its arrays (read from torchvision's sources): the per-image shape,
# whether data/labels are tensors, and the attribute that holds the labels.
LAYOUTS = {
    "FashionMNIST": ((28, 28), True, "targets"),
    "KMNIST": ((28, 28), True, "targets"),
    "CIFAR10": ((32, 32, 3), False, "targets"),
    "CIFAR100": ((32, 32, 3), False, "targets"),
    "SVHN": ((3, 32, 32), False, "labels"),
    "USPS": ((16, 16), False, "targets"),
    "STL10": ((3, 96, 96), False, "labels"),
}
SIZES = {True: 6, False: 4}  # train, test


def arrays(cls, train):
    shape, _, _ = LAYOUTS[cls]
    rng = np.random.default_rng(1 if train else 2)
    n = SIZES[train]
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 10, size=n)


def fake_class(cls, calls, fail=lambda download: False):
    """A stand-in for torchvision.datasets.<cls>: records (train, download) and serves generated arrays."""
    shape, tensors, label_attr = LAYOUTS[cls]

    class Fake:
        def __init__(self, root, train=None, split=None, download=False):
            assert (train is None) != (split is None)  # the class's own way of picking a split
            is_train = train if split is None else {"train": True, "test": False}[split]
            calls.append((is_train, download))
            if fail(download):
                raise RuntimeError("Dataset not found. You can use download=True to download it" if not download
                                   else "Error downloading: <urlopen error [Errno -2] Name or service not known>")
            x, y = arrays(cls, is_train)
            self.data = torch.from_numpy(x) if tensors else x
            setattr(self, label_attr, torch.from_numpy(y) if tensors
                    else (y if label_attr == "labels" else y.tolist()))

    return Fake


NAMES = [d.name for d in TORCHVISION_DATASETS]
CLASSES = {d.name: d.cls for d in TORCHVISION_DATASETS}


@pytest.mark.parametrize("name", NAMES)
def test_each_dataset_loads_with_its_layout_and_labels(name, monkeypatch, tmp_path):
    cls = CLASSES[name]
    calls = []
    monkeypatch.setattr(torchvision.datasets, cls, fake_class(cls, calls))
    train, test = load_dataset(name, tmp_path, binarize="none")
    shape = LAYOUTS[cls][0]
    for ds, is_train in ((train, True), (test, False)):
        x, y = arrays(cls, is_train)
        assert ds.image_shape == shape and plots.is_image(ds.image_shape)
        assert torch.equal(ds.data, torch.from_numpy(x.reshape(len(x), -1)).float() / 255)
        assert torch.equal(ds.labels, torch.from_numpy(y))
    assert calls == [(True, False), (False, False)]  # files present: torchvision is never asked to download


def test_missing_files_are_downloaded(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_class("CIFAR10", calls, fail=lambda dl: not dl))
    train, test = load_dataset("cifar10", tmp_path / "new")
    assert (len(train), len(test)) == (SIZES[True], SIZES[False])
    assert calls == [(True, False), (True, True), (False, False), (False, True)]
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("name,where", [("fashion-mnist", "t10k-labels-idx1-ubyte.gz in {root}/FashionMNIST/raw"),
                                        ("cifar10", "cifar-10-python.tar.gz in {root}"),
                                        ("svhn", "train_32x32.mat and test_32x32.mat in {root}")])
def test_offline_failure_is_one_line_saying_where_to_put_the_files(name, where, monkeypatch, tmp_path):
    cls = CLASSES[name]
    monkeypatch.setattr(torchvision.datasets, cls, fake_class(cls, [], fail=lambda dl: True))
    with pytest.raises(UserError) as err:
        load_dataset(name, tmp_path)
    message = str(err.value)
    assert message.startswith(f"could not download {name} (RuntimeError: Error downloading")
    assert where.format(root=tmp_path) in message and "\n" not in message


def test_cli_offers_the_names_and_reports_a_failed_download(monkeypatch, tmp_path, capsys):
    assert _parser().parse_args(["train", "--dataset", "fashion-mnist"]).dataset == "fashion-mnist"
    monkeypatch.setattr(torchvision.datasets, "KMNIST", fake_class("KMNIST", [], fail=lambda dl: True))
    code = main(["train", "--dataset", "kmnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # one line saying where the download goes, then the one-line error
    assert code == 2 and len(err) == 2 and "could not download kmnist" in err[1], err
    assert err[0] == f"pyro-vae: no kmnist in {tmp_path}; fetching it there"


def test_non_image_arrays_from_torchvision_are_refused(monkeypatch, tmp_path):
    class Odd:
        def __init__(self, root, train, download):
            self.data, self.targets = np.zeros((3, 5), np.float32), [0, 1, 2]

    monkeypatch.setattr(torchvision.datasets, "USPS", Odd)
    with pytest.raises(UserError, match=r"USPS in .* gave float32 \(3, 5\), not uint8 images"):
        load_dataset("usps", tmp_path)


def test_mnist_keeps_its_own_verified_loader():
    assert DATASETS["mnist"] is load_mnist
    assert {"mnist", "npz", "fashion-mnist", "kmnist", "cifar10", "svhn"} <= set(DATASETS)


def _idx(array):
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def test_real_torchvision_reads_fashion_mnist_files_in_place(tmp_path):
    """No fake: torchvision's own FashionMNIST reads idx files from root/FashionMNIST/raw, offline."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    split = {}
    for prefix, n in (("train", 5), ("t10k", 3)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
        split[prefix] = (x, y)
    train, test = data.DATASETS["fashion-mnist"](tmp_path)
    for got, (x, y) in ((train, split["train"]), (test, split["t10k"])):
        assert got.images.dtype == np.uint8 and np.array_equal(got.images, x)
        assert got.labels.dtype == np.int64 and np.array_equal(got.labels, y)
