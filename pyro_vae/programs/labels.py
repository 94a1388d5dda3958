"""Labels as program arguments, passed only to models that declare they use them.

A model that takes labels says so with two class attributes, and everything downstream reads those
instead of asking which model it holds:

- ``labels = "required"``: every call needs ``y`` (a conditional VAE: p(x | y) has no meaning without it);
- ``labels = "optional"``: ``y`` is observed when given and a latent when not (semi-supervised M2);
- ``num_classes``: how many classes ``y`` (int64, shape (B,)) ranges over.

Such a model's ``forward(x, y=None, *, batch_size=None)`` and its guide's ``forward(x, y=None)`` take
the labels by keyword. Models without the attribute never receive labels.
"""
from __future__ import annotations

from typing import Any

import torch

from pyro_vae.errors import UserError

LABEL_USES = ("required", "optional")


def label_use(model) -> str | None:
    use = getattr(model, "labels", None)
    if use is not None and use not in LABEL_USES:
        raise UserError(f"{type(model).__name__}.labels must be one of {', '.join(LABEL_USES)}, got {use!r}")
    return use


def num_classes(model) -> int:
    n = getattr(model, "num_classes", None)
    if not isinstance(n, int) or n < 2:
        raise UserError(f"{type(model).__name__} uses labels but declares no num_classes >= 2")
    return n


def check_labels(model, labels: torch.Tensor | None, what: str = "the data", *, training: bool = False) -> None:
    """A clear error when a model needs labels the data do not have, or labels out of its range.

    With ``training``, a model with optional labels needs at least some: it learns its classifier
    q(y|x) from them (semi-supervised), and without any its classes would have no names."""
    use = label_use(model)
    if use is None:
        return
    if labels is None or (training and use == "optional" and not bool((labels >= 0).any())):
        if use == "required":
            raise UserError(f"{type(model).__name__} needs a label for every data point, but {what} has none")
        if training:
            raise UserError(f"{type(model).__name__} is semi-supervised and needs some labeled points, but "
                            f"{what} has none")
        return
    known = labels[labels >= 0] if use == "optional" else labels
    if use == "required" and bool((labels < 0).any()):
        raise UserError(f"{type(model).__name__} needs a label for every data point, but {what} has "
                        f"{int((labels < 0).sum())} missing")
    n = num_classes(model)
    if known.numel() and (int(known.min()) < 0 or int(known.max()) >= n):
        raise UserError(f"{what} has labels in [{int(known.min())}, {int(known.max())}], but "
                        f"{type(model).__name__} has {n} classes (0..{n - 1})")


def train_kwargs(model, y: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments for a training step on a batch with labels ``y`` (None: an unlabeled batch)."""
    use = label_use(model)
    if use is None or y is None:
        if use == "required":
            raise UserError(f"{type(model).__name__} needs a label for every data point, but a batch has none")
        return {}
    return {"y": y}


def eval_kwargs(model, y: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments for scoring held-out data: log p(x | y) where labels are required, log p(x) otherwise."""
    return train_kwargs(model, y) if label_use(model) == "required" else {}


def sample_kwargs(model, n: int, label: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Keyword arguments to draw ``n`` points from the prior: all of class ``label``, or classes in turn."""
    use = label_use(model)
    if use is None:
        if label is not None:
            raise UserError(f"{type(model).__name__} is not conditioned on labels; drop --label")
        return {}
    k = num_classes(model)
    if label is not None:
        if not 0 <= label < k:
            raise UserError(f"label {label} is out of range: {type(model).__name__} has classes 0..{k - 1}")
        return {"y": torch.full((n,), label, dtype=torch.long, device=device)}
    if use == "required":
        return {"y": torch.arange(n, device=device) % k}
    return {}
