"""Amortized guides q_phi(z|x), each a PyroModule whose forward is the Pyro program.

Importable only as ``pyro_vae.guides`` (see models/__init__.py for why).
"""
if __name__ != "pyro_vae.guides":  # pragma: no cover
    raise ImportError("import this package as pyro_vae.guides, not as guides")

from .diagonal_normal import DiagonalNormalGuide
from .linear_gaussian import LinearGaussianGuide

GUIDES = {"diagonal-normal": DiagonalNormalGuide, "linear-gaussian": LinearGaussianGuide}

__all__ = ["LinearGaussianGuide", "GUIDES", "DiagonalNormalGuide"]
