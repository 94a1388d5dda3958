"""``pyro-vae evaluate``: the IS log-likelihood and ELBO of a trained run on its test set."""
from __future__ import annotations

import argparse

from pyro_vae.cli.experiment import evaluate_run, load_run, report
from pyro_vae.training import distributed
from pyro_vae.training.device import resolve_device


def command(a: argparse.Namespace) -> None:
    world = distributed.join(resolve_device(a.device))
    run, spec, model, guide, test, device = load_run(a.run_dir, a.device)
    device = distributed.device_for(world, device)
    model.to(device), guide.to(device)
    summary = evaluate_run(run, model, guide, test, a.samples, a.points, device, a.seed, a.quiet, world)
    if world.main:
        report(summary)
