"""Compare estimators: every (estimator, seed) run on the same data, architecture and budget, then paired statistics.

Each run is a run folder ``OUT/<estimator>/seed<s>``. Running the same comparison again skips the runs
that finished and resumes the ones that were interrupted (``pyro_vae.cli.compare_run``). Runs go one
after another, or ``jobs`` at a time in separate processes, or dealt to the ranks under torchrun; every
run draws only from its own seeded streams, so the results do not depend on how they were scheduled.
The report (``compare.md``, ``compare.csv``, plots) is written by ``pyro_vae.cli.compare_report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pyro_vae.cli import compare_run
from pyro_vae.cli.compare_run import Job
from pyro_vae.cli.runs import RunSpec, make_estimator
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.training import distributed
from pyro_vae.training.budget import particles_of
from pyro_vae.training.fit import Interrupted

OPTION_ALIASES = {"k": "num_particles", "particles": "num_particles"}
SNR_KS = compare_run.SNR_KS
EPOCH_CAP = 10**6  # the epochs of a seconds or evals budget when --epochs does not cap it
RERUN = "finished runs are kept and interrupted ones checkpointed; run the same command again to continue"


def parse_estimators(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """'elbo,iwae:k=5,renyi:alpha=0.5:k=5' -> [(label, name, options), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *opts = item.split(":")
        if name not in ESTIMATORS:
            raise UserError(f"unknown estimator {name!r}; known: {', '.join(sorted(ESTIMATORS))}")
        options: dict[str, Any] = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep:
                raise UserError(f"estimator option {opt!r} in {item!r} is not key=value")
            try:
                options[OPTION_ALIASES.get(key, key)] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                raise UserError(f"estimator option {opt!r} in {item!r} needs a number") from None
        make_estimator(ESTIMATORS, name, options)  # validate now, before any training
        out.append((label_of(item), name, options))
    if not out:
        raise UserError("--estimators needs at least one estimator, e.g. elbo,iwae:k=5")
    if len({label for label, _, _ in out}) != len(out):
        raise UserError("--estimators lists the same estimator twice")
    return out


def label_of(item: str) -> str:
    """'iwae:k=5' -> 'iwae-k5': the estimator's name in tables and folders."""
    return item.strip().replace(":", "-").replace("=", "")


def pick_baseline(estimators: list[tuple[str, str, dict[str, Any]]], baseline: str | None) -> str:
    """The baseline's label: ``baseline`` (a label or an --estimators item) or the first estimator."""
    labels = [label for label, _, _ in estimators]
    if baseline is None:
        return labels[0]
    if label_of(baseline) not in labels:
        raise UserError(f"--baseline {baseline!r} is not one of the estimators: {', '.join(labels)}")
    return label_of(baseline)


def with_budget(train, budget: tuple[str, float] | None, epochs_given: bool):
    """``train`` (a TrainConfig) with the budget applied: epochs, or seconds / evals capped by --epochs."""
    if budget is None:
        return train
    kind, value = budget
    if kind == "epochs":
        if epochs_given and train.epochs != value:
            raise UserError(f"--epochs {train.epochs} and --budget epochs={value} disagree; give one of them")
        return dataclasses.replace(train, epochs=int(value))
    epochs = train.epochs if epochs_given else EPOCH_CAP
    field = {"seconds": "max_seconds", "evals": "max_evals"}[kind]
    return dataclasses.replace(train, epochs=epochs, **{field: int(value) if kind == "evals" else float(value)})


def plan(base: RunSpec, estimators, out: Path, *, seeds: int, eval_samples: int, eval_points: int | None,
         snr_repeats: int | None, curve_points: int, curve_samples: int) -> list[Job]:
    """Every (estimator, seed) run, estimator-major; seeds count up from the spec's seed."""
    if base.train.max_evals is not None:
        bad = [label for label, name, options in estimators
               if base.train.max_evals % particles_of(make_estimator(ESTIMATORS, name, options))]
        if bad:
            raise UserError(f"--budget evals={base.train.max_evals} is not a multiple of the particles of "
                            f"{', '.join(bad)}; pick a multiple of every K so that all runs get the same count")
    jobs = []
    for label, name, options in estimators:
        for s in range(base.train.seed, base.train.seed + seeds):
            spec = dataclasses.replace(base, estimator=name, estimator_options=options,
                                       train=dataclasses.replace(base.train, seed=s))
            jobs.append(Job(label, name, options, s, spec, out / label / f"seed{s}", eval_samples, eval_points,
                            snr_repeats, curve_points, curve_samples))
    return jobs


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        tqdm.write(text, file=sys.stderr)


def _run_here(todo: list[Job], total: int, quiet: bool) -> None:
    for n, job in enumerate(todo, 1):
        resuming = (job.folder / "checkpoint.pt").exists()
        _say(quiet, f"[{n}/{len(todo)} of {total} runs] {job.label} seed {job.seed}: "
                    f"{'resuming' if resuming else 'training'} in {job.folder}")
        try:
            compare_run.run(job, quiet=quiet)
        except Interrupted as e:
            raise Interrupted(f"{e.args[0].split(';')[0]} of {job.label} seed {job.seed}; {RERUN}") from None


def _run_parallel(todo: list[Job], jobs: int, quiet: bool) -> None:
    threads = max(1, torch.get_num_threads() // jobs)
    _say(quiet, f"{len(todo)} runs, {jobs} at a time ({threads} thread{'s' * (threads > 1)} each); "
                "each run's log is its folder's compare.log")
    context = get_context("spawn")
    stop = context.Event()  # on the first error or Ctrl-C, the runs already queued to the workers do not start
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=compare_run.init_worker,
                               initargs=(threads, stop))
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=quiet, file=sys.stderr)
    try:
        pending = {pool.submit(compare_run.run_in_worker, job) for job in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            bar.update(len(done))
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {RERUN}") from None
    except Interrupted:
        raise Interrupted(f"interrupted; {RERUN}") from None
    finally:
        stop.set()
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _wait_for(jobs: list[Job], quiet: bool) -> None:
    """Under torchrun, rank 0 waits for the other ranks' runs (torchrun stops every rank if one fails)."""
    missing = [j for j in jobs if compare_run.finished(j) is None]
    if missing:
        _say(quiet, f"waiting for {len(missing)} runs on the other ranks")
    while missing:
        time.sleep(2)
        missing = [j for j in missing if compare_run.finished(j) is None]


def compare(base: RunSpec, estimators: list[tuple[str, str, dict[str, Any]]], out: Path, *,
            eval_samples: int, eval_points: int | None, snr_repeats: int | None = None, seeds: int = 1,
            baseline: str | None = None, jobs: int = 1, curve_points: int = 200, curve_samples: int = 100,
            quiet: bool = False) -> list[dict]:
    """Train every estimator with ``seeds`` seeds on ``base``'s data, architecture and budget; write the report.

    ``base.train`` holds the budget (epochs, or ``max_seconds`` / ``max_evals``). Returns one summary row
    per estimator (the rows of compare.csv whose ``kind`` is "estimator"). ``jobs`` > 1 runs that many
    runs at a time in spawned processes, the CPU threads split between them; under torchrun the runs are
    dealt to the ranks, each rank training its runs alone, and rank 0 writes the report.
    """
    from pyro_vae.cli.compare_report import write_report
    from pyro_vae.cli.experiment import check_spec

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    base_label = pick_baseline(estimators, baseline)
    planned = plan(base, estimators, out, seeds=seeds, eval_samples=eval_samples, eval_points=eval_points,
                   snr_repeats=snr_repeats, curve_points=curve_points, curve_samples=curve_samples)
    for label, name, options in estimators:  # every run's needs, before the first one trains or a folder is made
        check_spec(dataclasses.replace(base, estimator=name, estimator_options=options), eval_points=eval_points)
    if jobs > len(planned):
        raise UserError(f"--jobs {jobs} is more than the {len(planned)} runs of this comparison")
    world = distributed.from_env()
    if world.active and jobs > 1:
        raise UserError("under torchrun the ranks run the comparison's runs in parallel; leave out --jobs")
    mine = [j for i, j in enumerate(planned) if i % world.size == world.rank]
    if world.active and torch.cuda.is_available() and base.train.device != "cpu":
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in mine if compare_run.finished(j) is None]
    if len(todo) < len(mine):
        _say(quiet or not world.main, f"{len(mine) - len(todo)} of {len(mine)} runs already finished in {out}; "
                                      "skipping them")
    if jobs > 1 and len(todo) > 1:
        _run_parallel(todo, min(jobs, len(todo)), quiet)
    else:
        _run_here(todo, len(planned), quiet or not world.main)
    if not world.main:
        return []
    _wait_for(planned, quiet)
    results = [compare_run.finished(j) for j in planned]
    return write_report(planned, results, out, baseline=base_label, base=base)


def command(a: argparse.Namespace) -> None:
    from pyro_vae.cli.parser import spec_from_args

    estimators = parse_estimators(a.estimators)
    for label, name, options in estimators:
        note = getattr(make_estimator(ESTIMATORS, name, options), "note", None)
        if note:
            print(f"pyro-vae: note: {label}: {note}", file=sys.stderr)
    spec = spec_from_args(a)
    spec = dataclasses.replace(spec, train=with_budget(spec.train, a.budget, a.epochs is not None))
    out = a.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    compare(spec, estimators, out, eval_samples=a.eval_samples, eval_points=a.eval_points,
            snr_repeats=a.snr_repeats, seeds=a.seeds, baseline=a.baseline, jobs=a.jobs,
            curve_points=a.curve_points, curve_samples=a.curve_samples, quiet=a.quiet)
    if distributed.from_env().main:
        print((out / "compare.md").read_text(), end="")
        print(f"table: {out / 'compare.md'} and {out / 'compare.csv'}; plots: {out / 'plots'}")

