"""A whole run from a RunSpec: build, train, evaluate, plot. What the CLI's commands call."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.analysis.evaluation import Evaluation, classification_accuracy, evaluate, no_likelihood_reason
from pyro_vae.cli.preflight import check_run
from pyro_vae.cli.runs import RunSpec, make_component, make_estimator, read_spec, versions
from pyro_vae.data import ArrayDataset, PartiallyLabeled, load_dataset
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.guides import GUIDES
from pyro_vae.models import MODELS
from pyro_vae.plots import run as plots
from pyro_vae.programs.labels import label_use, train_kwargs
from pyro_vae.training import distributed
from pyro_vae.training.checkpoint import LATEST, load_checkpoint
from pyro_vae.training.device import resolve_device
from pyro_vae.training.fit import History, fit
from pyro_vae.training.rng import seeded
from pyro_vae.training.run_dir import CONFIG, EVALUATION, RunDir


def load_data(spec: RunSpec) -> tuple[ArrayDataset, ArrayDataset]:
    d = spec.data
    train, test = load_dataset(d["name"], d.get("root", "data"), binarize=d.get("binarize", "dynamic"),
                               seed=spec.train.seed)
    if d.get("train_points"):
        train = train.head(int(d["train_points"]))
    if d.get("test_points"):
        test = test.head(int(d["test_points"]))
    if d.get("labeled_every") and not d.get("labeled"):
        raise UserError("--labeled-every schedules the labeled batches of a semi-supervised run; give --labeled N")
    if d.get("labeled"):
        train = PartiallyLabeled(train, int(d["labeled"]), seed=spec.train.seed, labeled_every=d.get("labeled_every"))
    return train, test


def classes_of(data: ArrayDataset) -> int | None:
    """How many classes the labels range over (max + 1, at least 2), or None for unlabeled data."""
    known = data.labels[data.labels >= 0] if data.labels is not None else None
    return max(2, int(known.max()) + 1) if known is not None and known.numel() else None


def example_batch(model, data: ArrayDataset, size: int = 64) -> tuple[torch.Tensor, dict[str, Any]]:
    """The first ``size`` training points, with the keyword arguments a training step would pass: what a
    guide built from the model (``built_from_model``) reads the model on. Drawn from a generator of its
    own, so building never moves the run's random streams."""
    x, y = next(data.batches(min(len(data), size), shuffle=False, generator=torch.Generator().manual_seed(0)))
    return x, train_kwargs(model, y)


def build(spec: RunSpec, x_dim: int, image_shape: tuple[int, ...] | None = None,
          num_classes: int | None = None, train: ArrayDataset | None = None):
    """The run's model, guide and estimator; the networks' initial weights depend on the seed alone.

    ``x_dim``, ``image_shape`` and ``num_classes`` (from the training labels, unless the network options
    set it) go to every component whose config has such a field. A guide built from the model reads
    it on an example batch of ``train``."""
    options = {**spec.network, "x_dim": x_dim}
    if image_shape is not None:
        options["image_shape"] = tuple(image_shape)
    if num_classes is not None:
        options.setdefault("num_classes", num_classes)
    with seeded(spec.train.seed):  # built on the CPU: only the CPU generator is seeded, and put back
        model = make_component(MODELS, spec.model, "model", options)
        needs = getattr(GUIDES.get(spec.guide), "built_from_model", False)
        example = example_batch(model, train) if needs and train is not None else None
        guide = make_component(GUIDES, spec.guide, "guide", options, model=model, example=example)
    estimator = make_estimator(ESTIMATORS, spec.estimator, spec.estimator_options)
    return model, guide, estimator


def train_run_objects(spec: RunSpec, out: Path, *, eval_samples: int, eval_points: int | None,
                      resume: bool = False, quiet: bool = False, world: distributed.World | None = None,
                      on_epoch=None):
    """Train, plot and evaluate one run; returns (run, model, guide, test data, history, evaluation summary).

    ``world`` defaults to the processes torchrun launched (one run trained by all of them); pass
    ``distributed.SINGLE`` to train in this process alone. ``on_epoch(row, model, guide, test)`` is called
    after every epoch's checkpoint. Everything the run will need (``preflight.check_run``) is checked
    before its folder is made; a run refused by ``fit`` before its first checkpoint leaves no folder
    behind either."""
    world = distributed.join(resolve_device(spec.train.device)) if world is None else world
    if resume:
        saved = read_spec(RunDir(out))
        if saved.to_dict() | {"train": {}} != spec.to_dict() | {"train": {}}:
            raise UserError(f"--resume {out}: the run was made with another model/data config; "
                            f"resume it with the options in {out / CONFIG}")
        changed = [f.replace("_", "-") for f in ("batch_size", "lr", "seed", "clip_norm")
                   if getattr(saved.train, f) != getattr(spec.train, f)]
        if changed:
            raise UserError(f"--resume {out}: --{', --'.join(changed)} differ from the run's; only --epochs, "
                            "--device and --checkpoint-every may change when resuming")
    # rank 0 downloads and caches the data first, so the ranks never write the same files at once
    loaded = distributed.on_main(world, lambda: load_data(spec))
    train, test = loaded if world.main else load_data(spec)
    model, guide, estimator = build(spec, train.dim, train.image_shape, classes_of(train), train)
    device = distributed.device_for(world, resolve_device(spec.train.device))
    check_run(model, guide, estimator, train, test.head(eval_points) if eval_points else test, device)
    made = not Path(out).exists()
    run = distributed.on_main(world, lambda: RunDir(out).create(fresh=not resume)) or RunDir(out)
    hook = (lambda row: on_epoch(row, model, guide, test)) if on_epoch is not None else None
    try:
        distributed.on_main(world, lambda: run.write_json(CONFIG, {
            "spec": spec.to_dict(), "versions": versions(device), "estimator": repr(estimator),
            **({"processes": world.size} if world.active else {})}))
        history = fit(model, guide, estimator, train, test, spec.train, run_dir=run, resume=resume,
                      run_config=spec.to_dict(), quiet=quiet, world=world, on_epoch=hook)
    except UserError:
        if made and world.main:
            _remove_if_unused(run.path)
        raise
    distributed.on_main(world, lambda: write_plots(run, model, guide, test, history, device))
    summary = evaluate_run(run, model, guide, test, eval_samples, eval_points, device, spec.train.seed, quiet,
                           world)
    return run, model, guide, test, history, summary


