"""``pyro-vae diagnose``: how good is a trained guide as a posterior? All diagnostics of one model/guide pair.

1. Per-point importance diagnostics of q(z|x) (PSIS k-hat, ESS, IS log p(x)) as ArviZ InferenceData
   (diagnostics.py).
2. The inference gap split into amortization and approximation gaps (gaps.py; Cremer et al. 2018).
3. Latent health: KL per unit, active units, posterior collapse (latent_stats.py).
4. Plots of all of these, and the run's usual latent plots (latent_plots.py, plots.py).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.analysis.gaps import InferenceGaps, inference_gaps
from pyro_vae.analysis.importance import (
    KHAT_BAD,
    KHAT_GOOD,
    ImportanceDiagnostics,
    check_num_samples,
    check_proposal,
    importance_diagnostics,
    save_netcdf,
)
from pyro_vae.analysis.latent_stats import LatentHealth, latent_health, real_sites
from pyro_vae.data.arrays import ArrayDataset
from pyro_vae.errors import UserError
from pyro_vae.plots import latent as latent_plots
from pyro_vae.plots import run as plots
from pyro_vae.programs.labels import eval_kwargs
from pyro_vae.training import distributed

NETCDF = "importance.nc"


@dataclass
class Diagnosis:
    importance: ImportanceDiagnostics
    gaps: InferenceGaps | None
    gaps_skipped: str | None
    health: LatentHealth
    out: Path
    files: list[Path] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        latents = {"active_units": self.health.active, "total_units": self.health.total,
                   "kl": float(sum(v.sum() for v in self.health.kl.values())),
                   "collapsed": self.health.collapsed, "warning": self.health.warning()}
        gaps = self.gaps.summary() if self.gaps is not None else {"skipped": self.gaps_skipped}
        return {"importance": self.importance.summary(), "gaps": gaps, "latents": latents,
                "files": [str(p.relative_to(self.out)) for p in self.files]}

    def report(self, file=None) -> None:
        """Print the short report: k-hat, ESS, the gaps, active units, and what was written."""
        report(self, file)


def _gather(world: distributed.World, part):
    """The ranks' per-point results, joined in rank order (their points are consecutive slices)."""
    parts = distributed.gather_objects(world, part)
    if not world.active or part is None:
        return part
    joined = {}
    for f in dataclasses.fields(part):
        values = [getattr(p, f.name) for p in parts]
        first = values[0]
        if f.name == "history":  # the mean of q*'s ELBO over points, per step: weighted by points
            sizes = np.array([len(p.points) for p in parts], dtype=float)
            joined[f.name] = sum(v * n for v, n in zip(values, sizes)) / sizes.sum()
        elif isinstance(first, dict):
            joined[f.name] = {k: np.concatenate([v[k] for v in values]) for k in first}
        elif isinstance(first, np.ndarray):
            joined[f.name] = np.concatenate(values)
        else:
            joined[f.name] = first
    return type(part)(**joined)


