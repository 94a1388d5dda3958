"""In-memory datasets: arrays of points with optional labels, batched and binarized on the fly; .npz files."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
            yield _to(xb, device), (_to(self.labels[idx], device) if self.labels is not None else None)

    def head(self, n: int) -> ArrayDataset:
        """The first n points (all if n exceeds the size), same mode; a static draw is kept, not redrawn."""
        if n <= 0:
            raise UserError(f"head() needs a positive number of points, got {n}")
        out = object.__new__(ArrayDataset)
        out._x = self._x[:n].clone()
        out.labels = self.labels[:n].clone() if self.labels is not None else None
        out.binarize, out.image_shape = self.binarize, self.image_shape
        return out


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a fresh CPU batch) on ``device``. To a GPU it is copied from pinned memory without blocking,
    so drawing the next batch on the CPU overlaps the copy; the pinned block is not reused before the
    copy has finished (torch's caching host allocator records the copy's stream). The values are the same."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


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
        raise UserError(f"{path} is not a readable .npz file ({one_line(e)})") from None
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


