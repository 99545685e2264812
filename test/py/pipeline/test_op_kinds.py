"""The executor and the adapters agree with the one op-kind table (op_kinds.json, written from
src/plan/opkinds.ts): a forward and a backward handler for every kind, the parameter kinds the
adapters name, and the data needs the validator resolves from it."""

from __future__ import annotations

import json
from pathlib import Path

from ampipe.pipeline import ops, plan as plan_mod

from pipeline_helpers import load, make_layer

TABLE = json.loads((Path(plan_mod.__file__).with_name("op_kinds.json")).read_text())["kinds"]


def test_every_kind_has_its_handler_and_every_backward_its_forward():
    for kind, spec in TABLE.items():
        if spec["pass"] == "forward":
            assert kind in ops.FORWARD, kind
            if spec.get("backward"):
                # backward_op runs `<kind>_bwd` by `ops.BACKWARD`
                assert spec["backward"] == f"{kind}_bwd" and spec["backward"] in ops.BACKWARD, kind
                assert plan_mod.forward_kind(spec["backward"]) == kind
    assert set(plan_mod.FORWARD_KINDS) | set(plan_mod.BACKWARD_KINDS) == set(TABLE)
    assert plan_mod.COMM_KINDS == {k for k, v in TABLE.items() if v["stream"] == "comm"}


def test_the_parameter_kinds_are_the_ones_the_adapters_name():
    layer = make_layer(load("grouped-p2-shared"), qk_layernorm=True, moe_shared_expert_gate=True)
    assert set(layer.op_modules) == set(plan_mod.PARAM_KINDS) == {"qkv", "proj", "route", "experts", "shared"}
    covered = {id(p) for mods in layer.op_modules.values() for m in mods for p in m.parameters()}
    assert covered == {id(p) for p in layer.parameters()}


def test_data_needs_follow_the_table():
    p = load("interleaved-p3-nonuniform-shared")
    fwd, bwd = plan_mod.data_needs(p, True), plan_mod.data_needs(p, False)
    assert fwd["f.unpermute.1"] == ["f.combine.1", "f.route.1", "f.proj.1", "f.shared.1"]
    assert fwd["f.shared.2"] == ["f.proj.2"]
    assert bwd["b.proj.0"] == ["b.route.0", "b.unpermute.0", "b.shared.0"]
    assert not p.chunk_qkv and fwd["f.attn.2"] == ["f.qkv"]  # a whole-sequence qkv is read whole
    assert bwd["b.qkv"] == ["b.attn.0", "b.attn.1", "b.attn.2"]
    assert fwd["f.aux_loss"] == ["f.route.0", "f.route.1", "f.route.2"]
    q = load("interleaved-p3")  # no shared expert: no read of it; per-chunk qkv read up to the chunk
    assert plan_mod.data_needs(q, True)["f.unpermute.1"] == ["f.combine.1", "f.route.1", "f.proj.1"]
    assert q.chunk_qkv and plan_mod.data_needs(q, True)["f.attn.2"] == ["f.qkv.0", "f.qkv.1", "f.qkv.2"]
    assert plan_mod.data_needs(q, False)["b.qkv.1"] == ["b.attn.1", "b.attn.2"]
