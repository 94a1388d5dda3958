"""``pyro-vae sample``: a PNG grid of draws from a trained run's prior."""
from __future__ import annotations

import argparse

from pyro_vae.cli.experiment import load_run
from pyro_vae.errors import UserError
from pyro_vae.plots import run as plots
from pyro_vae.training import distributed


def command(a: argparse.Namespace) -> None:
    distributed.refuse("sample")
    if a.out is not None and a.out.suffix.lower() != ".png":
        raise UserError(f"--out {a.out}: samples are written as PNG; give a path ending in .png")
    run, spec, model, guide, test, device = load_run(a.run_dir, a.device)
    if not plots.is_image(test.image_shape):
        raise UserError(f"the data of {run.path} are {test.image_shape}-shaped vectors, not images to draw")
    out = a.out or run.path / "plots" / "samples.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        path = plots.prior_samples(model, test, out, n=a.num, seed=a.seed, device=device, label=a.label)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    print(f"samples: {path}")
