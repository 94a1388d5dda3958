"""Every random stream a run draws from (torch's CPU generator, Python, NumPy, and the CUDA generator of the
device the run trains on), saved and restored as one dict; and seeding a block without side effects.

Only the generators a run uses are saved: a CPU run saves no CUDA state even where CUDA exists, and a
run on ``cuda:i`` saves that one device's generator (under torchrun, each rank saves its own device's).
A checkpoint therefore restores on any machine, whatever its number of GPUs: the saved CUDA stream goes
to the device the resumed run trains on.
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

CUDA_KEY = "cuda_device"  # the one CUDA generator of the run's device
LEGACY_CUDA_KEY = "cuda"  # older checkpoints: one state per device of the machine that wrote them


def _cuda(device: torch.device | str | None) -> torch.device | None:
    """``device`` when it is a CUDA device (index None meaning the current one), else None."""
    if device is None:
        return None
    device = torch.device(device)
    return device if device.type == "cuda" else None


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The state of torch's CPU generator, Python's and NumPy's, and of ``device``'s CUDA generator when
    ``device`` is a CUDA device. Plain tensors and containers: a checkpoint loads it with weights_only."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    cuda = _cuda(device)
    if cuda is not None:
        state[CUDA_KEY] = torch.cuda.get_rng_state(cuda)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what ``rng_state`` saved; a saved CUDA stream goes to ``device``'s generator.

    A run on the CPU draws nothing from CUDA, so any CUDA state in ``state`` is left unused. A run on
    CUDA restored from a state without one (written by a CPU run, or by an older version for a device
    this machine lacks) keeps its current CUDA stream and says so on stderr: its CUDA draws then differ
    from those of a run that was never stopped.
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    cuda = _cuda(device)
    if cuda is None:
        return
    saved = state.get(CUDA_KEY)
    legacy = state.get(LEGACY_CUDA_KEY)
    if saved is None and legacy:
        # the older format saved every device of the machine that wrote it; take this device's entry
        index = _index(cuda)
        saved = legacy[index] if index < len(legacy) else None
        why = f"the saved states cover {len(legacy)} device(s), none for cuda:{index}"
    else:
        why = "the state was saved by a run that did not use CUDA"
    if saved is None:
        print(f"pyro-vae: warning: no saved CUDA random state for {cuda} ({why}); its CUDA draws continue "
              "from the current stream, so they differ from those of an uninterrupted run", file=sys.stderr)
        return
    torch.cuda.set_rng_state(saved, cuda)


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with torch's CPU generator, and ``device``'s CUDA generator if it is a CUDA device,
    seeded with ``seed``; both are put back afterwards, and no other generator is touched.

    ``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` would instead reseed every CUDA
    generator and restore none of them, changing the stream of whatever runs on the GPU afterwards.
    """
    cuda = _cuda(device)
    with torch.random.fork_rng(devices=[cuda] if cuda is not None else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda is not None:
            torch.cuda.default_generators[_index(cuda)].manual_seed(seed)
        yield


def program_device(*modules: torch.nn.Module) -> torch.device:
    """The device of the first parameter or buffer of ``modules`` (the CPU when they have none)."""
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            return t.device
    return torch.device("cpu")
