"""The MoE designs in use today against the Megatron-Core test double (its math written from
Megatron-Core 0.20's source, independently of ampipe's pieces): QK layernorm, sigmoid scores,
the expert bias (selection only; its counts and update), the top-k scaling factor, group-limited
top-k, shared experts with and without the gate, capacity factors; each alone and all together,
swapped for the pipelined block and unswapped, and through Megatron's ``--spec`` path
(``import_module(("ampipe.megatron", "gpt_layer_spec"))`` as gpt_builders.py does)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import megatron_double as md
from ampipe.adapters.megatron import MegatronLayerAdapter
from ampipe.model.adapter import NotSwappable
from ampipe.pipeline import AMPipeBlock, PlanError, block_dims, load_plan, swap_blocks, unswap_blocks
from ampipe.pipeline.plan import retarget_plan, validate_plan

from test_megatron_swap import PLANS, S, B, assert_close, batch, make_model, run

SIGMOID = dict(moe_router_score_function="sigmoid")
SHARED = dict(moe_shared_expert_intermediate_size=24, bias=False)
FEATURES = {
    "qk-layernorm": dict(qk_layernorm=True),
    "qk-layernorm-layernorm": dict(qk_layernorm=True, norm="LayerNorm"),
    "sigmoid": SIGMOID,
    "expert-bias": dict(SIGMOID, moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01),
    "scaling-factor": dict(moe_router_topk_scaling_factor=2.5),
    "group-topk": dict(moe_router_num_groups=2, moe_router_group_topk=1),
    "shared-expert": SHARED,
    "shared-expert-gate": dict(SHARED, moe_shared_expert_gate=True, moe_shared_expert_overlap=True),
    "all": dict(SIGMOID, qk_layernorm=True, moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
                moe_router_num_groups=2, moe_router_group_topk=1, **SHARED, moe_shared_expert_gate=True),
}


def bias_model(model, seed=0):
    """A non-zero expert bias in every router (so it changes the choice), counts zeroed, and
    QK-norm weights other than 1 (RMSNorm with unit weights would commute with rope)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, md.TopKRouter) and m.expert_bias is not None:
            m.expert_bias.copy_((torch.rand(m.expert_bias.shape, generator=g) - 0.5) * 0.2)
            m.local_tokens_per_expert.zero_()
        if isinstance(m, md.SelfAttention) and m.q_layernorm is not None:
            with torch.no_grad():
                for norm in (m.q_layernorm, m.k_layernorm):
                    norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=g) * 0.5)
    return model


def plan_for(model, name, capacity_scope="chunk"):
    """A fixture schedule retargeted to the double's layer (the -shared variant for a shared expert)."""
    adapter = MegatronLayerAdapter(model.decoder.layers[0])
    if adapter.cfg.has_shared_expert:
        name = {"grouped-p3-nonuniform": "grouped-p3-nonuniform-shared"}.get(name, name + "-shared")
    plan = retarget_plan(load_plan(PLANS / f"{name}.json"), block_dims(adapter, S, B))
    plan = dataclasses.replace(plan, capacity_scope=capacity_scope)
    validate_plan(plan)
    return plan


def run_counted(model, ids, labels):
    """`run`, the expert-bias counts it made and the biases after the double's own update
    (Megatron's finalize_model_grads), restoring the biases afterwards."""
    out = run(model, ids, labels)
    routers = [m for m in model.modules() if isinstance(m, md.TopKRouter) and m.expert_bias is not None]
    before = [r.expert_bias.clone() for r in routers]
    for i, r in enumerate(routers):
        out[f"counts.{i}"] = r.local_tokens_per_expert.clone()
    md.finalize_expert_bias(model)
    for i, (r, b) in enumerate(zip(routers, before)):
        out[f"updated_bias.{i}"] = r.expert_bias.clone()
        counts = out[f"counts.{i}"]
        assert torch.equal(r.expert_bias, b) == bool((counts == counts.mean()).all())  # moved unless balanced
        r.expert_bias.copy_(b)
    return out


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("plan_name", ["interleaved-p2", "grouped-p3-nonuniform"])
def test_swapped_double_equals_unswapped_with_each_feature_and_all(feature, plan_name):
    model = bias_model(make_model(**FEATURES[feature]))
    ids, labels = batch()
    ref = run_counted(model, ids, labels)
    report = swap_blocks(model, plan_for(model, plan_name))
    assert report.swapped == ["decoder.layers.0", "decoder.layers.1"] and not report.skipped and not report.notes
    got = run_counted(model, ids, labels)
    assert_close(ref, got)
    if "shared" in feature or feature == "all":
        assert any(k.startswith("grad.") and ".shared_experts." in k for k in got)
    unswap_blocks(model)
    assert_close(ref, run_counted(model, ids, labels), rel=0)


