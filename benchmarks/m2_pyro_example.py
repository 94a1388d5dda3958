"""Run Pyro's own semi-supervised VAE example beside ``m2_mnist.py``: same labels, budget and seed.

    # once: Pyro's examples/vae folder (ss_vae_M2.py and utils/) from a checkout of pyro-ppl, outside
    # this repository, and torchvision's raw MNIST files written from data/mnist.npz into it
    python3 dev.py shell-cmd .venv/bin/python benchmarks/m2_pyro_example.py --example-dir DIR --prepare
    python3 dev.py shell-cmd .venv/bin/python benchmarks/m2_pyro_example.py --example-dir DIR \\
        --sup-num 3000 --seed 0 --epochs 10 [--same-labels] [--binarize] [--aux-only-labeled]

Pyro's code is imported from ``DIR`` and run unchanged (``main(args)`` with the arguments of its example
command: enumeration, the auxiliary loss with multiplier 46, one 500-unit layer, z of 50, batch 200, Adam
lr 0.00042, beta1 0.9). This harness only sets one thread, stands in for visdom (which the example
imports), logs the per-epoch validation and test accuracies that the example prints to a CSV in
``benchmarks/results/m2_anchor/``, and optionally:

- ``--same-labels``: the labeled points are ``pyro_vae``'s ``balanced_subset(first 50 000 labels, n,
  seed)``, the points ``m2_mnist.py`` labels for that draw (Pyro's own pick uses numpy's RNG);
- ``--binarize``: every image served is a fresh Bernoulli draw of its pixels (the example trains on
  grayscale values as Bernoulli targets, which pyro-vae's likelihood check refuses);
- ``--aux-only-labeled``: the example's second SVI (the auxiliary loss) is stepped on labeled batches
  only. The example steps it on every batch; as both SVIs share one Adam and Pyro zeroes gradients
  to zero tensors (not None), every parameter then gets a second Adam step per batch with a zero
  gradient, a pure momentum step (``--ghost-check`` counts them).

The example asserts that the batch divides the labels; ``main`` is called directly, so 100 labels with
batch 200 run as in ``m2_mnist.py``: one labeled batch of 100 per epoch.
"""
from __future__ import annotations

import argparse
import csv
import os
import struct
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "m2_anchor"


