"""An amortized guide built from the model alone: write only the model."""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.nets import ACTIVATIONS, mlp

from ._auto_families import SiteError, continuous, discrete, out_dim, support_name, uses_iaf
from ._auto_sites import ProgramSpec, SiteSpec, read_model, seeded
from .flow import iaf_steps

FAMILIES = ("diagonal", "lowrank", "iaf")
INPUT_TRANSFORMS = ("auto", "none", "log1p")


@dataclass(frozen=True)
class AutoAmortizedConfig:
    hidden: tuple[int, ...] = (200, 200)    # the shared network's layers (Burda et al.'s encoder); () = none
    activation: str = "tanh"
    structured: bool = True                 # each head also sees the sites drawn before it
    family: str = "diagonal"                # continuous sites: "diagonal", "lowrank" (+ diagonal) or "iaf"
    rank: int = 2                           # of the low-rank family
    num_flows: int = 2                      # of the IAF family
    flow_hidden: tuple[int, ...] | None = None
    context_dim: int = 50                   # IAF: size of the context each flow step sees
    head_hidden: tuple[int, ...] = ()       # hidden layers of each head; (): linear in [h(x), earlier sites]
    input_transform: str = "auto"           # "auto": log1p where every observed site holds counts
    enumerate: str | None = "parallel"      # mark for enumerable discrete sites the model leaves unmarked
    model_enumerated: str = "guide"         # a site the model marks for enumeration: "guide" (a head) or "model"
    init_scale: float = 0.1                 # starting scale of the global (non-amortized) Normals

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be one of {', '.join(INPUT_TRANSFORMS)}, got {self.input_transform!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(sorted(ACTIVATIONS))}")
        if self.model_enumerated not in ("guide", "model"):
            raise ValueError(f"model_enumerated must be 'guide' or 'model', got {self.model_enumerated!r}")
        if self.enumerate not in (None, "parallel", "sequential"):
            raise ValueError(f"enumerate must be None, 'parallel' or 'sequential', got {self.enumerate!r}")
        if int(self.rank) < 1 or int(self.num_flows) < 0 or int(self.context_dim) < 1 or not self.init_scale > 0:
            raise ValueError("rank and context_dim must be >= 1, num_flows >= 0 and init_scale > 0")
        if any(int(h) <= 0 for h in (*self.hidden, *self.head_hidden)):
            raise ValueError(f"layer sizes must be positive, got hidden={self.hidden}, head_hidden={self.head_hidden}")


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the last dim, broadcasting the dims before it (particles, enumerated values)."""
    if len(parts) == 1:
        return parts[0]
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], -1)


def _plate(plates: dict, name: str, size: int, dim: int) -> pyro.plate:
    if name not in plates:
        plates[name] = pyro.plate(name, size, dim=dim)
    return plates[name]


class AutoAmortized(PyroModule):
    """q(z|x) built from the model's own sites: an amortized guide nobody has to write.

    Reads the model by tracing it on an example batch (``example=`` and ``example_kwargs=``, or the
    first call), in the style of Pyro's AutoGuides, and finds every latent site. Sites inside
    ``pyro.plate("data")`` (dim -1) are amortized: one shared network (Burda et al. 2016's 200-200
    tanh encoder by default) reads each point's data -- ``x`` flattened per point, plus the tensor
    keyword arguments the model takes per point (labels one-hot, so a conditional VAE works), through
    ``log1p`` where every observed site holds counts -- and one head per latent site, in the model's
    order, gives that site's distribution. With ``structured`` (the default) each head also sees the
    values of the sites drawn before it (unconstrained, one-hot where categorical), so the guide
    q(z_1|x) q(z_2|x, z_1) ... can follow a hierarchical model's dependence (top-down, in the model's
    order, as in Sonderby et al. 2016). Heads are linear by default (``head_hidden``), as the linear
    dependencies of Pyro's AutoStructured, and their weights on the earlier sites start at 0: the
    guide starts mean-field and learns the dependence.

    Families, per site:
    - real support: Normal(mu, diag sigma^2) (``family="diagonal"``), low-rank plus diagonal
      covariance (``"lowrank"``, ``rank``), or that Normal through ``num_flows`` inverse autoregressive
      flow steps (``"iaf"``, Kingma et al. 2016, the steps of ``guides/flow.py``); any event shape,
      flattened for the head and reshaped for the site;
    - constrained support: the same family in unconstrained space pushed through
      ``biject_to(support)`` (positive, interval, simplex, correlation-Cholesky, ...), so
      log q(z) = log q(u) - log|det dz/du| exactly (the ADVI construction, Kucukelbir et al. 2017);
    - Bernoulli, Categorical, OneHotCategorical latents: an amortized head of the same family, with
      the model site's ``infer`` config copied; enumerable sites the model leaves unmarked are marked
      ``enumerate`` (``"parallel"`` by default) so ``enum-elbo`` sums them out; a site the model
      marks itself gets no guide site with ``model_enumerated="model"`` (summed out in the model);
    - a site whose log-density the model masks out entirely (``poutine.mask(mask=False)``, a plain
      autoencoder's prior) gets a masked point mass, as the ``point`` guide; ``has_density`` is then
      False;
    - latents outside the data plate (global): a non-amortized Normal in unconstrained space per site
      in the site's plates, as Pyro's AutoNormal (the importance-weighted estimators refuse these);
    - a site the model observes through a keyword argument in some calls and samples in others (M2's
      ``y``) gets a head used only in calls without that argument.

    Anything else (a support with no bijection, a dependent or learned support, a nested plate inside
    the data plate, an unsupported discrete family) is refused at construction with one line naming
    the site. All networks are submodules, built at construction when ``example`` is given (so the
    optimizer and the fast path see them, and a state dict loads into a freshly built guide); built on
    the first call otherwise, from a seed drawn at construction, so the weights depend only on the RNG
    state when the guide was made. The model is read, never owned: its parameters are not the guide's.

    Latent sites: the model's, with its shapes; reparameterized except the discrete ones.
    """

    Config = AutoAmortizedConfig
    built_from_model: ClassVar[bool] = True  # the CLI passes the model and an example batch

    def __init__(self, model, config: AutoAmortizedConfig = AutoAmortizedConfig(), *,
                 example: torch.Tensor | None = None, example_kwargs: dict[str, Any] | None = None):
        super().__init__(name="guide")
        self.config = config
        self.sites: list[SiteSpec] = []
        self._program: ProgramSpec | None = None
        self.__dict__["_model"] = model  # a plain reference: registered, its parameters would be the guide's
        self._init_seed: int | None = None
        if example is None:
            self._init_seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        else:
            self._build(example, dict(example_kwargs or {}))

    # ---- reading the model and building the networks -------------------------------------------------

    @property
    def built(self) -> bool:
        return self._program is not None

    @property
    def has_density(self) -> bool:
        return not any(s.kind == "point" for s in self.sites)

    def _build(self, x: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if x is None:
            raise ValueError("AutoAmortized reads the model on a batch of data: pass example=x")
        model = self.__dict__["_model"]
        try:
            program = read_model(model, x, kwargs, self.config.enumerate, self.config.model_enumerated)
        except SiteError as e:
            raise SiteError(f"AutoAmortized cannot build a guide for {type(model).__name__}: {e}") from None
        c = self.config
        self.counts = c.input_transform == "log1p" or (c.input_transform == "auto" and program.counts)
        width = program.x_width + sum(w for _, _, w in program.encoder_kwargs)
        hidden = tuple(int(h) for h in c.hidden)
        self.trunk = nn.Sequential(mlp([width, *hidden], c.activation), ACTIVATIONS[c.activation]()) \
            if hidden else nn.Identity()
        trunk_out = hidden[-1] if hidden else width
        heads, flows, locs, scales = nn.ModuleList(), nn.ModuleList(), nn.ParameterList(), nn.ParameterList()
        seen = 0
        for spec in program.sites:
            if spec.local:
                spec.index = len(heads)
                head = mlp([trunk_out + seen, *c.head_hidden, out_dim(spec, c)], c.activation)
                with torch.no_grad():  # start each head at the prior's location
                    head[-1].bias[:spec.init.numel()] += spec.init.to(head[-1].bias.dtype)
                    if seen:
                        # the weights on earlier sites start at 0: the guide starts mean-field and learns the
                        # dependence (from random weights, the earlier draws are noise that the head follows,
                        # and the two-layer VAE on MNIST stalled ~40 nats worse)
                        head[0].weight[:, trunk_out:] = 0.0
                    if c.family == "lowrank" and not spec.discrete and spec.kind != "point":
                        # a zero factor is a stationary point of F F^T: start it away from 0
                        head[-1].bias[2 * spec.free_dim:].normal_(0.0, 0.5)
                heads.append(head)
                iaf = uses_iaf(spec, c)
                flows.append(iaf_steps(spec.free_dim, int(c.context_dim), int(c.num_flows), c.flow_hidden,
                                       c.activation) if iaf else nn.ModuleList())
            else:
                spec.index = len(locs)
                locs.append(nn.Parameter(spec.init.clone().float()))
                raw = math.log(math.expm1(c.init_scale))  # softplus(raw) = init_scale
                scales.append(nn.Parameter(torch.full(spec.init.shape, raw)))
            if c.structured and (spec.local or spec.batch_shape == ()):
                seen += spec.feature_dim
        self.heads, self.flows, self.global_locs, self.global_scales = heads, flows, locs, scales
        if x.is_floating_point():
            self.to(dtype=x.dtype)
        self.to(device=x.device)
        self.sites, self._program = program.sites, program
        self.__dict__.pop("_model", None)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.built:
            raise RuntimeError("AutoAmortized has not read its model yet: build it with example=... (or call it "
                               "once) before loading a state dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- the program -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        if x is None:
            raise ValueError("AutoAmortized is an encoder q(z|x): it needs the data x")
        if not self.built:
            with seeded(self._init_seed), poutine.block():
                self._build(x, kwargs)
        h = self.trunk(self._encoder_input(x, kwargs))
        # one object per plate, made when first needed: making a plate records its subsample site
        plates: dict[str, pyro.plate] = {}
        seen: list[torch.Tensor] = []
        values = {}
        for spec in self.sites:
            given = kwargs.get(spec.kwarg) if spec.kwarg is not None else None
            free = None
            if given is not None:  # observed in the model in this call: no site here
                value = given
            elif spec.local:
                out = self.heads[spec.index](_cat([h, *seen]) if seen else h)
                with _plate(plates, "data", x.shape[0], -1):
                    value, free = self._sample_local(spec, out)
            else:
                value, free = self._sample_global(spec, plates)
            if self.config.structured and (spec.local or spec.batch_shape == ()):
                seen.append(spec.features(value, free).to(h.dtype))
            values[spec.name] = value
        return values

    def _encoder_input(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        n, program = x.shape[0], self._program
        dtype = next(self.parameters(), x if x.is_floating_point() else torch.empty(0)).dtype
        flat = x.reshape(n, -1).to(dtype)
        if flat.shape[1] != program.x_width:
            raise ValueError(f"AutoAmortized was built for data of {program.x_width} values per point, got "
                             f"{flat.shape[1]}")
        parts = [torch.log1p(flat) if self.counts else flat]
        for name, kind, width in program.encoder_kwargs:
            v = kwargs.get(name)
            if v is None:
                raise ValueError(f"AutoAmortized reads the keyword argument {name!r} (the example batch had it), "
                                 "but this call has none")
            v = nn.functional.one_hot(v.long(), width) if kind == "onehot" else v.reshape(n, -1)
            parts.append(v.to(dtype))
        return torch.cat(parts, -1)

    def _sample_local(self, spec: SiteSpec, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = out.shape[:-1]
        if spec.discrete:
            return pyro.sample(spec.name, discrete(spec, out), infer=dict(spec.infer)), None
        t = spec.transform()
        if spec.kind == "point":
            free = out.reshape(batch + spec.free_shape)
            with poutine.mask(mask=False):
                value = pyro.sample(spec.name, dist.Delta(t(free) if t is not None else free,
                                                          event_dim=len(spec.event_shape)))
        else:
            value = pyro.sample(spec.name, continuous(spec, self.config, out, t, self.flows[spec.index]))
        # the value as the program goes on with it (a replayed one, too); the cache gives a draw its own u
        return value, None if t is None else t.inv(value)

    def _sample_global(self, spec: SiteSpec, plates: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        loc = self.global_locs[spec.index]
        scale = nn.functional.softplus(self.global_scales[spec.index])
        t = spec.transform()
        with ExitStack() as stack:
            for name, size, dim in spec.frames:
                stack.enter_context(_plate(plates, name, size, dim))
            if spec.kind == "point":
                with poutine.mask(mask=False):
                    value = pyro.sample(spec.name, dist.Delta(t(loc) if t is not None else loc,
                                                              event_dim=len(spec.event_shape)))
            else:
                base = dist.Normal(loc, scale).to_event(len(spec.free_shape))
                value = pyro.sample(spec.name, dist.TransformedDistribution(base, [t]) if t is not None else base)
        return value, None if t is None else t.inv(value)

    # ---- reading what was built ---------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """One row per latent site: what the guide samples there and how."""
        rows = []
        for s in self.sites:
            family = s.kind if s.discrete else "point mass" if s.kind == "point" else (
                f"{self.config.family if (self.config.family != 'iaf' or uses_iaf(s, self.config)) else 'diagonal'} Normal"
                + (f" -> {support_name(s.support)}" if s.support is not None else ""))
            rows.append({"site": s.name, "where": "per point" if s.local else "global", "shape": s.event_shape,
                         "family": family, "latent unless given": s.kwarg or "",
                         "infer": s.infer if s.discrete else {}})
        return rows

    def extra_repr(self) -> str:
        if not self.built:
            return "not built yet: reads the model on its first call"
        return "sites: " + ", ".join(f"{r['site']} ({r['where']}, {r['family']})" for r in self.describe())
