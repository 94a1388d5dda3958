"""Everything a run will need, checked before its folder is made or a training step is spent.

``fit`` checks its own needs (labels, data, pairing, one call of the estimator) when it starts; a run of
the command line also evaluates after training, with the labels as evaluation passes them and with K
draws per point vectorized, and (for a model with optional labels) scores the guide's classifier. So the
whole list is checked here first, on a few points: a refusal is one line, with no folder left behind and
no training budget spent on a run whose evaluation would fail.
"""
from __future__ import annotations

import dataclasses

import pyro
import torch

from pyro_vae.analysis.evaluation import check_evaluable, no_likelihood_reason
from pyro_vae.data import ArrayDataset, PartiallyLabeled
from pyro_vae.errors import UserError
from pyro_vae.programs.labels import check_labels, label_use, train_kwargs
from pyro_vae.programs.sites import _trace, check_data_fits, check_pairing


def _probe(data: ArrayDataset, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return next(data.batches(min(len(data), n), shuffle=False, generator=torch.Generator().manual_seed(0),
                             device=device))


def check_run(model, guide, estimator, train: ArrayDataset, test: ArrayDataset, device, *,
              evaluates: bool = True) -> None:
    """Raise a UserError for anything that would stop the run: the training checks of ``fit`` (labels, data
    shape and support, the model/guide pairing, the estimator's refusals on one batch) and, with
    ``evaluates``, the evaluation's (``check_evaluable``; the label site of a semi-supervised guide).

    Nothing global changes: a copy of the estimator is called, in a param store scope of its own, with the
    RNG streams restored afterwards and no gradients."""
    model.to(device)
    guide.to(device)
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with pyro.get_param_store().scope(), torch.random.fork_rng(devices=cuda), torch.no_grad():
        check_labels(model, train.labels, "the training data", training=True)
        # a semi-supervised set serves unlabeled and labeled batches: the programs differ, check both
        for part in [train, *([train.labeled] if isinstance(train, PartiallyLabeled) else [])]:
            x, y = _probe(part, 64, device)
            kw = train_kwargs(model, y)
            check_data_fits(model, x, **kw)
            check_pairing(model, guide, x, **kw)
            dataclasses.replace(estimator)(model, guide, x, **kw)  # a fresh copy: its lazy set-up stays the run's
        if not evaluates or no_likelihood_reason(model, guide) is not None:
            return  # nothing is estimated: the evaluation says so in one line of its own
        check_labels(model, test.labels, "the test data")
        tx, ty = _probe(test, 64, device)
        check_data_fits(model, tx, **({"y": ty} if label_use(model) == "required" else {}))
        check_evaluable(model, guide, tx, ty)
        if label_use(model) == "optional" and test.labels is not None:
            site = getattr(model, "label_site", "y")
            if site not in _trace(guide, tx[:2]).nodes:
                raise UserError(f"{type(guide).__name__} has no site {site!r}, so it has no classifier q({site}|x) "
                                f"for the test accuracy of {type(model).__name__}; use a guide that samples {site!r} "
                                "(e.g. --guide m2)")
