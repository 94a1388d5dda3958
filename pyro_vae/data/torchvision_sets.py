"""Other image datasets, loaded whole through torchvision."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_vae.errors import UserError

from .arrays import Split
from .arrays import one_line as _one_line


@dataclass(frozen=True)
class TorchvisionImages:
    """A torchvision image dataset, loaded whole into memory as (train, test) Splits.

    Files already under the data root are used as they are (torchvision checks them, no network);
    missing ones are downloaded by torchvision. Images keep torchvision's uint8 layout, which
    ArrayDataset records as image_shape: (N, H, W) for the MNIST family and USPS, (N, H, W, 3) for
    CIFAR, (N, 3, H, W) for SVHN and STL-10. Labels are int64 (N,).
    """

    name: str    # the --dataset name
    cls: str     # the class in torchvision.datasets
    split: str   # how the class picks a split: "train" (train=True/False) or "split" (split="train"/"test")
    files: str   # what to put where, relative to the data root, when there is no network

    def __call__(self, root: Path) -> tuple[Split, Split]:
        return self._load(Path(root), True), self._load(Path(root), False)

    def _open(self, root: Path, train: bool):
        import torchvision

        cls = getattr(torchvision.datasets, self.cls)
        kwargs = {"train": train} if self.split == "train" else {"split": "train" if train else "test"}
        try:
            return cls(str(root), download=False, **kwargs)
        except Exception:  # missing or incomplete files: let torchvision fetch them
            pass
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the data folder {root} ({_one_line(e)})") from None
        if train:  # once per dataset, before the download: where it goes
            print(f"pyro-vae: no {self.name} in {root}"
                  f"{' (a folder just created: check --data-root)' if created else ''}; fetching it there",
                  file=sys.stderr)
        try:
            return cls(str(root), download=True, **kwargs)
        except Exception as e:
            raise UserError(f"could not download {self.name} ({_one_line(e)}); without a network, put "
                            f"{self.files.format(root=root)} and run again") from None

    def _load(self, root: Path, train: bool) -> Split:
        ds = self._open(root, train)
        images = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = getattr(ds, "targets", None)
        labels = getattr(ds, "labels", None) if labels is None else labels
        if labels is not None:
            labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
            labels = labels[:, 0] if labels.ndim == 2 else labels  # QMNIST-style rows: the class comes first
            if labels.shape != (len(images),) or (labels < 0).all():  # -1 everywhere: an unlabeled split
                labels = None
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise UserError(f"torchvision's {self.cls} in {root} gave {images.dtype} {images.shape}, "
                            "not uint8 images (N, H, W[, C])")
        return Split(np.ascontiguousarray(images), labels)


_IDX_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
              "t10k-labels-idx1-ubyte.gz")
TORCHVISION_DATASETS = (
    TorchvisionImages("fashion-mnist", "FashionMNIST", "train", f"{_IDX_FILES} in {{root}}/FashionMNIST/raw"),
    TorchvisionImages("kmnist", "KMNIST", "train", f"{_IDX_FILES} in {{root}}/KMNIST/raw"),
    TorchvisionImages("cifar10", "CIFAR10", "train", "cifar-10-python.tar.gz in {root}"),
    TorchvisionImages("cifar100", "CIFAR100", "train", "cifar-100-python.tar.gz in {root}"),
    TorchvisionImages("svhn", "SVHN", "split", "train_32x32.mat and test_32x32.mat in {root}"),
    TorchvisionImages("usps", "USPS", "train", "usps.bz2 and usps.t.bz2 in {root}"),
    TorchvisionImages("stl10", "STL10", "split", "stl10_binary.tar.gz in {root}"),
)
