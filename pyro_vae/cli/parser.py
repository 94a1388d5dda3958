"""The ``pyro-vae`` argument parser, and the run spec its options describe."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

ESTIMATOR_FLAGS = {"particles": "num_particles", "alpha": "alpha"}  # CLI flag -> estimator field


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, *, zero_allowed: bool):
    """An argparse type: a positive (or, with ``zero_allowed``, a finite non-negative) number of ``kind``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if zero_allowed and not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
        if not zero_allowed and not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"{'non-negative' if zero_allowed else 'positive'} {kind.__name__}"
    return parse


def _positive(kind):
    return _number(kind, zero_allowed=False)


def _at_least_two(text: str) -> int:
    value = _positive(int)(text)
    if value < 2:
        raise argparse.ArgumentTypeError("needs at least 2 draws to measure a spread")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid int") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text}")
    return value


def _non_negative(kind):
    return _number(kind, zero_allowed=True)


_non_negative_int, _non_negative_float = _non_negative(int), _non_negative(float)


BUDGET_KINDS = ("epochs", "seconds", "evals")


def _budget(text: str) -> tuple[str, float]:
    """'epochs=N', 'seconds=S' or 'evals=E' -> (kind, value), the value positive (an integer but for seconds)."""
    kind, sep, value = text.partition("=")
    kind = kind.strip()
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KIND=VALUE, e.g. epochs=10, seconds=600 or evals=3e7")
    if kind not in BUDGET_KINDS:
        raise argparse.ArgumentTypeError(f"unknown budget kind {kind!r}; known: {', '.join(BUDGET_KINDS)}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the {kind} budget {value!r} is not a number") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"a budget of {value} {kind} trains nothing; give a positive number")
    if kind != "seconds":
        if number != int(number):
            raise argparse.ArgumentTypeError(f"the {kind} budget must be a whole number, got {value}")
        return kind, int(number)
    return kind, number


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive integers, got {text!r}")
    return sizes