def _first_points(data: ArrayDataset, n: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n points; a dynamically binarized dataset gives its Bernoulli draw from ``seed``."""
    return next(data.head(n).batches(n, shuffle=False, generator=torch.Generator().manual_seed(seed), device=device))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _markdown_table(rows: list[dict], columns: list[str], digits: int = 3) -> list[str]:
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows])


def _report_markdown(d: Diagnosis) -> str:
    s = d.summary()
    imp, gaps, lat = s["importance"], s["gaps"], s["latents"]
    lines = ["# Posterior diagnostics", "", *(f"    {line}" for line in report_lines(s)), "",
             f"## Importance sampling with q(z|x) as the proposal ({imp['num_points']} points, "
             f"S = {imp['num_samples']} draws each)", "",
             f"PSIS Pareto k-hat (Yao et al. 2018): below {KHAT_GOOD} good, {KHAT_GOOD}-{KHAT_BAD} ok, above "
             f"{KHAT_BAD} unreliable. ESS = 1 / sum of squared normalized weights. All in {NETCDF} (ArviZ).", "",
             *_markdown_table(d.importance.rows(), ["point", "label", "khat", "khat_category", "ess", "ess_ratio",
                                                    "log_likelihood", "elbo"])]
    if d.gaps is not None:
        lines += ["", f"## Inference gaps ({gaps['num_points']} points, {gaps['steps']} Adam steps of a local "
                      f"Gaussian q*, {gaps['particles']} particles; bounds from {gaps['num_samples']} draws)", "",
                  *_markdown_table(d.gaps.rows(), list(d.gaps.rows()[0]))]
    lines += ["", f"## Latent units ({lat['active_units']} of {lat['total_units']} active)", "",
              *_markdown_table(d.health.rows(), ["site", "unit", "kl", "activity", "active"], digits=4)]
    return "\n".join(lines) + "\n"


def _write_plots(d: Diagnosis, model, guide, data: ArrayDataset, device) -> list[Path]:
    p = d.out / "plots"
    p.mkdir(exist_ok=True)
    x, y = _first_points(data, 1, 0, device)
    units = latent_plots.top_units(d.health, 10, real_sites(model, x, **eval_kwargs(model, y)))
    written = [latent_plots.khat_plot(d.importance, p / "khat.png"),
               latent_plots.kl_plot(d.health, p / "kl_per_unit.png"),
               plots.latent_scatter(guide, data, p / "latents_2d.png", device=device, model=model)]
    if units:
        written.append(latent_plots.marginals_plot(d.importance, latent_plots.prior_draws(model), units[:4],
                                                   p / "marginals.png", gaps=d.gaps))
    if d.gaps is not None:
        written.append(latent_plots.gaps_plot(d.gaps, p / "gaps.png"))
    if plots.is_image(data.image_shape):  # grids of vectors that are not images would show nothing
        written += [latent_plots.interpolation(model, guide, data, p / "interpolation.png", device=device),
                    plots.reconstructions(model, guide, data, p / "reconstructions.png", device=device),
                    plots.prior_samples(model, data, p / "prior_samples.png", device=device)]
        if units:
            written.append(latent_plots.traversals(model, guide, data, units, p / "traversals.png", device=device))
    return written


def diagnose(model, guide, data: ArrayDataset, out: str | Path, *, points: int = 100, samples: int = 1000,
             gap_points: int = 50, gap_steps: int = 300, gap_particles: int = 16, gap_lr: float = 0.01,
             seed: int = 0, device: torch.device | str = "cpu", quiet: bool = False,
             write_plots: bool = True, world: distributed.World = distributed.SINGLE) -> Diagnosis | None:
    """Run every diagnostic on the first ``points`` (importance) and ``gap_points`` (gaps) points of ``data``,
    latent health on all of it, and write the results into the folder ``out``.

    Writes importance.nc (ArviZ InferenceData), points.csv, gaps.csv, latents.csv, summary.json, report.md
    and plots/*.png. Works for any model/guide pair whose latents are local to the data plate; the gaps
    are skipped, with the reason recorded, where the latents are not real-valued.

    With a ``world`` of several processes, each rank diagnoses a consecutive slice of the points (its
    draws from its own seed), the results are gathered, and rank 0 writes everything and returns the
    Diagnosis; the other ranks return None.
    """
    out = Path(out)  # a str from a notebook works as well as a Path
    check_num_samples(samples)
    check_proposal(guide)
    for name, value in (("points", points), ("gap-points", gap_points), ("gap-steps", gap_steps)):
        if value <= 0:
            raise UserError(f"--{name} must be a positive integer, got {value}")

    def make_folder() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write diagnostics to {out}: {e.strerror or e}") from e

    distributed.on_main(world, make_folder)
    n, m = min(points, len(data)), min(gap_points, len(data))
    distributed.check_batch(world, min(n, m), len(data))
    x, y = _first_points(data, max(n, m), seed, device)

    def mine(t: torch.Tensor | None, count: int):
        return None if t is None else distributed.shard(world, t[:count])[0]

    def index(count: int) -> np.ndarray:  # the dataset indices of this rank's points, as shard splits them
        return np.array_split(np.arange(count), world.size)[world.rank]

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed if not world.active else
                          int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0]))
        importance = importance_diagnostics(model, guide, mine(x, n), mine(y, n), num_samples=samples,
                                            points=index(n), quiet=quiet or not world.main)
        gaps, skipped = None, None
        try:
            gaps = inference_gaps(model, guide, mine(x, m), mine(y, m), steps=gap_steps, particles=gap_particles,
                                  lr=gap_lr, num_samples=samples, points=index(m), quiet=quiet or not world.main)
        except UserError as e:  # e.g. discrete latents: no Gaussian q* to fit
            skipped = str(e)
        importance, gaps = _gather(world, importance), _gather(world, gaps)
        if not world.main:
            return None
        health = latent_health(model, guide, data, device=device)
    d = Diagnosis(importance, gaps, skipped, health, out)
    d.files += [save_netcdf(importance.to_inference_data(), out / NETCDF),
                _write_csv(out / "points.csv", importance.rows()),
                _write_csv(out / "latents.csv", health.rows())]
    if gaps is not None:
        d.files.append(_write_csv(out / "gaps.csv", gaps.rows()))
    if write_plots:
        with torch.random.fork_rng(devices=cuda):  # some plots seed torch themselves
            d.files += _write_plots(d, model, guide, data, device)
    (out / "report.md").write_text(_report_markdown(d))
    d.files.append(out / "report.md")
    (out / "summary.json").write_text(json.dumps(d.summary() | {"options": {
        "points": n, "samples": samples, "gap_points": m, "gap_steps": gap_steps, "gap_particles": gap_particles,
        "gap_lr": gap_lr, "seed": seed}}, indent=2, default=float) + "\n")
    return d


def report_lines(s: dict[str, Any]) -> list[str]:
    imp, gaps, lat = s["importance"], s["gaps"], s["latents"]
    lines = [f"importance sampling: {imp['num_points']} points, S={imp['num_samples']} draws from q(z|x) each",
             f"  k-hat: mean {imp['khat_mean']:.2f}, {100 * imp['share_khat_bad']:.0f}% of points > {KHAT_BAD} "
             f"(unreliable), {100 * imp['share_khat_ok']:.0f}% in ({KHAT_GOOD}, {KHAT_BAD}]",
             f"  ESS/S: mean {imp['ess_ratio_mean']:.3f}",
             f"  log p(x) (IS) {imp['log_likelihood']:.2f}, ELBO {imp['elbo']:.2f} nats per point"]
    if "skipped" in gaps:
        lines.append(f"inference gaps: skipped ({gaps['skipped']})")
    else:
        lines += [f"inference gaps: {gaps['num_points']} points, local Gaussian q* fitted for {gaps['steps']} steps",
                  f"  log p(x) - L[q] = {gaps['inference_gap']:.2f} = amortization {gaps['amortization_gap']:.2f} "
                  f"± {gaps['amortization_gap_se']:.2f} + approximation {gaps['approximation_gap']:.2f} "
                  f"± {gaps['approximation_gap_se']:.2f} nats"]
        if gaps.get("points_disagree"):
            lines.append(f"  at {gaps['points_disagree']} of {gaps['num_points']} points the IS estimates from q and "
                         "from q* alone disagree beyond their standard errors (one misses posterior mass); "
                         "log p(x) there comes from both proposals' draws together (gaps.csv: disagree)")
        if gaps.get("local_transformed"):
            lines.append(f"  q* is Gaussian in the unconstrained space of {', '.join(gaps['local_transformed'])}")
    lines.append(f"latent units: {lat['active_units']} of {lat['total_units']} active, KL {lat['kl']:.2f} nats")
    if lat["warning"]:
        lines.append(f"warning: {lat['warning']}")
    return lines


def report(d: Diagnosis, file=None) -> None:
    file = file or sys.stdout
    for line in report_lines(d.summary()):
        print(line, file=file)
    names = [str(p.relative_to(d.out)) for p in d.files if p.parent == d.out] + ["summary.json"]
    print(f"written: {d.out} ({', '.join(names)}, plots/)", file=file)


def diagnose_run(run_dir: Path, *, device: str = "auto", **options) -> Diagnosis:
    """Load a trained run (latest checkpoint) and diagnose it into RUN_DIR/diagnostics; print the report."""
    from pyro_vae.cli.experiment import load_run

    check_num_samples(options.get("samples", 1000))  # before the slow part
    from pyro_vae.training.device import resolve_device

    world = distributed.join(resolve_device(device))
    run, spec, model, guide, test, dev = load_run(run_dir, device)
    dev = distributed.device_for(world, dev)
    model.to(dev), guide.to(dev)
    d = diagnose(model, guide, test, run.path / "diagnostics", device=dev, world=world, **options)
    if d is not None:
        report(d)
    return d


def command(a) -> None:
    """``pyro-vae diagnose RUN_DIR``."""
    diagnose_run(a.run_dir, device=a.device, points=a.points, samples=a.samples, gap_points=a.gap_points,
                 gap_steps=a.gap_steps, seed=a.seed, quiet=a.quiet)
