"""Amortized guides q_phi(z|x), each a PyroModule whose forward is the Pyro program.

Importable only as ``pyro_vae.guides`` (see models/__init__.py for why).
"""
if __name__ != "pyro_vae.guides":  # pragma: no cover
    raise ImportError("import this package as pyro_vae.guides, not as guides")

from .auto import AutoAmortized
from .bernoulli import BernoulliGuide
from .conditional import ConditionalGuide
from .conv import ConvGuide
from .diagonal_normal import DiagonalNormalGuide
from .flow import IAFGuide
from .linear_gaussian import LinearGaussianGuide
from .m2 import M2Guide
from .point import PointGuide
from .relaxed_bernoulli import RelaxedBernoulliGuide
from .two_layer import TwoLayerGuide

GUIDES = {
    "auto": AutoAmortized,
    "diagonal-normal": DiagonalNormalGuide,
    "conditional": ConditionalGuide,
    "m2": M2Guide,
    "iaf": IAFGuide,
    "point": PointGuide,
    "linear-gaussian": LinearGaussianGuide,
    "conv": ConvGuide,
    "two-layer": TwoLayerGuide,
    "bernoulli": BernoulliGuide,
    "relaxed-bernoulli": RelaxedBernoulliGuide,
}

__all__ = ["AutoAmortized", "BernoulliGuide", "ConditionalGuide", "ConvGuide", "DiagonalNormalGuide", "GUIDES", "IAFGuide", "LinearGaussianGuide", "M2Guide", "PointGuide", "RelaxedBernoulliGuide", "TwoLayerGuide"]
