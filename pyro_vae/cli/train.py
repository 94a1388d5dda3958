"""``pyro-vae train``: build, train, evaluate and plot one run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pyro_vae.cli.experiment import report, train_run
from pyro_vae.cli.parser import spec_from_args
from pyro_vae.cli.runs import make_estimator
from pyro_vae.errors import UserError
from pyro_vae.estimators import ESTIMATORS
from pyro_vae.training import distributed


def command(a: argparse.Namespace) -> None:
    if a.resume and a.out and a.out != a.resume:
        raise UserError("give either --out (a new run) or --resume RUN_DIR, not both")
    spec = spec_from_args(a)
    note = getattr(make_estimator(ESTIMATORS, spec.estimator, spec.estimator_options), "note", None)
    if note and distributed.from_env().main:
        print(f"pyro-vae: note: {note}", file=sys.stderr)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = a.resume or a.out or Path("runs") / f"{spec.model}-{spec.estimator}-seed{spec.train.seed}-{stamp}"
    summary = train_run(spec, out, resume=a.resume is not None, quiet=a.quiet,
                        eval_samples=a.eval_samples, eval_points=a.eval_points)
    if distributed.from_env().main:
        report(summary)
        print(f"run folder: {out}")
