"""The process group of a retraining run under ``torchrun``: ranks, device, data shards.

With ``WORLD_SIZE > 1`` a run trains with DistributedDataParallel (gloo on CPU, NCCL on
GPUs): each rank sees its shard of every epoch's permutation, rank 0 decides what only one
process should (trials, RTL checks) and shares the outcome, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..nn import ActivationQuantizer
from ..train import Loaders
from .retrain_config import RetrainError

__all__ = ["Dist", "init_distributed", "run_device", "shard_loaders"]


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this run initialized the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, 0)
        return box[0]

    def sync_observers(self, model: nn.Module) -> None:
        """Make every activation range rank 0's.

        DDP runs without per-forward buffer broadcasts (they would ship every LUT table each
        step); activation ranges are made identical from rank 0 after every epoch instead.
        """
        if self.world == 1:
            return
        for m in model.modules():
            if isinstance(m, ActivationQuantizer):
                for b in m.buffers():
                    torch.distributed.broadcast(b, 0)


def init_distributed() -> Dist:
    """Join (or start) the process group that ``torchrun`` describes in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), True)


def run_device(d: Dist) -> torch.device:
    """This rank's GPU (by ``LOCAL_RANK``), or the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", d.rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _EpochSeededDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch is drawn from a generator that ``fit`` reseeds per epoch.

    :func:`appmult.train.fit` reseeds ``loader.generator`` from ``(seed, epoch)`` at
    the start of every epoch but does not call ``set_epoch``; drawing the epoch from that
    generator gives every rank the same permutation (so the shards partition it) and makes
    a resumed run replay the same shards.
    """

    def __init__(self, dataset, generator: torch.Generator, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.generator = generator

    def __iter__(self):
        self.set_epoch(int(torch.randint(0, 2 ** 31 - 1, (), generator=self.generator)))
        return super().__iter__()


def shard_loaders(loaders: Loaders, d: Dist, batch_size: int) -> Loaders:
    """``loaders`` with this rank's shard of every training epoch (unchanged on one process)."""
    if d.world == 1:
        return loaders
    if batch_size % d.world:
        raise RetrainError(f"Batch size {batch_size} must be divisible by the {d.world} processes")
    gen = torch.Generator()
    ds = loaders.train.dataset
    sampler = _EpochSeededDistributedSampler(ds, gen, d.world, d.rank)
    train = DataLoader(ds, batch_size=batch_size // d.world, sampler=sampler, generator=gen)
    return Loaders(train, loaders.test, loaders.info)
