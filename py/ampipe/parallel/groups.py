"""Process groups for expert parallelism (EP) and data parallelism (DP).

With `world_size` ranks and an expert-parallel size `ep`, ranks ``[i*ep, (i+1)*ep)`` form
an expert-parallel group (they shard the experts between them, and exchange tokens by
all-to-all). Every rank is also a data-parallel replica of the dense parameters, so dense
gradients are averaged over the whole world. The ranks holding the same experts (same
position in their EP group: ``ep_rank, ep_rank + ep, ...``) form the expert-data-parallel
group, over which expert gradients are reduced. This is Megatron-Core's layout with
tensor, pipeline and context parallelism of size 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["ExpertParallel", "ParallelGroups", "init_parallel_groups"]


@dataclass(frozen=True)
class ExpertParallel:
    """The expert-parallel group a layer's experts are sharded over. `group=None` with size 1: no comm."""

    group: Any  # torch.distributed ProcessGroup, or None when size == 1
    size: int
    rank: int

    @staticmethod
    def single() -> "ExpertParallel":
        return ExpertParallel(group=None, size=1, rank=0)

    @property
    def active(self) -> bool:
        """Whether dispatch/combine issue collectives (never with one rank)."""
        return self.size > 1


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep: ExpertParallel
    dp_group: Any  # dense parameters: every rank (None = the default group)
    dp_size: int
    expert_dp_group: Any  # expert parameters: ranks holding the same experts
    expert_dp_size: int

    @staticmethod
    def single() -> "ParallelGroups":
        return ParallelGroups(1, 0, ExpertParallel.single(), None, 1, None, 1)


def init_parallel_groups(expert_model_parallel_size: int) -> ParallelGroups:
    """Create the EP and expert-DP groups on an initialised default process group.

    Every rank must call this (``new_group`` is collective), with the same argument.
    """
    if not dist.is_available() or not dist.is_initialized():
        if expert_model_parallel_size != 1:
            raise RuntimeError(
                f"expert_model_parallel_size={expert_model_parallel_size} needs torch.distributed "
                "initialised (init_process_group) first"
            )
        return ParallelGroups.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = expert_model_parallel_size
    if ep < 1 or world % ep != 0:
        raise ValueError(
            f"parallelism.world_size: must be divisible by parallelism.expert_model_parallel_size ({ep}); got {world}"
        )
    ep_group = None
    for start in range(0, world, ep):
        g = dist.new_group(list(range(start, start + ep)))
        if start <= rank < start + ep:
            ep_group = g
    edp_group = None
    for pos in range(ep):
        g = dist.new_group(list(range(pos, world, ep)))
        if rank % ep == pos:
            edp_group = g
    return ParallelGroups(
        world_size=world,
        rank=rank,
        ep=ExpertParallel(group=ep_group if ep > 1 else None, size=ep, rank=rank % ep),
        dp_group=None,
        dp_size=world,
        expert_dp_group=edp_group,
        expert_dp_size=world // ep,
    )
