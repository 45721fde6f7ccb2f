"""torch.distributed glue: one process per device under ``torchrun``; a no-op otherwise."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "DistEnv",
    "from_environ",
    "setup",
    "teardown",
    "barrier",
    "is_initialized",
    "all_gather_cat",
    "all_gather_objects",
    "average_buffers",
    "check_same_across_ranks",
    "ResumableDistributedSampler",
    "ShardSampler",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environ() -> DistEnv:
    """Rank and world size as torchrun sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_type: str = "cpu") -> DistEnv:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); single process otherwise."""
    env = from_environ()
    if not env.is_distributed:
        return env
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend)
    return env


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order; ranks may hold different
    numbers of rows. Returns a tensor on ``tensor``'s device (identity in a single process)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    device = _collective_device()
    local = tensor.detach().to(device).contiguous()
    size = torch.tensor([local.shape[0]], device=device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)


def all_gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average ``module``'s floating-point buffers (BatchNorm running statistics) over ranks.

    Under DistributedDataParallel each rank updates its running statistics from its own batches;
    averaging them (timm's ``distribute_bn(reduce=True)``) makes evaluation and checkpoints see
    one set of statistics drawn from every rank's data.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    device = _collective_device()
    flat = torch.cat([b.detach().reshape(-1).to(device, torch.float64) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def check_same_across_ranks(module: nn.Module, what: str = "model") -> None:
    """Raise ``RuntimeError`` unless every rank holds bitwise the same parameters and buffers.

    Data-parallel ranks apply the same averaged gradients, so their weights must stay identical;
    a difference means the ranks went out of step (e.g. unequal numbers of batches).
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return
    names, tensors = zip(*[(n, t) for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
                           if t.is_floating_point()])
    device = _collective_device()
    mine = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float((mine != reference).any())], device=device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if differs.item():
        gap = (mine - reference).abs().max().item()
        raise RuntimeError(
            f"rank {dist.get_rank()}: the {what} differs between ranks (largest difference {gap:.3g} on this "
            f"rank; tensors checked: {len(names)}). Data-parallel ranks went out of step."
        )


class ResumableDistributedSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` whose epoch can start part-way.

    ``set_start_index(i)`` makes the next iteration skip this rank's first ``i`` items, so a run
    resumed mid-epoch continues with exactly the batches it had not yet trained on, without
    loading the others. The permutation depends only on ``seed`` and the epoch (not on the number
    of ranks), and rank r takes items r, r + world, ... of it, so with a per-rank batch of B/world
    the ranks' k-th batches together hold the same items as the k-th batch of size B in a single
    process. ``len()`` stays the epoch's full length.

    >>> sampler = ResumableDistributedSampler(range(10), num_replicas=1, rank=0, seed=0)
    >>> full = list(sampler)
    >>> sampler.set_start_index(4)
    >>> list(sampler) == full[4:], len(sampler)
    (True, 10)
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_start_index(self, index: int) -> None:
        if index < 0:
            raise ValueError(f"start index must be >= 0, got {index}")
        self.start_index = int(index)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)


class ShardSampler(Sampler):
    """Items ``rank, rank + world, ...`` in order: every item on exactly one rank, none repeated
    (unlike ``DistributedSampler``, which pads), so gathered evaluation outputs are the dataset."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n - self.rank) / self.num_replicas))
