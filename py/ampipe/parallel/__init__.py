"""Process groups, expert-parallel all-to-all dispatch/combine, and gradient reduction."""

from .groups import ExpertParallel, ParallelGroups, init_parallel_groups
from .expert_comm import DispatchLayout, all_to_all, combine, dispatch, dispatch_layout
from .grad_sync import sync_gradients

__all__ = [
    "ExpertParallel", "ParallelGroups", "init_parallel_groups",
    "DispatchLayout", "all_to_all", "dispatch_layout", "dispatch", "combine",
    "sync_gradients",
]
