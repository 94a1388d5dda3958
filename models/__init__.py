"""Generative models p(z) p_theta(x|z), each a PyroModule whose forward is the Pyro program.

Importable only as ``pyro_vae.models``: the package maps this folder there, so one class never
exists twice under two module names.
"""
if __name__ != "pyro_vae.models":  # pragma: no cover - guards against `import models` from the repo root
    raise ImportError("import this package as pyro_vae.models, not as models")

from .bernoulli_vae import BernoulliVAE
from .linear_gaussian import LinearGaussian

MODELS = {"vae": BernoulliVAE, "linear-gaussian": LinearGaussian}

__all__ = ["LinearGaussian", "MODELS", "BernoulliVAE"]