def _remove_if_unused(path: Path) -> None:
    """A folder this run made, refused before its first checkpoint: remove what the run wrote (its config)
    and the folder if nothing else is in it."""
    if (path / "checkpoint.pt").exists():
        return
    (path / CONFIG).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # something else is in it: leave it
        pass


def check_spec(spec: RunSpec, *, eval_points: int | None) -> None:
    """``preflight.check_run`` for the run ``spec`` describes, without training it (what ``compare`` checks
    for every estimator before the first one trains)."""
    train, test = load_data(spec)
    model, guide, estimator = build(spec, train.dim, train.image_shape, classes_of(train), train)
    check_run(model, guide, estimator, train, test.head(eval_points) if eval_points else test,
              resolve_device(spec.train.device))


def train_run(spec: RunSpec, out: Path, *, resume: bool, quiet: bool,
              eval_samples: int, eval_points: int | None) -> dict[str, Any]:
    return train_run_objects(spec, out, eval_samples=eval_samples, eval_points=eval_points,
                             resume=resume, quiet=quiet)[-1]


def evaluate_run(run: RunDir, model, guide, test: ArrayDataset, num_samples: int, points: int | None,
                 device: torch.device, seed: int, quiet: bool,
                 world: distributed.World = distributed.SINGLE) -> dict[str, Any]:
    """The IS evaluation (its points shared by the ranks of ``world``), written by rank 0."""
    data = test.head(points) if points else test
    reason = no_likelihood_reason(model, guide)
    if reason:  # e.g. a plain autoencoder: its logged bound is the reconstruction term, and that is all
        summary = {"num_points": len(data), "log_likelihood": None, "not_estimated": reason}
        distributed.on_main(world, lambda: run.write_json(EVALUATION, summary))
        return summary
    start = time.perf_counter()
    result: Evaluation = evaluate(model, guide, data, num_samples=num_samples, device=device, seed=seed,
                                  quiet=quiet, world=world)
    summary = {**result.summary(), "seconds": time.perf_counter() - start,
               **({"processes": world.size} if world.active else {})}

    def write() -> None:
        if label_use(model) == "optional" and test.labels is not None:
            summary["accuracy"] = classification_accuracy(model, guide, test, device=device)
        run.write_json(EVALUATION, summary)
        np.savez_compressed(run.path / "evaluation.npz", elbo=result.elbo, log_likelihood=result.log_likelihood)

    distributed.on_main(world, write)
    return summary


def write_plots(run: RunDir, model, guide, test: ArrayDataset, history: History, device) -> list[Path]:
    p = run.plots()
    written = [plots.learning_curves(history.rows, p / "learning_curves.png"),
               plots.latent_scatter(guide, test, p / "latents_2d.png", device=device, model=model)]
    if plots.is_image(test.image_shape):  # grids of vectors that are not images would show nothing
        written += [plots.reconstructions(model, guide, test, p / "reconstructions.png", device=device),
                    plots.prior_samples(model, test, p / "prior_samples.png", device=device)]
    return written


def load_run(path: Path, device_name: str):
    """Rebuild a finished run's model and guide from its folder, with the latest checkpoint's weights."""
    run = RunDir(path)
    spec = read_spec(run)
    ckpt = load_checkpoint(run.path / LATEST)
    train, test = load_data(spec)
    model, guide, _ = build(spec, test.dim, test.image_shape, classes_of(train), train)
    try:
        model.load_state_dict(ckpt["model"])
        guide.load_state_dict(ckpt["guide"])
    except RuntimeError as e:
        raise UserError(f"{run.path / LATEST} does not fit the model in {run.path / CONFIG}") from e
    device = resolve_device(device_name)
    return run, spec, model.to(device).eval(), guide.to(device).eval(), test, device


def report(summary: dict[str, Any], file=None) -> None:
    file = file or sys.stdout
    if summary.get("log_likelihood") is None:
        print(f"no test log-likelihood: {summary.get('not_estimated', 'not estimated')}", file=file)
        return
    print(f"test ELBO:           {summary['elbo']:.2f} ± {summary['elbo_se']:.2f} nats/image", file=file)
    print(f"test log-likelihood: {summary['log_likelihood']:.2f} ± {summary['log_likelihood_se']:.2f} nats/image "
          f"(IS, K={summary['num_samples']}, {summary['num_points']} test points)", file=file)
    if "accuracy" in summary:
        print(f"test accuracy:       {100 * summary['accuracy']:.2f}% (mode of the guide's q(y|x), all test points)",
              file=file)
