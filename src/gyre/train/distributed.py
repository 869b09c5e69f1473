"""Data-parallel training over processes with ``torch.distributed``, as started by ``torchrun``.

Every process runs the same program. ``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the process group from them
(gloo on CPU, nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``). The Trainer then wraps
the model in :class:`torch.nn.parallel.DistributedDataParallel` and gives each process its part
of every global batch (:func:`shard`); rank 0 alone writes files.

What scales is data parallelism over sequences: every process holds the whole model and
computes the gradient of its share of each batch; one all-reduce per optimizer step averages
them. A model too large for one device, or one long sequence split in time, is not this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: how the training items are dealt to the processes
SHARDS = ("interleave", "contiguous")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes (1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment, once: ``nccl`` when
    ``device`` is a CUDA device (then this process uses ``cuda:LOCAL_RANK``), else ``gloo``.
    Returns True when this is (now) a distributed run of more than one process."""
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def context() -> Context:
    """This process's :class:`Context` (rank 0 of 1 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def is_main() -> bool:
    """True except on the processes of a distributed run other than rank 0."""
    return context().main


def broadcast(obj, src: int = 0):
    """``obj`` as process ``src`` has it, on every process (as it is when not distributed)."""
    ctx = context()
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is True on any (a stop request reaches all, so they
    leave the loop at the same step and no collective call is left waiting)."""
    ctx = context()
    if not ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over the processes."""
    ctx = context()
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(order: list[int], batch_size: int, ctx: Context, mode: str = "interleave"
          ) -> tuple[list[int], int]:
    """This process's items of an epoch's ``order`` and its batch size.

    ``batch_size`` is the global batch, split evenly: each process takes ``batch_size / world``
    items of it (``batch_size`` must be a multiple of the number of processes).

    * ``interleave`` (sequence tasks): :class:`torch.utils.data.DistributedSampler` over the
      epoch's order without its own shuffle; process ``r`` takes items ``r, r + world, ...``,
      so its ``b``-th batch and the others' together are exactly the single-process run's
      ``b``-th global batch. When ``len(order)`` is not a multiple of ``world``, the sampler
      repeats the first items to fill the last batch (torch's behaviour).
    * ``contiguous`` (a language model carrying its state from one batch to the next): process
      ``r`` takes the ``r``-th contiguous block of the order, so the items a process sees one
      after another stay consecutive pieces of its own tracks (a shuffled interleave would hand
      a carried state to a piece of another track). Use it with ``shuffle=False``.
    """
    if batch_size % ctx.world:
        raise ValueError(f"batch_size: {batch_size} does not split evenly over {ctx.world} "
                         "processes; the global batch must be a multiple of the process count")
    local = batch_size // ctx.world
    if ctx.world == 1:
        return list(order), local
    if mode == "interleave":
        sampler = torch.utils.data.DistributedSampler(
            range(len(order)), num_replicas=ctx.world, rank=ctx.rank, shuffle=False)
        return [order[i] for i in sampler], local
    if mode == "contiguous":
        per = -(-len(order) // ctx.world)
        padded = list(order) + list(order[: per * ctx.world - len(order)])
        return padded[ctx.rank * per:(ctx.rank + 1) * per], local
    raise ValueError(f"shard: got {mode!r}, expected one of {', '.join(SHARDS)}")


__all__ = ["Context", "SHARDS", "all_sum", "any_true", "broadcast", "context", "env_world_size",
           "init_from_env", "is_main", "shard", "shutdown"]
