"""One rank of the EP=2 `run_block` check (started by test_worker_commands.py).

Initialises gloo, calls the `run_block` handler with a context whose `subgroup` makes the
groups the way the rank loop does, and prints the result as JSON on its last line.
"""

from __future__ import annotations

import json

import torch.distributed as dist
from rank_procs import gloo_rank
from test_worker_commands import FakeContext, experiment_config, fixture_plan

from ampipe.pipeline.worker_commands import run_block


class DistContext(FakeContext):
    def subgroup(self, size: int):
        group, _ = dist.new_subgroups(group_size=size)
        return group


def main() -> None:
    with gloo_rank() as a:
        plan = fixture_plan("interleaved-p2")  # EP 2 in its dims: the world must be 2
        ctx = DistContext(rank=a.rank, world_size=a.world, backend="gloo")
        result = run_block({"config": experiment_config(plan, steps=2), "plan": plan}, ctx)
        print(json.dumps({"result": result, "events": ctx.events}), flush=True)


if __name__ == "__main__":
    main()
