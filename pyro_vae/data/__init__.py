"""Datasets: verified MNIST, your own arrays (.npz), torchvision image sets, semi-supervised batches.

``DATASETS`` maps each ``--dataset`` name to a loader ``root -> (train Split, test Split)``;
``load_dataset`` turns those into ``ArrayDataset``s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pyro_vae.errors import UserError

from .arrays import BINARIZE_MODES, ArrayDataset, Split, _check_mode, load_npz
from .mnist import MNIST_FINGERPRINT, load_mnist
from .semi_supervised import PartiallyLabeled
from .torchvision_sets import TORCHVISION_DATASETS, TorchvisionImages

DATASETS: dict[str, Callable[[Path], tuple[Split, Split]]] = {
    "mnist": load_mnist, "npz": load_npz, **{d.name: d for d in TORCHVISION_DATASETS}}


def load_dataset(name: str, root: str | Path, *, binarize: str = "dynamic",
                 seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) datasets; a static test draw uses seed + 1 so it is not the train draw's twin."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    _check_mode(binarize)  # before loading, so a typo costs no download
    train, test = DATASETS[name](Path(root))
    try:
        return (
            ArrayDataset(train.images, train.labels, binarize=binarize, seed=seed),
            ArrayDataset(test.images, test.labels, binarize=binarize, seed=seed + 1),
        )
    except UserError as e:
        raise UserError(f"{name} data from {root}: {e}") from None


__all__ = ["BINARIZE_MODES", "DATASETS", "MNIST_FINGERPRINT", "TORCHVISION_DATASETS", "ArrayDataset",
           "PartiallyLabeled", "Split", "TorchvisionImages", "load_dataset", "load_mnist", "load_npz"]
