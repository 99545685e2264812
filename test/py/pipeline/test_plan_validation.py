"""Plan loading and validation: every fixture loads; each broken plan is rejected, naming the op."""

from __future__ import annotations

import json

import pytest

from ampipe.pipeline import AMPipeBlock, PlanError, load_plan
from ampipe.pipeline.plan import check_dims

from pipeline_helpers import PLAN_NAMES, PLANS, load, make_layer, plan_doc

INVALID = json.loads((PLANS / "invalid" / "index.json").read_text())


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_fixture_plans_load(name):
    plan = load_plan(PLANS / f"{name}.json")
    assert plan.num_chunks == len(plan.boundaries) - 1
    assert len(plan.forward) == len({op.id for op in plan.forward})


@pytest.mark.parametrize("case", INVALID, ids=[c["file"] for c in INVALID])
def test_invalid_plans_are_rejected_naming_the_op(case):
    with pytest.raises(PlanError) as info:
        load_plan(PLANS / "invalid" / case["file"])
    for word in case["mentions"]:
        assert word in str(info.value), (case["rule"], str(info.value))


def test_missing_dependency_is_rejected_before_anything_runs(monkeypatch):
    import ampipe.pipeline.ops as blk

    calls = []
    monkeypatch.setattr(blk.pieces, "qkv", lambda *a, **k: calls.append(a))
    doc = plan_doc("interleaved-p2", expert_model_parallel_size=1)
    # experts of chunk 1 no longer wait for their dispatch (on the other stream)
    for op in doc["forward"]:
        if op["id"] == "f.experts.1":
            op["deps"] = []
    layer = make_layer(load("interleaved-p2", expert_model_parallel_size=1))
    with pytest.raises(PlanError, match=r"f\.experts\.1.*f\.dispatch\.1"):
        AMPipeBlock.from_layer(layer, doc)
    assert calls == []


def test_missing_op_and_bad_chunk_are_rejected():
    doc = plan_doc("grouped-p2")
    doc["forward"] = [op for op in doc["forward"] if op["id"] != "f.combine.1"]
    for op in doc["forward"]:
        op["deps"] = [d for d in op["deps"] if d != "f.combine.1"]
    with pytest.raises(PlanError, match="no 'combine' op for chunk 1"):
        load_plan(doc)
    doc = plan_doc("grouped-p2")
    doc["forward"][0]["chunk"] = 5
    with pytest.raises(PlanError, match=doc["forward"][0]["id"]):
        load_plan(doc)
    doc = plan_doc("grouped-p2")
    doc["boundaries"] = [0, 30, 20, 48]
    with pytest.raises(PlanError, match="boundaries"):
        load_plan(doc)


def test_comm_kind_on_a_compute_stream_is_rejected():
    doc = plan_doc("grouped-p2")
    op = next(o for o in doc["forward"] if o["kind"] == "dispatch")
    op["stream"] = "compute"
    with pytest.raises(PlanError, match=op["id"]):
        load_plan(doc)


def test_dims_that_do_not_match_the_block_are_rejected():
    plan = load("grouped-p2")
    layer = make_layer(plan)
    with pytest.raises(PlanError, match="dims.hidden_size"):
        check_dims(plan, {"hidden_size": 64})
    bad = plan_doc("grouped-p2", moe_ffn_hidden_size=128)
    with pytest.raises(PlanError, match="moe_ffn_hidden_size"):
        AMPipeBlock.from_layer(layer, bad)


def test_round_trip_to_dict():
    plan = load("interleaved-p3")
    assert load_plan(plan.to_dict()) == plan


def test_whole_sequence_attention_flag():
    # moe-overlap plans carry chunk_attention false; it round-trips, and only a boolean is accepted
    plan = load("moe-overlap-p3")
    assert not plan.chunk_attention and not plan.chunk_qkv
    assert [op.chunk for op in plan.forward if op.kind == "attn"] == [None]
    assert load_plan(plan.to_dict()) == plan
    doc = plan_doc("moe-overlap-p3")
    doc["chunk_attention"] = "no"
    with pytest.raises(PlanError, match="'chunk_attention' must be true or false"):
        load_plan(doc)
    # a plan with per-chunk attn ops may not say its attention is whole
    doc = plan_doc("grouped-p4")  # whole-sequence qkv, per-chunk attention
    with pytest.raises(PlanError, match=r"f\.attn\.0.*must be null"):
        load_plan({**doc, "chunk_attention": False})
