"""What an estimator owes the user about their program, said once, from the sites its own run visits.

The estimators built on Pyro's ELBOs (elbo, analytic-kl, enum-elbo, tracegraph) never see the traces Pyro makes, so
the first call for a (model, guide, keyword set) runs the model and guide under small messengers that
only read each site's name, distribution and ``infer`` dict: no tensor work, no random draws, so the
call gives exactly the loss it would give without them (and the fast path can record it). They:

- refuse a model-side enumerated site (``infer={"enumerate": "parallel"}`` in the model, no guide site)
  in every estimator but enum-elbo, naming enum-elbo;
- refuse, for analytic-kl, a guide site that cannot be reparameterized, naming what fits;
- warn once per site where analytic-kl has no closed-form KL and falls back to Monte Carlo;
- warn once per site where a guide asks for a score-function baseline (``infer={"baseline": ...}``),
  which these estimators do not use (tracegraph honours it; vimco and rws warn through
  ``warn_ignored_baselines``).

Pyro's "Guessed max_plate_nesting" log line is dropped while our estimators call Pyro
(``quiet_pyro_guesses``), by a filter on that one logger, removed afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from weakref import WeakKeyDictionary

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import UserError

_CHECKED: WeakKeyDictionary = WeakKeyDictionary()  # guide -> WeakKeyDictionary(model -> {(estimator, keys)})
_WARNED: WeakKeyDictionary = WeakKeyDictionary()   # guide -> {(kind, site)} already warned about


class PyroVaeWarning(UserWarning):
    """A warning about the user's program that pyro-vae gives once, without a source line."""