def prepare(example_dir: Path) -> None:
    """torchvision's raw MNIST files, from the verified data/mnist.npz, where the example looks for them."""
    from pyro_vae.data import load_mnist

    train, test = load_mnist("data")
    raw = example_dir / "utils" / ".data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, split in (("train", train), ("t10k", test)):
        with open(raw / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(split.images), 28, 28) + split.images.astype(np.uint8).tobytes())
        with open(raw / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write(struct.pack(">II", 2049, len(split.labels)) + split.labels.astype(np.uint8).tobytes())
    cached = raw.parent.parent / "MNISTCached"  # the example's dataset class name is torchvision's folder name
    cached.mkdir(exist_ok=True)
    if not (cached / "raw").exists():
        (cached / "raw").symlink_to(Path("..") / "MNIST" / "raw")
    print(f"wrote {raw}")


def ghost_check(ex) -> None:
    """Two SVIs sharing one pyro.optim.Adam, as the example has them: count the decoder's Adam steps."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate

    pyro.set_rng_seed(0)
    vae = ex.SSVAE(z_dim=5, hidden_layers=[20], config_enum="parallel", aux_loss_multiplier=46)
    opt = pyro.optim.Adam({"lr": 1e-3})
    svi = SVI(vae.model, config_enumerate(vae.guide, "parallel", expand=True), opt,
              loss=TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False))
    aux = SVI(vae.model_classify, vae.guide_classify, opt, loss=Trace_ELBO())
    xs = torch.rand(8, 784)
    weight = vae.decoder.sequential_mlp[1].weight
    for i in range(4):
        before = weight.detach().clone()
        svi.step(xs)
        mid = weight.detach().clone()
        aux.step(xs)  # an unlabeled batch: model_classify scores nothing, the loss has no gradient
        steps = int(opt.optim_objs[weight].state[weight]["step"])
        print(f"batch {i + 1}: decoder Adam steps {steps}; moved {float((mid - before).abs().max()):.1e} by the "
              f"ELBO step, {float((weight.detach() - mid).abs().max()):.1e} by the aux SVI's zero-gradient step")


def run() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--example-dir", type=Path, required=True, help="Pyro's examples/vae folder")
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--ghost-check", action="store_true")
    p.add_argument("--sup-num", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.00042)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--same-labels", action="store_true")
    p.add_argument("--binarize", action="store_true")
    p.add_argument("--aux-only-labeled", action="store_true")
    p.add_argument("--tag", default=None, help="CSV name (default: from the options)")
    a = p.parse_args()
    if a.prepare:
        prepare(a.example_dir)
        return 0
    torch.set_num_threads(1)
    sys.path.insert(0, str(a.example_dir))
    sys.modules.setdefault("visdom", types.SimpleNamespace(Visdom=None))  # imported at the example's top
    import pyro
    import ss_vae_M2 as ex
    import utils.mnist_cached as mc

    if a.ghost_check:
        ghost_check(ex)
        return 0
    if a.same_labels:
        from pyro_vae.data.semi_supervised import balanced_subset

        def same_indices(y, sup_per_class):  # y: one-hot labels of the first 50 000 training points
            labels = y.argmax(-1)
            sup = balanced_subset(labels, sup_per_class * 10, a.seed)
            rest = torch.ones(len(labels), dtype=torch.bool)
            rest[sup] = False
            return sup.tolist(), torch.nonzero(rest).flatten().tolist()

        mc.get_ss_indices_per_class = same_indices
    if a.aux_only_labeled:
        epoch_fn = ex.run_inference_for_epoch

        def run_epoch(data_loaders, losses, periodic):
            step = losses[1].step
            losses[1].step = lambda xs, ys=None: step(xs, ys) if ys is not None else 0.0
            try:
                return epoch_fn(data_loaders, losses, periodic)
            finally:
                losses[1].step = step

        ex.run_inference_for_epoch = run_epoch
    if a.binarize:
        get = mc.MNISTCached.__getitem__
        mc.MNISTCached.__getitem__ = lambda self, i: (lambda xy: (torch.bernoulli(xy[0]), xy[1]))(get(self, i))

    tag = a.tag or (f"pyro_labels{a.sup_num}_seed{a.seed}" + ("_samelabels" if a.same_labels else "")
                    + ("_binarized" if a.binarize else "") + ("_auxonlylabeled" if a.aux_only_labeled else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, rows, t0 = RESULTS / f"{tag}.csv", [], time.perf_counter()

    def log(logger, msg):  # the example's print_and_log, also writing its accuracies to the CSV
        print(msg, flush=True)
        if " epoch: " in msg and "test accuracy" in msg:
            rows.append({"epoch": int(msg.split(" ", 1)[0]) + 1,
                         "valid_acc": 100 * float(msg.split("validation accuracy ")[1].split()[0]),
                         "test_acc": 100 * float(msg.split("test accuracy ")[1].split()[0]),
                         "wall_s": time.perf_counter() - t0})
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    ex.print_and_log = log
    args = types.SimpleNamespace(
        seed=a.seed, visualize=False, z_dim=50, hidden_layers=[500], cuda=False, enum_discrete="parallel",
        aux_loss=True, aux_loss_multiplier=46.0, learning_rate=a.lr, beta_1=a.beta1, jit=False,
        logfile=os.devnull, sup_num=a.sup_num, batch_size=a.batch_size, num_epochs=a.epochs)
    print(f"pyro {pyro.__version__}, torch {torch.__version__}, {vars(a)}", flush=True)
    ex.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(run())
