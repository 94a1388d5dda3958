"""The shape contract a model and its guide must keep, checked once from one trace of each.

Data go in a vectorized plate at dim -1 (``pyro.plate("data", B)``); the estimators put particles in a
plate left of all the model's plates, so a site's batch dims must all be plate dims (per-point dims are
event dims: ``.to_event(1)``). A guide samples each latent with the model's shape, event dims and
plates. Each breach is one line naming the site, the program and what is expected, instead of the Pyro
message it would become later (one naming the internal ``_particles`` plate, or advising a plate dim
that breaks this contract).
"""
from __future__ import annotations

import re

import pyro.poutine as poutine
import torch

from pyro_vae.errors import UserError

_PLATE_MISMATCH = re.compile(r"Shape mismatch inside plate\('(?P<plate>[^']*)'\) at site (?P<site>\S+) "
                             r"dim (?P<dim>-?\d+), (?P<plate_size>\d+) vs (?P<size>\d+)")


def plate_error(e: Exception, program) -> UserError | None:
    """Pyro's plate broadcasting error, said as what to change in the program; None for other errors."""
    m = _PLATE_MISMATCH.search(str(e))
    if m is None:
        return None
    return UserError(
        f"{_name(program)}'s site {m['site']!r} has size {m['size']} at dim {m['dim']}, where pyro.plate"
        f"({m['plate']!r}) has size {m['plate_size']}: a site's rightmost batch dims are its plates' dims, so "
        "declare per-point dims as event dims (e.g. dist.Normal(loc, scale).to_event(1))")


def _name(program) -> str:
    return getattr(program, "__name__", None) or type(program).__name__


def _plates(site: dict) -> dict[int, str]:
    return {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}


def _describe(plates: dict[int, str]) -> str:
    if not plates:
        return "outside every plate"
    return "in " + ", ".join(f"pyro.plate({n!r}) at dim {d}" for d, n in sorted(plates.items()))


def check_structure(trace: poutine.Trace, program, sites: dict[str, dict], batch_size: int) -> None:
    """Every observed site, and every site in a plate of the batch's size, inside a plate at dim -1; and no
    batch dim of any site outside its plates."""
    for name, site in sites.items():
        plates = _plates(site)
        sizes = {f.size for f in site["cond_indep_stack"] if f.vectorized}
        if plates and -1 not in plates and (site["is_observed"] or batch_size in sizes):
            where = _describe(plates)
            raise UserError(f"{_name(program)}'s site {name!r} is {where}; pyro-vae needs the data "
                            "plate at dim -1 (pyro.plate('data', B) with no dim, or dim=-1): the estimators put "
                            "their particles left of the model's plates")
    for name, site in sites.items():
        plates = _plates(site)
        batch = tuple(site["fn"].batch_shape)
        for i, size in enumerate(batch):
            dim = i - len(batch)
            if size != 1 and dim not in plates:
                extra = len(batch) - len(plates)
                fix = (f": declare per-point dims as event dims, e.g. dist.{type(_base(site['fn'])).__name__}(...)"
                       f".to_event({extra})") if extra > 0 else ": put it in a plate for that dim"
                raise UserError(f"{_name(program)}'s site {name!r} has batch shape {batch}, but dim {dim} (size "
                                f"{size}) is in no plate (the site is {_describe(plates)}){fix}")


def _base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def _per_point(site: dict) -> tuple[int, ...]:
    """A site's value shape without its plate dims (what one data point holds)."""
    shape = tuple(site["value"].shape)
    plates = _plates(site)
    event = len(site["fn"].event_shape)
    return tuple(s for i, s in enumerate(shape) if i >= len(shape) - event or (i - (len(shape) - event)) not in plates)


def check_site_pair(name: str, model, guide, model_site: dict, guide_site: dict) -> None:
    """The guide's site ``name`` must have the model's plates, event shape and shape, on the model's support."""
    m, g = _name(model), _name(guide)
    mp, gp = _plates(model_site), _plates(guide_site)
    if mp != gp:
        raise UserError(f"{g} samples {name!r} {_describe(gp)}, but {m} samples it {_describe(mp)}; sample it in "
                        "the same plates (a latent per data point goes in pyro.plate('data', B) at dim -1)")
    m_fn, g_fn = model_site["fn"], guide_site["fn"]
    if len(m_fn.event_shape) != len(g_fn.event_shape) or tuple(m_fn.batch_shape) != tuple(g_fn.batch_shape):
        raise UserError(f"{g}'s site {name!r} has event shape {tuple(g_fn.event_shape)} and batch shape "
                        f"{tuple(g_fn.batch_shape)}, but {m}'s has event shape {tuple(m_fn.event_shape)} and batch "
                        f"shape {tuple(m_fn.batch_shape)}: give the guide the model's event dims (.to_event(n))")
    if tuple(model_site["value"].shape) != tuple(guide_site["value"].shape):
        raise UserError(f"{g}'s site {name!r} has shape {_per_point(guide_site)} per point, but {m}'s has "
                        f"{_per_point(model_site)}")
    if m_fn.support.is_discrete != g_fn.support.is_discrete:
        kinds = ("discrete", "continuous")
        raise UserError(f"{g}'s site {name!r} is {kinds[not g_fn.support.is_discrete]}, but {m}'s is "
                        f"{kinds[not m_fn.support.is_discrete]}")
    inside = m_fn.support.check(guide_site["value"])
    if not bool(inside.all()):
        raise UserError(f"{g} draws {name!r} outside the support of {m}'s {type(_base(m_fn)).__name__} "
                        f"({m_fn.support}): use a guide distribution on that support (e.g. LogNormal or Gamma "
                        "for a positive latent, Beta for one in (0, 1), Dirichlet for a simplex)")