def warn_once(owner, kind: str, site: str, message: str) -> None:
    try:
        seen = _WARNED.setdefault(owner, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        seen = set()
    if (kind, site) in seen:
        return
    seen.add((kind, site))
    # warn_explicit with a filename that is no file: the message alone, never an internal source line
    warnings.warn_explicit(message, PyroVaeWarning, filename="pyro-vae", lineno=0)


def warn_ignored_baselines(estimator: str, guide, guide_tr, why: str) -> None:
    """Once per site: a guide site asks for a score-function baseline this estimator has no use for."""
    for name, site in guide_tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and (site.get("infer") or {}).get("baseline"):
            warn_once(guide, "baseline", name, f"{estimator} ignores the baseline asked for at guide site {name!r} "
                      f"(infer={{'baseline': ...}}): {why}")


def enumerated_refusal(estimator: str, sites: list[str]) -> UserError:
    """The one message for a model-side enumerated site in an estimator that cannot sum it out."""
    return UserError(f"{estimator} cannot sum out the model's enumerated site(s) {', '.join(map(repr, sites))} "
                     "(infer={'enumerate': 'parallel'} in the model, no guide site): train with enum-elbo, "
                     "which sums them out exactly")


def model_only_enumerated(model_sites: dict[str, dict], guide_sites) -> list[str]:
    """Latent sites the model marks for parallel enumeration and the guide does not sample."""
    return [n for n, s in model_sites.items() if not s["is_observed"] and n not in guide_sites
            and (s.get("infer") or {}).get("enumerate") == "parallel"]


def _unwrap_independent(q, p):
    while isinstance(q, torch.distributions.Independent) and isinstance(p, torch.distributions.Independent):
        q, p = q.base_dist, p.base_dist
    return q, p


def has_closed_form_kl(q, p) -> bool:
    """Whether ``torch.distributions.kl_divergence(q, p)`` has a registered closed form for this pair, read
    from the registry without computing anything (what TraceMeanField_ELBO tries before falling back)."""
    q, p = _unwrap_independent(q, p)
    if isinstance(q, torch.distributions.Independent) and isinstance(p, torch.distributions.MultivariateNormal):
        return q.reinterpreted_batch_ndims == 1 and type(q.base_dist).__name__ in ("Normal", "Delta")
    return torch.distributions.kl._dispatch_kl(type(q), type(p)) is not NotImplemented


class _Sites(Messenger):
    """Records each sample site's message (name, fn, infer) as the program reaches it."""

    def __init__(self, sites: dict, on_site=None):
        super().__init__()
        self.sites, self.on_site = sites, on_site

    def _pyro_sample(self, msg) -> None:
        if site_is_subsample(msg):
            return
        if self.on_site is not None:
            self.on_site(msg)
        self.sites[msg["name"]] = msg


def _reparameterizable(fn) -> bool:
    return bool(getattr(fn, "has_rsample", False))


class _Check:
    def __init__(self, estimator: str, model, guide, *, accepts_enumerated: bool, analytic_kl: bool,
                 honours_baselines: bool = False):
        self.estimator, self.model, self.guide = estimator, model, guide
        self.accepts_enumerated, self.analytic_kl = accepts_enumerated, analytic_kl
        self.honours_baselines = honours_baselines
        self.guide_sites: dict = {}
        self.model_sites: dict = {}
        self.guide_checked = False

    def at_model_site(self, msg) -> None:
        if not self.guide_checked:  # the guide has run to its end when the model reaches its first site
            self.guide_checked = True
            self.check_guide()
        if (not self.accepts_enumerated and not msg["is_observed"] and msg["name"] not in self.guide_sites
                and (msg.get("infer") or {}).get("enumerate") == "parallel"):
            raise enumerated_refusal(self.estimator, [msg["name"]])

    def check_guide(self) -> None:
        latent = {n: s for n, s in self.guide_sites.items() if not s["is_observed"]}
        if self.analytic_kl:
            bad = [n for n, s in latent.items() if not _reparameterizable(s["fn"])]
            if bad:
                raise reparameterization_refusal(self.estimator, {n: latent[n]["fn"] for n in bad})
        for name, site in latent.items():
            if not self.honours_baselines and (site.get("infer") or {}).get("baseline") is not None:
                warn_once(self.guide, "baseline", name,
                          f"{self.estimator} ignores the baseline asked for at guide site {name!r} "
                          "(infer={'baseline': ...}): its gradient has no baseline-corrected score term")

    def after(self) -> None:
        if not self.guide_checked:
            self.check_guide()
        if not self.analytic_kl:
            return
        for name, site in self.model_sites.items():
            if site["is_observed"] or name not in self.guide_sites:
                continue
            q, p = self.guide_sites[name]["fn"], site["fn"]
            if not has_closed_form_kl(q, p):
                warn_once(self.guide, "kl", name,
                          f"analytic-kl has no closed-form KL({type(_base(q)).__name__} || {type(_base(p)).__name__}) "
                          f"at site "
                          f"{name!r}; that site's KL is estimated by Monte Carlo, as in elbo")


def checked_call(estimator: str, model, guide, run, args: tuple, kwargs: dict, *,
                 accepts_enumerated: bool = False, analytic_kl: bool = False, honours_baselines: bool = False):
    """``run(model, guide)``, checked as this module describes the first time this estimator meets this
    (model, guide, keyword set); later calls go straight to ``run``. ``run`` gets the programs wrapped
    (no attributes): it reads capabilities such as ``kl_scale`` from the originals."""
    key = (estimator, tuple(sorted(kwargs)), len(args))
    try:
        done = _CHECKED.setdefault(guide, WeakKeyDictionary()).setdefault(model, set())
    except TypeError:  # a program that is not weak-referenceable is checked every time
        done = set()
    if key in done:
        return run(model, guide)
    check = _Check(estimator, model, guide, accepts_enumerated=accepts_enumerated, analytic_kl=analytic_kl,
                   honours_baselines=honours_baselines)

    def watched_guide(*a, **kw):
        with _Sites(check.guide_sites):
            return guide(*a, **kw)

    def watched_model(*a, **kw):
        with _Sites(check.model_sites, check.at_model_site):
            return model(*a, **kw)

    result = run(watched_model, watched_guide)
    check.after()
    done.add(key)
    return result


def reparameterization_refusal(estimator: str, sites: dict) -> UserError:
    """The one message for guide sites an estimator needs reparameterized: it names the estimators that fit.

    ``sites`` maps each such site to its distribution. Discrete sites with an enumerable support fit
    enum-elbo when marked ``infer={"enumerate": "parallel"}``; any site fits the importance-weighted
    vimco and rws, tracegraph's ELBO with baselines, and elbo's plain score-function gradient."""
    described = ", ".join(f"{n!r} ({type(_base(fn)).__name__})" for n, fn in sites.items())
    enumerable = all(fn.support.is_discrete and fn.has_enumerate_support for fn in sites.values())
    fits = (["enum-elbo (mark the site infer={'enumerate': 'parallel'} to sum it out exactly)"] if enumerable else [])
    fits += ["vimco or rws (importance-weighted bounds)", "tracegraph (the ELBO with baselines)",
             "elbo (score-function gradients)"]
    return UserError(f"{estimator} needs reparameterizable guide sites, but {described} cannot be reparameterized; "
                     f"use {', '.join(fits[:-1])} or {fits[-1]}")


def _base(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


class _DropGuesses(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Guessed max_plate_nesting")


_PYRO_ELBO_LOGGER = logging.getLogger("pyro.infer.elbo")
_DROP = _DropGuesses()


@contextlib.contextmanager
def quiet_pyro_guesses():
    """Drop Pyro's "Guessed max_plate_nesting" INFO line while we call Pyro; nothing else of the user's
    logging set-up changes."""
    _PYRO_ELBO_LOGGER.addFilter(_DROP)
    try:
        yield
    finally:
        _PYRO_ELBO_LOGGER.removeFilter(_DROP)