def test_capacity_over_the_sequence_with_position_drops_is_exact():
    model = bias_model(make_model(**FEATURES["all"], moe_expert_capacity_factor=0.5, moe_token_drop_policy="position"))
    ids, labels = batch()
    ref = run_counted(model, ids, labels)
    assert ref["counts.0"].sum() < S * B * 2  # slots were dropped
    report = swap_blocks(model, plan_for(model, "interleaved-p2", "sequence"))
    assert report.swapped == ["decoder.layers.0", "decoder.layers.1"] and not report.notes
    assert_close(ref, run_counted(model, ids, labels))


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_a_capacity_per_chunk_is_accepted_and_reported_as_a_different_function(policy):
    model = make_model(moe_expert_capacity_factor=0.5, moe_token_drop_policy=policy)
    ids, labels = batch()
    ref = run(model, ids, labels)
    report = swap_blocks(model, plan_for(model, "interleaved-p2", "chunk"))
    assert report.swapped == ["decoder.layers.0", "decoder.layers.1"]
    assert set(report.notes) == set(report.swapped)
    assert all("different function" in n for notes in report.notes.values() for n in notes)
    assert "note: decoder.layers.0: capacity sized per chunk" in str(report)
    got = run(model, ids, labels)
    assert not torch.allclose(got["layer0"], ref["layer0"], rtol=1e-4, atol=1e-5)  # other tokens dropped


def test_sequence_capacity_with_the_probs_policy_is_refused_by_name_before_any_layer_changes():
    model = make_model(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    with pytest.raises(ValueError, match="capacity_scope: sequence needs model.moe_token_drop_policy: position"):
        swap_blocks(model, plan_for(model, "interleaved-p2", "sequence"))
    assert not any(isinstance(l, AMPipeBlock) for l in model.decoder.layers)


def test_a_plan_without_the_shared_experts_ops_is_refused_before_any_layer_changes():
    model = make_model(**SHARED)
    adapter = MegatronLayerAdapter(model.decoder.layers[0])
    plan = retarget_plan(load_plan(PLANS / "interleaved-p2.json"),
                         {**block_dims(adapter, S, B), "moe_shared_expert_intermediate_size": None})
    with pytest.raises(PlanError, match="dims.moe_shared_expert_intermediate_size = None but the block has 24"):
        swap_blocks(model, plan)
    assert not any(isinstance(l, AMPipeBlock) for l in model.decoder.layers)


# --------------------------------------------------------------------------- Megatron's --spec path


def spec_model(cfg, plan_path, monkeypatch, **kw):
    """The double's GPT built the way gpt_builders.py does with ``--spec ampipe.megatron gpt_layer_spec``."""
    monkeypatch.setenv("AMPIPE_PLAN", str(plan_path))
    with md.megatron_modules():
        spec = md.import_module(("ampipe.megatron", "gpt_layer_spec"))
        return md.GPTModel(cfg, spec, vocab_size=64, max_sequence_length=S, **kw)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_the_spec_builds_megatrons_layers_that_pipeline_themselves(feature, tmp_path, monkeypatch):
    over = dict(FEATURES[feature])
    # every other layer dense (moe_layer_freq 2): the spec builds that one as Megatron would, unpipelined
    ref = bias_model(make_model(**over, dense_layers=(1,), moe_layer_freq=2))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_for(ref, "grouped-p3-nonuniform").to_dict()))
    model = bias_model(spec_model(ref.config, plan_path, monkeypatch, seed=0))
    assert isinstance(model.decoder.layers[0], AMPipeBlock) and isinstance(model.decoder.layers[0], md.TransformerLayer)
    assert not isinstance(model.decoder.layers[1], AMPipeBlock) and isinstance(model.decoder.layers[1].mlp, md.MLP)
    assert list(model.state_dict()) == list(ref.state_dict())  # Megatron's names: its checkpoints load
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    ids, labels = batch()
    assert_close(run_counted(ref, ids, labels), run_counted(model, ids, labels))
    assert model.decoder.layers[0].last_times is not None  # it ran the plan


def test_the_spec_names_what_it_cannot_build(tmp_path, monkeypatch):
    ref = make_model(**SHARED)
    monkeypatch.delenv("AMPIPE_PLAN", raising=False)
    with md.megatron_modules(), pytest.raises(RuntimeError, match="set AMPIPE_PLAN"):
        md.GPTModel(ref.config, md.import_module(("ampipe.megatron", "gpt_layer_spec")))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan_for(make_model(), "interleaved-p2").to_dict()))  # no shared expert
    with pytest.raises(PlanError, match="dims.moe_shared_expert_intermediate_size = None but the block has 24"):
        spec_model(ref.config, plan_path, monkeypatch)
    bad = dataclasses.replace(make_model().config, moe_router_score_function="sqrtsoftplus")
    with pytest.raises(NotSwappable, match="config.moe_router_score_function='sqrtsoftplus'"):
        spec_model(bad, plan_path, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("plan_name", ["interleaved-p2", "grouped-p3-nonuniform"])
def test_every_feature_swapped_equals_unswapped_on_cuda(plan_name):
    # the shared expert's op on a CUDA compute stream, the expert bias's counts added on the
    # device from the aux_loss op (scripts/gpu-check.sh, adapter-tests-cuda)
    model = bias_model(make_model(**FEATURES["all"])).cuda()
    ids, labels = (t.cuda() for t in batch())
    ref = run_counted(model, ids, labels)
    swap_blocks(model, plan_for(model, plan_name))
    got = run_counted(model, ids, labels)
    assert_close({k: v.cpu() for k, v in ref.items()}, {k: v.cpu() for k, v in got.items()}, rel=1e-4)
