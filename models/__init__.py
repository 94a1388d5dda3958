"""Generative models p(z) p_theta(x|z), each a PyroModule whose forward is the Pyro program.

Importable only as ``pyro_vae.models``: the package maps this folder there, so one class never
exists twice under two module names.
"""
if __name__ != "pyro_vae.models":  # pragma: no cover - guards against `import models` from the repo root
    raise ImportError("import this package as pyro_vae.models, not as models")

from .autoencoder import Autoencoder
from .bernoulli_vae import BernoulliVAE
from .beta_vae import BetaVAE
from .conv_vae import ConvVAE
from .cvae import ConditionalVAE
from .gaussian_vae import GaussianVAE
from .linear_gaussian import LinearGaussian
from .m2 import M2
from .sbn import SigmoidBeliefNet
from .two_layer_vae import TwoLayerVAE

MODELS = {
    "vae": BernoulliVAE,
    "autoencoder": Autoencoder,
    "beta-vae": BetaVAE,
    "cvae": ConditionalVAE,
    "m2": M2,
    "linear-gaussian": LinearGaussian,
    "conv-vae": ConvVAE,
    "gaussian-vae": GaussianVAE,
    "two-layer-vae": TwoLayerVAE,
    "sbn": SigmoidBeliefNet,
}

__all__ = ["Autoencoder", "BernoulliVAE", "BetaVAE", "ConditionalVAE", "ConvVAE", "GaussianVAE", "LinearGaussian", "M2", "MODELS", "SigmoidBeliefNet", "TwoLayerVAE"]