def _run_options(t: argparse.ArgumentParser) -> None:
    """Options shared by train and compare: what to build, on which data, with which budget."""
    from pyro_vae.data import BINARIZE_MODES, DATASETS
    from pyro_vae.guides import GUIDES
    from pyro_vae.models import MODELS

    pos_int, pos_float = _positive(int), _positive(float)
    g = t.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default=None, help="generative model (default: vae)")
    g.add_argument("--guide", choices=sorted(GUIDES), default=None, help="amortized guide (default: diagonal-normal)")
    g.add_argument("--latent-dim", type=pos_int, default=None, help="latent dimensions (default: 50)")
    g.add_argument("--hidden", type=_sizes, default=None, help="hidden layer sizes, e.g. 200,200 (default)")
    g.add_argument("--activation", default=None, help="tanh (default), relu or softplus")
    g.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default=None,
                   help="p(x|z) of conv-vae (default: bernoulli); gaussian for continuous data (--binarize none)")
    g.add_argument("--obs-scale", type=pos_float, default=None, help="fixed Gaussian sigma (default: learned)")
    g.add_argument("--channels", type=_sizes, default=None, help="conv channels per stride-2 layer (default: 32,64)")
    g.add_argument("--beta", type=pos_float, default=None, help="KL weight of beta-vae (default: 4)")
    g.add_argument("--kl-warmup", type=_non_negative_int, default=None, metavar="STEPS",
                   help="beta-vae: raise the KL weight linearly to beta over STEPS optimizer steps (default: 0)")
    g.add_argument("--aux-weight", type=_non_negative_float, default=None,
                   help="m2: weight of the classification loss on labeled batches (default: 0)")
    g = t.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(DATASETS), default=None, help="(default: mnist)")
    g.add_argument("--data-root", default=None, help="where datasets are found or cached (default: ./data)")
    g.add_argument("--binarize", choices=BINARIZE_MODES, default=None,
                   help="dynamic: a fresh Bernoulli draw per batch (default); static: one fixed draw; none: grayscale")
    g.add_argument("--train-points", type=pos_int, default=None, help="use only the first N training points")
    g.add_argument("--test-points", type=pos_int, default=None, help="use only the first N test points")
    g.add_argument("--labeled", type=pos_int, default=None, metavar="N",
                   help="semi-supervised: keep the labels of N training points (class-balanced), hide the rest")
    g.add_argument("--labeled-every", type=pos_int, default=None, metavar="K",
                   help="semi-supervised: a labeled batch after every K unlabeled ones, cycling the labeled "
                        "points (default: each labeled point once per epoch)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=pos_int, default=None, help="(default: 80, about 5 minutes on 2 CPU cores)")
    g.add_argument("--batch-size", type=pos_int, default=None, help="(default: 100)")
    g.add_argument("--lr", type=pos_float, default=None, help="Adam learning rate (default: 1e-3)")
    g.add_argument("--seed", type=_seed, default=None, help="(default: 0)")
    g.add_argument("--device", default=None, help="auto (default: CUDA when present), cpu or cuda")
    g.add_argument("--checkpoint-every", type=pos_int, default=None, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (default: once per epoch)")
    g.add_argument("--clip-norm", type=pos_float, default=None, help="clip each parameter's gradient norm")
    g.add_argument("--eager", dest="replay", action="store_const", const=False, default=None,
                   help="run the Pyro program on every step instead of replaying its recorded tensor graph "
                        "(same results, slower; for programs whose computation changes between steps)")
    g.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="also torch.compile the replayed graph: fused kernels, equal results to float tolerance, "
                        "some seconds of compilation per batch shape")


def build_parser() -> _Parser:
    from pyro_vae.estimators import ESTIMATORS

    pos_int = _positive(int)
    p = _Parser(prog="pyro-vae", description="Variational autoencoders as Pyro programs: train, compare estimators, evaluate, sample.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model, evaluate it and write a run folder",
                       description="Train with pyro.infer.SVI, evaluate the test ELBO and the importance-sampled "
                                   "log-likelihood, and write config, metrics, checkpoint, evaluation and plots.")
    _run_options(t)
    g = t.add_argument_group("objective")
    g.add_argument("--estimator", choices=sorted(ESTIMATORS), default=None, help="ELBO estimator (default: elbo)")
    g.add_argument("--particles", type=pos_int, default=None, help="samples per data point (K) for the estimator")
    g.add_argument("--alpha", type=float, default=None,
                   help="alpha of the renyi estimator: 0 is IWAE, 1 the ELBO; below 0 it is no lower bound")
    g = t.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<model>-<estimator>-seed<seed>-<time>)")
    g.add_argument("--resume", type=Path, metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint (--epochs may raise its length)")
    g.add_argument("--eval-samples", type=pos_int, default=5000, help="K for the IS log-likelihood (default: 5000)")
    g.add_argument("--eval-points", type=pos_int, default=2000,
                   help="test points for the IS log-likelihood after training (default: 2000; "
                        "`pyro-vae evaluate` uses all)")
    g.add_argument("--quiet", action="store_true", help="no progress bars; one log line per epoch")

    c = sub.add_parser("compare", help="train several estimators on the same budget and tabulate them",
                       description="Train each estimator with the same seeds, data, architecture and budget, each "
                                   "(estimator, seed) run in its own folder, then write compare.md/.csv (test NLL "
                                   "over seeds, paired differences against a baseline, test ELBO, KL, active units, "
                                   "consumed budget, gradient SNR) and plots into --out. Running the same command "
                                   "again skips finished runs and resumes interrupted ones.")
    c.add_argument("--estimators", required=True,
                   help=f"comma-separated, options after colons, e.g. elbo,analytic-kl,iwae:k=5,dreg:k=5,stl,"
                        f"renyi:alpha=0.5:k=5 (known: {', '.join(sorted(ESTIMATORS))})")
    _run_options(c)
    c.add_argument("--out", type=Path, default=None, help="folder for the runs and the table (default: runs/compare-<time>)")
    c.add_argument("--eval-samples", type=pos_int, default=5000, help="K for the IS log-likelihood (default: 5000)")
    c.add_argument("--eval-points", type=pos_int, default=2000, help="test points for the IS log-likelihood (default: 2000)")
    c.add_argument("--snr-repeats", type=_at_least_two, default=None,
                   help="gradient draws for the SNR (default: scaled to the training budget, 10 to 50, so that "
                        "they cost about a tenth of the training)")
    g = c.add_argument_group("comparison")
    g.add_argument("--seeds", type=pos_int, default=1,
                   help="train every estimator with seeds SEED..SEED+N-1 (default: 1; --seed defaults to 0)")
    g.add_argument("--baseline", default=None,
                   help="estimator the others are paired against, e.g. iwae-k5 or iwae:k=5 (default: the first)")
    g.add_argument("--budget", type=_budget, default=None, metavar="KIND=VALUE",
                   help="the same budget for every run: epochs=N, seconds=S (training wall clock per run) or "
                        "evals=E (model-and-guide evaluations, particles x training points; a multiple of every K). "
                        "With seconds or evals, --epochs is an optional cap (default: none). Default: --epochs")
    g.add_argument("--jobs", type=pos_int, default=1,
                   help="runs at a time, each in its own process with its share of the CPU threads (default: 1)")
    g.add_argument("--curve-points", type=_non_negative_int, default=200,
                   help="test points of the IS log-likelihood after every epoch, for the plot against time "
                        "(default: 200; 0: none)")
    g.add_argument("--curve-samples", type=pos_int, default=100,
                   help="K of that per-epoch IS log-likelihood (default: 100)")
    c.add_argument("--quiet", action="store_true")

    e = sub.add_parser("evaluate", help="IS log-likelihood and ELBO of a trained run on its test set")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--samples", type=pos_int, default=5000, help="K importance samples per point (default: 5000)")
    e.add_argument("--points", type=pos_int, default=None, help="only the first N test points (default: all)")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=_seed, default=0)
    e.add_argument("--quiet", action="store_true")

    s = sub.add_parser("sample", help="draw from the prior of a trained run and save a PNG grid")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    s.add_argument("--num", type=pos_int, default=64, help="number of samples (default: 64)")
    s.add_argument("--label", type=_non_negative_int, default=None,
                   help="for a label-conditioned model (cvae, m2): draw this class only")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/plots/samples.png)")
    s.add_argument("--device", default="auto")

    d = sub.add_parser("diagnose", help="posterior diagnostics of a trained run: PSIS k-hat, ESS, inference gaps",
                       description="Per-point PSIS k-hat, ESS and IS log p(x) of the guide as ArviZ InferenceData, "
                                   "amortization and approximation gaps, active units, and plots, written into "
                                   "RUN_DIR/diagnostics.")
    d.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    d.add_argument("--points", type=pos_int, default=100, help="test points for k-hat and ESS (default: 100)")
    d.add_argument("--samples", type=pos_int, default=1000, help="draws from q(z|x) per point, >= 100 (default: 1000)")
    d.add_argument("--gap-points", type=pos_int, default=50, help="test points for the inference gaps (default: 50)")
    d.add_argument("--gap-steps", type=pos_int, default=300, help="Adam steps of each local q*(z|x) (default: 300)")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--quiet", action="store_true")
    return p


