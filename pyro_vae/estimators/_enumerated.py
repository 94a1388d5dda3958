"""log p(x, z) per particle and point with the model's enumerated sites summed out exactly.

A model may mark a discrete latent for parallel enumeration and give the guide no site for it (a mixture
prior: c ~ Categorical(pi) with ``infer={"enumerate": "parallel"}``, then z | c). Importance weights then
need log p(x, z) = log sum_c p(x, z, c) per point: the model is run under ``poutine.enum`` with the
guide's draws replayed, so each enumerated site takes all its values in a dim of its own left of the
particle plate, and Pyro's tensor contraction (``pyro.ops.contract.contract_to_tensor``, the one
``TraceEnum_ELBO`` uses) sums those dims out and multiplies over plates nested inside a data point,
leaving one term per particle and point. Pyro's rules for enumeration apply (the enumerated sites'
values must broadcast; each is summed within the plates it sits in).
"""
from __future__ import annotations

from collections import OrderedDict

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops.contract import contract_to_tensor
from pyro.ops.packed import pack, unpack
from pyro.poutine.util import site_is_subsample


def enumerated_trace(vectorized_model, values: poutine.Trace, nesting: int, args: tuple,
                     kwargs: dict) -> poutine.Trace:
    """The model's trace on the guide's draws ``values``, each enumerated site holding all its values in a
    dim of its own left of the particle plate (at -nesting-2 and further left)."""
    # enum inside replay, as in TraceEnum_ELBO: enum must see every site before replay marks it done
    enum = poutine.replay(poutine.enum(vectorized_model, first_available_dim=-nesting - 2), trace=values)
    return poutine.trace(enum).get_trace(*args, **kwargs)


def summed_log_density(vectorized_model, values: poutine.Trace, nesting: int, args: tuple, kwargs: dict, *,
                       observed: bool = True) -> torch.Tensor:
    """log sum over enumerated sites of p(x, z, c), shape (k, B), for ``vectorized_model`` (the model in a
    particle plate at dim -nesting-1) replayed on ``values`` (the guide's draws). With ``observed=False``
    only the latent sites enter: log p(z) = log sum_c p(z, c). Scales are not applied, masks are."""
    tr = enumerated_trace(vectorized_model, values, nesting, args, kwargs)
    tr.symbolize_dims()
    frames = {f.name: f for s in tr.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]}
    target = frozenset(tr.plate_to_symbol[n] for n, f in frames.items()
                       if f.vectorized and (n == "_particles" or f.dim == -1))
    tree: OrderedDict = OrderedDict()
    for site in tr.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site) or (site["is_observed"] and not observed):
            continue
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
        ordinal = frozenset(tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        tree.setdefault(ordinal, []).append(pack(lp, site["infer"]["_dim_to_symbol"]))
    enum_dims = set(tr.symbol_to_dim) - set(tr.plate_to_symbol.values())
    total = unpack(contract_to_tensor(tree, enum_dims, target_ordinal=target), tr.symbol_to_dim)
    k = frames["_particles"].size
    batch = next(f.size for f in frames.values() if f.vectorized and f.dim == -1)
    total = total.reshape((1,) * (nesting + 1 - total.dim()) + total.shape)
    return total.reshape(total.shape[0], total.shape[-1]).expand(k, batch)
