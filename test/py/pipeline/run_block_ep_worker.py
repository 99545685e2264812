"""One rank of the EP=2 `run_block` check (started by test_worker_commands.py).

Initialises gloo, calls the `run_block` handler with a context whose `subgroup` makes the
groups the way the rank loop does, and prints the result as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# test_worker_commands (this folder) imports rank_procs (test/py): pytest puts both on the path, a rank needs them too.
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
from test_worker_commands import FakeContext, experiment_config, fixture_plan  # noqa: E402

from ampipe.pipeline.worker_commands import run_block  # noqa: E402


class DistContext(FakeContext):
    def subgroup(self, size: int):
        group, _ = dist.new_subgroups(group_size=size)
        return group


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init-file", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.init_file}", rank=a.rank, world_size=a.world)
    try:
        plan = fixture_plan("interleaved-p2")  # EP 2 in its dims: the world must be 2
        ctx = DistContext(rank=a.rank, world_size=a.world, backend="gloo")
        result = run_block({"config": experiment_config(plan, steps=2), "plan": plan}, ctx)
        print(json.dumps({"result": result, "events": ctx.events}), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
