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


def test_an_op_takes_and_puts_only_what_its_kind_declares():
    import pytest

    from ampipe.pipeline.dataflow import Values, pass_flows

    p = load("interleaved-p3-nonuniform-shared")
    flows = pass_flows(p, True)
    values = Values()
    io = values.io(flows["f.attn.1"])
    io.put("context", "ctx")
    with pytest.raises(RuntimeError, match=r"op 'f\.attn\.1' \(attn\) would write 'h'"):
        io.put("h", None)
    proj = values.io(flows["f.proj.1"])
    assert proj.take("context") == "ctx"
    with pytest.raises(RuntimeError, match=r"op 'f\.proj\.1' \(proj\) would read 'permuted'"):
        proj.take("permuted")
    with pytest.raises(RuntimeError, match=r"would read 'context' \(chunk 0\)"):
        proj.take("context", 0)
    with pytest.raises(RuntimeError, match=r"f\.proj\.2.*context of chunk 2 was not written"):
        values.io(flows["f.proj.2"]).take("context")
    proj.release()  # its last reader: gone
    assert values.data == {}
    # what each op needs, for the CPU executor: the table's reads, as plan.data_needs
    assert {i: list(f.needs) for i, f in flows.items()} == plan_mod.data_needs(p, True)
    # a whole-sequence qkv's q is read by every chunk's attention, and freed after the last
    assert [f.op.id for f in flows.values() if ("q", None) in f.release] == ["f.attn.2"]


def test_every_value_is_freed_after_its_last_reader():
    import torch

    from ampipe.pipeline import AMPipeBlock
    from ampipe.pipeline.step import Step

    from pipeline_helpers import inputs

    for name, scope in (("grouped-p3-nonuniform-shared", "chunk"), ("interleaved-p4", "sequence")):
        p = load(name, expert_model_parallel_size=1)
        if scope == "sequence":
            p = plan_mod.load_plan({**p.to_dict(), "capacity_scope": scope})
        layer = make_layer(p, moe_expert_capacity_factor=1.0 if scope == "sequence" else None,
                           moe_token_drop_policy="position")
        engine = AMPipeBlock.from_layer(layer, p)._ampipe
        x, dy = inputs(p)
        engine._device = x.device
        st = Step(engine, x.detach().requires_grad_(True), engine._params(), track=True)
        with torch.enable_grad():
            engine._executor.run(p.forward, st.forward_op, "forward", needs=engine._needs["forward"])
        # what no later op reads: the last chunk's running count of a whole-sequence capacity
        left = {("routed_before", p.num_chunks - 1)} if scope == "sequence" else set()
        assert set(st.values.data) == left, name
        st.values.clear()
        st.begin_backward(dy, torch.ones(()), torch.ones(()))
        engine._executor.run(p.backward, st.backward_op, "backward", needs=engine._needs["backward"])
        assert st.values.data == {} and st.islands == {}, name