def spec_from_args(a: argparse.Namespace):
    from pyro_vae.cli.runs import RunSpec, read_spec
    from pyro_vae.training.config import TrainConfig
    from pyro_vae.training.run_dir import RunDir

    base = read_spec(RunDir(a.resume)) if getattr(a, "resume", None) else RunSpec()
    network = dict(base.network)
    for flag, key in (("latent_dim", "latent_dim"), ("hidden", "hidden"), ("activation", "activation")):
        if getattr(a, flag) is not None:
            network[key] = getattr(a, flag)
    for flag in ("likelihood", "obs_scale", "channels"):  # options of the conv and Gaussian models
        if getattr(a, flag, None) is not None:
            network[flag] = getattr(a, flag)
    for flag, key in (("beta", "beta"), ("kl_warmup", "kl_warmup_steps"), ("aux_weight", "aux_weight")):
        if getattr(a, flag, None) is not None:
            network[key] = getattr(a, flag)
    data = dict(base.data)
    for flag, key in (("dataset", "name"), ("data_root", "root"), ("binarize", "binarize"),
                      ("train_points", "train_points"), ("test_points", "test_points"), ("labeled", "labeled"),
                      ("labeled_every", "labeled_every")):
        if getattr(a, flag) is not None:
            data[key] = getattr(a, flag)
    est_opts = dict(base.estimator_options)
    for flag, field in ESTIMATOR_FLAGS.items():
        if getattr(a, flag, None) is not None:
            est_opts[field] = getattr(a, flag)
    train = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in vars(base.train).items()}
    return RunSpec(model=a.model or base.model, guide=a.guide or base.guide,
                   estimator=getattr(a, "estimator", None) or base.estimator, estimator_options=est_opts,
                   network=network, data=data, train=TrainConfig(**train))
