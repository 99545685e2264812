"""One rank of the EP=2 pipelined-block check (started by test_expert_parallel_pipeline.py).

Each rank builds its shard of the same global weights, runs the baseline block and the
AMPipeBlock on its own input, and checks outputs, losses, dx and every local parameter
gradient. The all-to-alls run on the communication thread over gloo. Prints "<plan> ok".
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from host_reads import count_host_reads
from pipeline_helpers import assert_equal_within, inputs, load, load_scoped, make_layer, step
from rank_procs import gloo_rank

from ampipe.model.expert_bias import update_expert_bias
from ampipe.parallel import init_parallel_groups
from ampipe.pipeline import AMPipeBlock, EmulatedComm

PLANS = ["interleaved-p2", "interleaved-p2-nonuniform", "grouped-p3", "grouped-p3-nonuniform",
         "moe-overlap-p2"]
SEQUENCE_PLANS = ["interleaved-p2", "grouped-p3-nonuniform", "grouped-p4", "interleaved-p8-nonuniform"]
# Every feature of test_moe_features.py at once (a gated shared expert, sigmoid scores with an
# expert bias, scaled gates, group-limited top-k, QK layernorm).
FEATURE_PLANS = ["grouped-p3-nonuniform-shared", "interleaved-p3-nonuniform-shared"]
FEATURES = dict(moe_router_score_function="sigmoid", qk_layernorm=True, moe_router_enable_expert_bias=True,
                moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2, moe_router_group_topk=1,
                moe_shared_expert_gate=True, moe_router_bias_update_rate=0.01)


def main() -> None:
    with gloo_rank() as a:
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
            # the exchanged counts reach the host once per chunk, in dispatch (host_reads.py)
            with count_host_reads(pytest.MonkeyPatch()) as reads:
                step(block, layer, x, dy)
            want = {("forward", "dispatch", "tolist"): plan.num_chunks}
            assert {k: v for k, v in reads.items() if k[0] is not None} == want, (name, dict(reads))
            print(f"{name} ok", flush=True)
        # capacity_scope sequence with drops (position policy): exact at EP=2 as well, the
        # kept counts exchanged by each chunk's counts op
        for i, name in enumerate(SEQUENCE_PLANS):
            plan = load_scoped(name, "sequence", expert_model_parallel_size=2)
            layer = make_layer(plan, ep=groups.ep, moe_expert_capacity_factor=0.5,
                               moe_token_drop_policy="position")
            emu = EmulatedComm(latency_us=50, bandwidth_gbps=50.0, world_size=2) if i % 2 else None
            block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
            x, dy = inputs(plan, seed=200 + a.rank)
            assert_equal_within(step(layer, layer, x, dy), step(block, layer, x, dy), 1e-5,
                                f"rank {a.rank} {name} sequence capacity")
            print(f"{name} sequence-capacity ok", flush=True)
        # The features together: exact at EP=2, the expert bias's counts too, and the bias update
        # from both ranks' counts (all-reduced) the same from either.
        for i, name in enumerate(FEATURE_PLANS):
            plan = load(name, expert_model_parallel_size=2)
            layer = make_layer(plan, ep=groups.ep, **FEATURES)
            router = layer.mlp.router
            router.expert_bias.copy_((torch.rand(4, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.2)
            emu = EmulatedComm(latency_us=50, bandwidth_gbps=50.0, world_size=2) if i % 2 else None
            block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
            x, dy = inputs(plan, seed=300 + a.rank)
            got = {}
            for label, run in (("baseline", layer), ("pipelined", block)):
                got[label] = step(run, layer, x, dy)
                got[label]["counts"] = router.local_tokens_per_expert.clone()
                router.local_tokens_per_expert.zero_()
            assert_equal_within(got["baseline"], got["pipelined"], 1e-5, f"rank {a.rank} {name} features")
            before, moved = router.expert_bias.clone(), []
            for label in ("baseline", "pipelined"):
                router.expert_bias.copy_(before)
                router.local_tokens_per_expert.copy_(got[label]["counts"])
                update_expert_bias(layer, groups.dp_group)
                moved.append(router.expert_bias.clone())
            total = got["baseline"]["counts"].clone()
            dist.all_reduce(total)
            want = before + 0.01 * torch.sign(total.mean() - total)
            assert torch.equal(moved[0], want) and torch.equal(moved[1], want), (moved, want)
            print(f"{name} features ok", flush=True)


if __name__ == "__main__":
    main()
