"""The ELBO with discrete latents summed out exactly (Pyro's TraceEnum_ELBO)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pyro.infer import TraceEnum_ELBO

from ._checks import checked_call, quiet_pyro_guesses
from ._weights import check_num_particles
from .elbo import kl_scaled_guide


@dataclass(frozen=True)
class EnumELBO:
    """Negative ELBO where every discrete site marked ``infer={"enumerate": "parallel"}`` is summed over
    its values instead of sampled: for M2 (Kingma et al. 2014) an unlabeled batch's loss is
    sum_y q(y|x) [-E_q(z|x,y) log p(x, y, z) / q(z|x, y)] - H[q(y|x)], exact in y.

    The mark may sit in the guide (M2's q(y|x): the sum runs over q(y|x)) or in the model with no guide
    site at all (a mixture prior c ~ Categorical(pi), z | c: the sum is p(x, z) = sum_c p(c) p(z|c) p(x|z)
    inside the bound). Sites without the mark are handled as in ``elbo`` (reparameterized or
    score-function), so a model without discrete latents gets the plain ELBO. Enumerated values occupy
    the dims left of the model's plates (Pyro's ``max_plate_nesting``, found by tracing the model once).
    """

    num_particles: int = 1
    value_from_log_weights: ClassVar[bool] = False
    _elbo: TraceEnum_ELBO = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_num_particles(self.num_particles)
        elbo = TraceEnum_ELBO(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1)
        object.__setattr__(self, "_elbo", elbo)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        def run(m, g):
            g = kl_scaled_guide(model, g)
            if not torch.is_grad_enabled():  # Pyro's differentiable_loss refuses a value without a graph
                return torch.as_tensor(self._elbo.loss(m, g, *args, **kwargs))
            return self._elbo.differentiable_loss(m, g, *args, **kwargs)
        with warnings.catch_warnings(), quiet_pyro_guesses():
            # a labeled batch has nothing to enumerate; that is expected, not a mistake
            warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured")
            return checked_call("enum-elbo", model, guide, run, args, kwargs, accepts_enumerated=True)
