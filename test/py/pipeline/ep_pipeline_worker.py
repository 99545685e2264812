"""One rank of the EP=2 pipelined-block check (started by test_expert_parallel_pipeline.py).

Each rank builds its shard of the same global weights, runs the baseline block and the
AMPipeBlock on its own input, and checks outputs, losses, dx and every local parameter
gradient. The all-to-alls run on the communication thread over gloo. Prints "<plan> ok".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_helpers import assert_equal_within, inputs, load, make_layer, step  # noqa: E402

from ampipe.parallel import init_parallel_groups  # noqa: E402
from ampipe.pipeline import AMPipeBlock, EmulatedComm  # noqa: E402

PLANS = ["interleaved-p2", "interleaved-p2-nonuniform", "grouped-p3", "grouped-p3-nonuniform"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init-file", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.init_file}", rank=a.rank, world_size=a.world)
    try:
        groups = init_parallel_groups(a.world)
        for i, name in enumerate(PLANS):
            plan = load(name)
            layer = make_layer(plan, ep=groups.ep)
            emu = EmulatedComm(latency_us=50, bandwidth_gbps=50.0, world_size=2) if i % 2 else None
            block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
            x, dy = inputs(plan, seed=100 + a.rank)
            ref = step(layer, layer, x, dy)
            got = step(block, layer, x, dy)
            assert_equal_within(ref, got, 1e-5, f"rank {a.rank} {name}")
            assert_equal_within(ref, step(block, layer, x, dy), 1e-5, f"rank {a.rank} {name} again")
            print(f"{name} ok", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
