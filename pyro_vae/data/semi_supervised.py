"""Training data where only some points keep their labels, served as labeled and unlabeled batches."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from pyro_vae.errors import UserError

from .arrays import ArrayDataset


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n points, as many of each class as n allows (Kingma et al. 2014), chosen by ``seed``."""
    classes = torch.unique(labels)
    if n < len(classes) or n > len(labels):
        raise UserError(f"--labeled {n}: need between {len(classes)} (one per class) and {len(labels)} labels")
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=gen)] for idx in per_class]
    quota = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    if any(q > len(idx) for q, idx in zip(quota, per_class)):
        raise UserError(f"--labeled {n}: some class has fewer than {max(quota)} points")
    return torch.sort(torch.cat([idx[:q] for q, idx in zip(quota, per_class)])).values


class PartiallyLabeled:
    """A training set of which ``num_labeled`` points (class-balanced) keep their labels.

    An epoch is one pass over the unlabeled points in batches ``(x, None)``, with a labeled batch
    ``(x, y)`` after every ``labeled_every`` of them; the labeled points are reshuffled every epoch and
    each is seen about once per epoch (the schedule of Pyro's semi-supervised VAE tutorial). All
    randomness comes from the generator passed to ``batches``, so a resumed run replays an epoch exactly.
    ``labels`` holds -1 for the points whose label is hidden.
    """

    def __init__(self, data: ArrayDataset, num_labeled: int, seed: int = 0):
        if data.labels is None:
            raise UserError("semi-supervised training needs a labeled dataset to hide labels from")
        idx = balanced_subset(data.labels, num_labeled, seed)
        rest = torch.ones(len(data), dtype=torch.bool)
        rest[idx] = False
        if not rest.any():
            raise UserError(f"--labeled {num_labeled} labels every point; leave it out for supervised training")
        self.labeled = ArrayDataset(data.data[idx], data.labels[idx], binarize=_served(data.binarize),
                                    image_shape=data.image_shape)
        self.unlabeled = ArrayDataset(data.data[rest], None, binarize=_served(data.binarize),
                                      image_shape=data.image_shape)
        self.labels = torch.full((len(data),), -1, dtype=torch.long)
        self.labels[idx] = data.labels[idx]
        self.binarize, self.image_shape, self.dim = data.binarize, data.image_shape, data.dim
        self.num_labeled = num_labeled

    def _plan(self, batch_size: int) -> tuple[int, int, int]:
        unlabeled_batches = math.ceil(len(self.unlabeled) / batch_size)
        labeled_size = min(batch_size, len(self.labeled))
        labeled_batches = math.ceil(len(self.labeled) / labeled_size)
        return labeled_size, labeled_batches, max(1, unlabeled_batches // labeled_batches)

    def __len__(self) -> int:
        return len(self.unlabeled) + len(self.labeled)

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator,
                device: torch.device | str = "cpu", drop_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        labeled_size, labeled_batches, every = self._plan(batch_size)
        labeled = self.labeled.batches(labeled_size, shuffle=shuffle, generator=generator, device=device)
        done = 0
        for i, (x, _) in enumerate(self.unlabeled.batches(batch_size, shuffle=shuffle, generator=generator,
                                                          device=device, drop_last=drop_last)):
            yield x, None
            if (i + 1) % every == 0 and done < labeled_batches:
                done += 1
                yield next(labeled)
        for xy in labeled:  # any labeled batches the schedule did not place
            yield xy


def _served(binarize: str) -> str:
    # a static draw is already in {0, 1}: keep it as it is instead of drawing again
    return "none" if binarize == "static" else binarize
