"""The fast path's one warning category, reported at the caller's line rather than the library's."""
from __future__ import annotations

import os
import sys
import warnings

import pyro
import torch

import pyro_vae

_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (pyro_vae, pyro, torch))


class ReplayWarning(RuntimeWarning):
    """The fast path runs differently from now on: eagerly (and why), or its graph uncompiled."""


def warn(message: str) -> None:
    """Warn with ``ReplayWarning`` at the first frame outside pyro-vae, Pyro and torch (the user's code).

    Where there is no such frame (the command line), the warning names no source line at all."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_INTERNAL)
                                 or frame.f_code.co_filename.startswith("<")):
        frame = frame.f_back
    if frame is None:
        warnings.warn_explicit(message, ReplayWarning, "pyro-vae", 0, module="pyro_vae")
        return
    g = frame.f_globals
    warnings.warn_explicit(message, ReplayWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=g.get("__name__", "__main__"), registry=g.setdefault("__warningregistry__", {}),
                           module_globals=g)
