"""The tensor-parallel group of a worker: which rank it is, and the three collectives the
model needs (an all-reduce after each row-parallel linear and the vocab-parallel embedding,
a gather of the logit shards to rank 0, a broadcast of rank 0's sampled tokens).

One rank (`TensorParallel.single()`) has no process group and every collective is the
identity, so a single-rank worker runs exactly the code it ran before tensor parallelism.
N ranks form one torch.distributed group, NCCL on CUDA and gloo on a CPU, meeting at a
TCP store on `master_addr:master_port` (rank 0 hosts it; every rank runs on this host).

A collective that waits on a dead peer fails: gloo sees the peer's socket close at once,
and the group's timeout bounds the wait on a live but stuck one. The worker treats that
failure as fatal (see worker/main.py), so the supervisor replaces the whole group.

The timeout is `worker.ready_timeout_s` (see `init_tensor_parallel`), not a constant of its
own: the longest legitimate wait in a collective is at start, where the rendezvous and the
KV-cache agreement wait for the slowest rank to load its shard, and that setting already
bounds a start. While serving, ranks wait between steps on the socket, never in a
collective, and a step stuck in one outlives its step deadline first: the supervisor then
kills and replaces the whole group, so no shorter timeout would end anything sooner.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """How a rank's part of a split dimension is cut; the layers and the LoRA sharding
    share it, so an adapter's A and B are always cut like their base weight."""

    rank: int = 0
    world_size: int = 1

    def part(self, size: int, replicas: int = 1) -> slice:
        """This rank's part of a dimension of `size`, split in world_size / replicas equal
        parts, each held by `replicas` neighbouring ranks (KV heads fewer than ranks)."""
        num_parts = self.world_size // replicas
        if size % num_parts:
            raise ValueError(f"a dimension of {size} does not split in {num_parts} parts")
        step = size // num_parts
        index = self.rank // replicas
        return slice(index * step, (index + 1) * step)


class TensorParallel:
    def __init__(self, rank: int, world_size: int, device: torch.device, group=None):
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.group = group  # None with one rank
        self.shard = ShardSpec(rank, world_size)

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> TensorParallel:
        return cls(0, 1, torch.device(device))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` concatenated along the last dimension; others: None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        torch.distributed.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def broadcast_ids(self, ids: list[int] | None, count: int) -> list[int]:
        """Rank 0's `count` ints on every rank (others pass None)."""
        if self.world_size == 1:
            return list(ids)
        if self.is_first:
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
        else:
            t = torch.empty(count, dtype=torch.long, device=self.device)
        torch.distributed.broadcast(t, src=0, group=self.group)
        return t.tolist()

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank (each passes its own)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def close(self) -> None:
        if self.group is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.group = None


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, *,
                         master_addr: str, master_port: int,
                         timeout_s: float) -> TensorParallel:
    """Join the group of `world_size` ranks (returns at once with one rank); `timeout_s`
    bounds the rendezvous and each collective (the worker passes worker.ready_timeout_s)."""
    if world_size == 1:
        return TensorParallel(0, 1, device)
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("this torch has no NCCL: tensor parallelism on CUDA needs it")
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s))
    options = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **options)
    return TensorParallel(rank, world_size, device, dist.group.WORLD)
