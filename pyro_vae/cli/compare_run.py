"""One (estimator, seed) run of a comparison: train or resume it in its own folder, then measure it.

A finished run leaves ``compare_run.json`` (what the report reads) next to the usual run files; the
per-point test log-likelihoods the paired statistics need are the run's ``evaluation.npz``. Everything
random after training (KL, active units, gradient SNR) draws from a stream seeded by the run's seed, so a
run's numbers do not depend on which process ran it or what ran before it.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from pyro_vae.errors import UserError
from pyro_vae.training.run_dir import CONFIG, RunDir

RESULT = "compare_run.json"
CURVE = "compare_curve.json"
SNR_KS = (1, 5, 50)
# The gradient SNR's repeats scale with the training budget: its gradient draws cost at most SNR_SHARE of
# the training's (counted in particle-points, forward and backward alike), within [SNR_MIN, SNR_MAX].
SNR_SHARE, SNR_MIN, SNR_MAX = 0.1, 10, 50


def auto_snr_repeats(trained_images: int, batch: int, k: int, has_k: bool) -> int:
    """Repeats for the gradient SNR so that its draws cost about SNR_SHARE of the training's.

    Training evaluated trained_images x k particle-points; one repeat of the SNR evaluates ``batch``
    points at the estimator's k and, for estimators with particles, at each K of SNR_KS as well.
    Deterministic: the same run spec always gets the same repeats."""
    trained = trained_images * k
    per_repeat = batch * (k + (sum(SNR_KS) if has_k else 0))
    return int(min(SNR_MAX, max(SNR_MIN, SNR_SHARE * trained // per_repeat)))


@dataclass(frozen=True)
class Job:
    """What one run of a comparison is: its label, estimator, seed, full spec and folder, and how it is measured."""

    label: str
    estimator: str
    options: dict[str, Any]
    seed: int
    spec: Any                 # RunSpec
    folder: Path
    eval_samples: int
    eval_points: int | None
    snr_repeats: int | None   # None: scaled to the training (auto_snr_repeats)
    curve_points: int         # test points of the per-epoch IS log-likelihood (0: none)
    curve_samples: int

    def settings(self) -> dict[str, Any]:
        """What a finished run must match to be reused (the device may differ)."""
        spec = self.spec.to_dict()
        spec["train"] = {k: v for k, v in spec["train"].items() if k != "device"}
        return {"spec": spec, "eval_samples": self.eval_samples, "eval_points": self.eval_points,
                "snr_repeats": self.snr_repeats, "curve_points": self.curve_points,
                "curve_samples": self.curve_samples}


def finished(job: Job) -> dict[str, Any] | None:
    """The run's result if it finished with the same settings; None if it has not finished.

    A folder holding a run made with other settings is refused, never overwritten."""
    path = job.folder / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        same = result["settings"] == json.loads(json.dumps(job.settings()))
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return None  # a damaged result is measured again from the run's checkpoint
    if not same:
        raise UserError(f"{job.folder} holds a run made with other options; use another --out "
                        "(or the options it was made with)")
    return result


def _check_resumable(job: Job) -> bool:
    """Whether the folder holds an interrupted run of this job (resume it) or nothing yet (start it)."""
    if not (job.folder / "checkpoint.pt").exists():
        return False
    from pyro_vae.cli.runs import read_spec

    saved = read_spec(RunDir(job.folder)).to_dict()
    want = job.spec.to_dict()
    saved["train"].pop("device", None)
    want["train"].pop("device", None)
    if saved != want:
        raise UserError(f"{job.folder} holds a run made with other options (see {job.folder / CONFIG}); "
                        "use another --out")
    return True


class _Curve:
    """After each epoch: the IS log-likelihood on a few test points, kept in CURVE by epoch (survives a resume)."""

    def __init__(self, job: Job) -> None:
        self.job, self.path = job, job.folder / CURVE
        self.points: dict[str, float] = {}
        if self.path.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                self.points = json.loads(self.path.read_text())

    def __call__(self, row: dict, model, guide, test) -> None:
        from pyro_vae.analysis.evaluation import evaluate, no_likelihood_reason

        if not self.job.curve_points or no_likelihood_reason(model, guide):
            return
        device = next(model.parameters()).device
        data = test.head(min(self.job.curve_points, len(test)))
        # evaluate() draws from its own seeded stream, so training's RNG is untouched
        ll = evaluate(model, guide, data, num_samples=self.job.curve_samples, device=device, seed=self.job.seed,
                      quiet=True).log_likelihood
        self.points[str(row["epoch"])] = float(ll.mean())
        RunDir(self.job.folder).write_json(CURVE, self.points)


def run(job: Job, *, quiet: bool = False) -> dict[str, Any]:
    """Train (or resume) the run, evaluate and measure it, and write its RESULT; returns the result."""
    from pyro_vae.analysis.latent_stats import active_units, mean_kl
    from pyro_vae.analysis.snr import gradient_snr
    from pyro_vae.cli.experiment import train_run_objects
    from pyro_vae.cli.runs import make_estimator
    from pyro_vae.estimators import ESTIMATORS
    from pyro_vae.programs.labels import eval_kwargs
    from pyro_vae.training.distributed import SINGLE, from_env

    resume = _check_resumable(job)
    curve = _Curve(job)
    _, model, guide, test, history, summary = train_run_objects(
        job.spec, job.folder, eval_samples=job.eval_samples, eval_points=job.eval_points, resume=resume,
        quiet=quiet, world=SINGLE, on_epoch=curve)
    if summary.get("log_likelihood") is None:
        raise UserError(f"compare ranks estimators by the IS log-likelihood: {summary['not_estimated']}")
    device = next(model.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        pyro.set_rng_seed(job.seed)
        x, y = next(test.batches(min(100, len(test)), shuffle=False, generator=torch.Generator().manual_seed(0),
                                 device=device))
        kw = eval_kwargs(model, y)
        est = make_estimator(ESTIMATORS, job.estimator, job.options)
        has_k = "num_particles" in ESTIMATORS[job.estimator].__dataclass_fields__
        trained = round(sum(r["images_per_s"] * r["seconds"] for r in history.rows))
        repeats = job.snr_repeats or auto_snr_repeats(trained, x.shape[0], getattr(est, "num_particles", 1), has_k)
        curve_k = {}
        if has_k:
            for k in SNR_KS:
                try:
                    other = make_estimator(ESTIMATORS, job.estimator, {**job.options, "num_particles": k})
                except UserError:  # a K the estimator does not take (vimco needs K >= 2)
                    continue
                curve_k[k] = gradient_snr(model, guide, other, x, repeats, **kw)
        # the curve already holds the estimator itself where its K is one of SNR_KS
        snr = (curve_k.get(est.num_particles) if has_k else None) or gradient_snr(model, guide, est, x, repeats, **kw)
        snr_k = {str(k): v["encoder"] for k, v in curve_k.items()}
        kl = mean_kl(model, guide, test, device=device)
        active = active_units(guide, test, device=device, model=model)[0]
    rows = history.rows
    last = rows[-1]
    result = {
        "settings": job.settings(), "estimator": job.label, "seed": job.seed, "rank": from_env().rank,
        "test_elbo": summary["elbo"], "test_elbo_se": summary["elbo_se"],
        "nll": summary["nll"], "nll_se": summary["log_likelihood_se"], "num_points": summary["num_points"],
        "kl": kl, "active_units": active, "encoder_snr": snr["encoder"], "decoder_snr": snr["decoder"],
        "snr_repeats": repeats, "snr_k": snr_k,
        "epochs": len(rows), "steps": last["step"], "train_seconds": last.get("train_seconds", math.nan),
        "evals": last.get("evals", 0),
        "seconds_per_epoch": sum(r["seconds"] for r in rows) / len(rows),
        "images_per_s": sum(r["seconds"] * r["images_per_s"] for r in rows) / sum(r["seconds"] for r in rows),
        "curve": [{"epoch": r["epoch"], "train_seconds": r.get("train_seconds"), "evals": r.get("evals"),
                   "test_bound": r.get("test_elbo", math.nan), "log_likelihood": curve.points.get(str(r["epoch"]))}
                  for r in rows],
    }
    RunDir(job.folder).write_json(RESULT, result)
    return result


def per_point_log_likelihood(folder: Path) -> np.ndarray:
    """The run's per-point test log-likelihoods (its evaluation.npz)."""
    path = Path(folder) / "evaluation.npz"
    try:
        with np.load(path) as f:
            return np.asarray(f["log_likelihood"], dtype=np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is missing or damaged; delete {Path(folder) / RESULT} and rerun to measure "
                        "the run again") from e


_stop = None  # set by the parent when the comparison stops: queued runs then do not start


def init_worker(threads: int, stop) -> None:
    """A worker process of ``--jobs``: its share of the CPU threads, and the parent's stop event."""
    global _stop
    _stop = stop
    torch.set_num_threads(threads)


def run_in_worker(job: Job) -> dict[str, Any]:
    """``run`` in a worker process, its console output kept in the run's folder (compare.log)."""
    from pyro_vae.training.fit import Interrupted

    if _stop is not None and _stop.is_set():
        raise Interrupted(f"{job.label} seed {job.seed} not started")
    job.folder.mkdir(parents=True, exist_ok=True)
    with open(job.folder / "compare.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            return run(job, quiet=True)
        except UserError as e:  # UserError's subclasses may not pickle back to the parent with their type
            raise UserError(f"{job.label} seed {job.seed}: {e}") from None
        finally:
            sys.stdout.flush()
