"""The MoE designs in use today, pipelined: each alone and all together, the pipelined block
equals the baseline block (outputs, losses, dx, every gradient, and the expert bias's counts
and update) within 1e-5, fp32, for P in 1..4, grouped and interleaved (EP=2 in
test_expert_parallel_pipeline.py); the shared expert's op overlaps an all-to-all in the
executor's trace; a plan without the shared expert's ops is refused naming the dims field."""

from __future__ import annotations

import pytest
import torch

from ampipe.model.expert_bias import update_expert_bias
from ampipe.pipeline import AMPipeBlock, EmulatedComm, PlanError, apply_ampipe

from pipeline_helpers import assert_equal_within, inputs, load, load_scoped, make_layer, step

torch.set_num_threads(1)
REL = 1e-5

SIGMOID = dict(moe_router_score_function="sigmoid")
FEATURES = {
    "qk-layernorm": dict(qk_layernorm=True),
    "qk-layernorm-layernorm": dict(qk_layernorm=True, normalization="LayerNorm"),
    "sigmoid": SIGMOID,
    "expert-bias": dict(SIGMOID, moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01),
    "scaling-factor": dict(moe_router_topk_scaling_factor=2.5),
    "group-topk": dict(moe_router_num_groups=2, moe_router_group_topk=1),
    "shared-expert": {},
    "shared-expert-gate": dict(moe_shared_expert_gate=True),
    "all": dict(SIGMOID, qk_layernorm=True, moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
                moe_router_num_groups=2, moe_router_group_topk=1, moe_shared_expert_gate=True,
                normalization="RMSNorm", moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
}
SHARED = {"shared-expert", "shared-expert-gate", "all"}
PLANS = ["grouped-p1", "grouped-p2", "grouped-p3", "grouped-p4",
         "interleaved-p1", "interleaved-p2", "interleaved-p3", "interleaved-p4"]
# The same schedules with a shared expert's ops (P 3 with non-uniform chunks).
SHARED_PLANS = {"grouped-p3": "grouped-p3-nonuniform-shared", "interleaved-p3": "interleaved-p3-nonuniform-shared"}


def plan_name(name: str, feature: str) -> str:
    return SHARED_PLANS.get(name, f"{name}-shared") if feature in SHARED else name


def biased(layer, seed: int = 0):
    """A non-zero expert bias (so it changes which experts are chosen), counts zeroed."""
    router = layer.mlp.router
    if router.expert_bias is not None:
        g = torch.Generator().manual_seed(seed)
        router.expert_bias.copy_((torch.rand(router.expert_bias.shape, generator=g) - 0.5) * 0.2)
        router.local_tokens_per_expert.zero_()
    return layer


def counted(layer, run) -> dict[str, torch.Tensor]:
    """`run()`'s results and the slots it counted for the expert bias (then zeroed)."""
    out = run()
    counts = layer.mlp.router.local_tokens_per_expert
    if counts is not None:
        out["expert-bias counts"] = counts.clone()
        counts.zero_()
    return out


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("name", PLANS)
def test_pipelined_block_equals_baseline_with_each_feature_and_all(name, feature):
    plan = load(plan_name(name, feature), expert_model_parallel_size=1)
    layer = biased(make_layer(plan, **FEATURES[feature]))
    assert layer.cfg.has_shared_expert == plan.shared_expert
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan, seed=4)
    ref = counted(layer, lambda: step(layer, layer, x, dy))
    got = counted(layer, lambda: step(block, layer, x, dy))
    assert_equal_within(ref, got, REL, f"{name} {feature}")
    if layer.cfg.moe_router_enable_expert_bias:
        # each call counted its T·k kept slots once (not once per chunk), and the update moves
        # the bias the same way from either
        assert got["expert-bias counts"].sum() == x.shape[0] * x.shape[1] * layer.cfg.moe_router_topk
        bias = layer.mlp.router.expert_bias
        before = bias.clone()
        moved = []
        for counts in (ref["expert-bias counts"], got["expert-bias counts"]):
            bias.copy_(before)
            layer.mlp.router.local_tokens_per_expert.copy_(counts)
            assert update_expert_bias(layer) == 1
            moved.append(bias.clone())
        assert torch.equal(moved[0], moved[1]) and not torch.equal(moved[0], before)


def test_the_shared_expert_really_overlaps_an_all_to_all_in_the_trace():
    # Emulated all-to-alls of 30 ms each: in the recorded op times of a pipelined step, a
    # shared-expert op runs while a dispatch or combine is in flight, in both passes.
    plan = load("grouped-p2-shared")
    layer = make_layer(plan, moe_shared_expert_gate=True)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(latency_us=30_000, bandwidth_gbps=100.0,
                                                                            world_size=8))
    x, dy = inputs(plan)
    assert_equal_within(step(layer, layer, x, dy), step(block, layer, x, dy), REL, "emulated")
    for pass_name in ("forward", "backward"):
        recs = block.last_times[pass_name].records()
        comm = [r for r in recs if r.kind in ("dispatch", "combine", "dispatch_bwd", "combine_bwd")]
        shared = [r for r in recs if r.kind in ("shared", "shared_bwd")]
        assert len(shared) == plan.num_chunks and all(s.stream == "compute" for s in shared)
        overlapping = [(s.id, c.id) for s in shared for c in comm
                       if c.start_ms < s.start_ms + s.ms and s.start_ms < c.start_ms + c.ms]
        assert overlapping, f"{pass_name}: no shared-expert op ran during an all-to-all: {recs}"


def test_capacity_over_the_sequence_stays_exact_with_every_feature():
    plan = load_scoped("interleaved-p3-nonuniform-shared", "sequence", expert_model_parallel_size=1)
    layer = biased(make_layer(plan, **FEATURES["all"], moe_expert_capacity_factor=0.5,
                              moe_token_drop_policy="position"))
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan, seed=5)
    ref = counted(layer, lambda: step(layer, layer, x, dy))
    got = counted(layer, lambda: step(block, layer, x, dy))
    assert_equal_within(ref, got, REL, "sequence capacity")
    kept = got["expert-bias counts"].sum()
    assert kept < x.shape[0] * x.shape[1] * layer.cfg.moe_router_topk  # slots were dropped, and not counted


def test_a_plan_without_the_shared_experts_ops_is_refused_naming_the_field():
    shared_layer = make_layer(load("grouped-p2-shared"))
    with pytest.raises(PlanError, match="dims.moe_shared_expert_intermediate_size = None but the block has 48"):
        apply_ampipe(shared_layer, load("grouped-p2"))
    assert type(shared_layer).__name__ == "TransformerLayer"  # left as it was
    with pytest.raises(PlanError, match="dims.moe_shared_expert_intermediate_size = 48 but the block has None"):
        apply_ampipe(make_layer(load("grouped-p2")), load("grouped-p2-shared"))
