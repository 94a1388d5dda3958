"""Training and evaluation across processes with torch.distributed (NCCL on GPUs, gloo on CPUs).

Launch with ``torchrun --nproc_per_node N -m pyro_vae train ...``: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address, and every process runs the same command.

- ``--batch-size`` is the global batch. Every rank draws the same shuffled order and the same dynamic
  binarization (one data generator, one seed), then keeps its contiguous slice of each batch, as
  ``DistributedSampler`` shards an epoch.
- The estimators' losses are sums over the data plate, so the gradient of the whole batch is the
  *sum* of the ranks' gradients: one coalesced all-reduce per step, after the backward pass and
  before the optimizer, with SVI still the driver (as Pyro's ``HorovodOptimizer`` wraps the step).
  The ranks then make identical updates, and a deterministic program ends where a one-process run
  on the combined batch ends.
- The model's random draws use a stream per rank (seed + rank), like any data-parallel job.
- Only rank 0 writes checkpoints, metrics, plots and reports; every rank reads the checkpoint to
  resume.
- Evaluation deals whole batches of points to the ranks, seeds each batch by its index, and gathers
  the per-point results on every rank: the numbers equal a one-process evaluation's.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyro_vae.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def from_env() -> World:
    """The process's place in a torchrun job, or a single process when not launched by torchrun."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} is not within WORLD_SIZE {size}")
    return World(rank, size, local)


def start(world: World, device_type: str) -> None:
    """Join the process group: NCCL when the processes train on CUDA devices, gloo otherwise."""
    if not world.active or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    bound = {}
    if device_type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise UserError(f"local rank {world.local_rank} has no CUDA device "
                            f"(this machine has {torch.cuda.device_count()}); use fewer processes per node")
        torch.cuda.set_device(world.local_rank)
        # binds the group to this rank's GPU: NCCL connects at once, and a barrier or an object collective
        # can never pick another rank's device (the "guessing the device" failure of NCCL barriers)
        bound["device_id"] = torch.device("cuda", world.local_rank)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=30), **bound)


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank's own GPU (cuda:LOCAL_RANK) when training on CUDA."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def shard(world: World, *tensors):
    """This rank's contiguous slice of each tensor's first dim (None stays None)."""
    if not world.active:
        return tensors
    out = []
    for t in tensors:
        out.append(None if t is None else torch.tensor_split(t, world.size)[world.rank])
    return tuple(out)


def check_batch(world: World, batch_size: int, num_points: int) -> None:
    if world.active and min(batch_size, num_points) < world.size:
        raise UserError(f"--batch-size {batch_size} (and the data, {num_points} points) must give each of the "
                        f"{world.size} processes at least one point")


def all_reduce_grads(world: World, params) -> None:
    """Sum the gradients of ``params`` over the ranks, in one coalesced collective."""
    if not world.active or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def sum_scalars(world: World, values: list[float]) -> list[float]:
    """Each value summed over the ranks, in double precision (on the CPU with gloo, the GPU with NCCL)."""
    if not world.active:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(world: World, obj):
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def join(device: torch.device) -> World:
    """This process's world, with the process group started when torchrun launched several."""
    world = from_env()
    start(world, device.type)
    return world


def refuse(what: str) -> None:
    """Commands that run in one process say so under torchrun instead of each rank doing all the work."""
    if from_env().active:
        raise UserError(f"{what} runs in one process; launch it without torchrun (train and evaluate can use several)")


def on_main(world: World, fn):
    """``fn()`` on rank 0 only; an error there stops every rank (the others with its message)."""
    result, error, failure = None, None, None
    if world.main:
        try:
            result = fn()
        except Exception as e:
            failure = e
            error = str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}"
    error = gather_objects(world, error)[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result
