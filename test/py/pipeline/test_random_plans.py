"""Any plan the validator accepts runs to the baseline's result, not only the generated ones.

Hypothesis draws a fixture plan and mutates it within what the op-kind table allows: ops
moved to other streams of their kind (new ones too), each pass put in a random order its data
needs allow (the in-place attn_bwd ops in any order, each after the previous), every need
made a dep unless stream order already covers it (then sometimes), and extra deps on earlier
ops. `validate_plan` must accept each mutant, and the pipelined block running it on CPU must
equal the baseline: output, losses, dx and every parameter gradient within 1e-5 (fp32,
dropless), as the generated plans do in test_equivalence.py.
"""

from __future__ import annotations

import copy
import functools

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ampipe.pipeline import AMPipeBlock
from ampipe.pipeline.plan import OP_KINDS, data_needs, load_plan

from pipeline_helpers import assert_equal_within, inputs, load, make_layer, step

torch.set_num_threads(1)
REL = 1e-5
FIXTURES = ["grouped-p3-nonuniform-shared", "interleaved-p4", "interleaved-p2-shared", "grouped-p2",
            "moe-overlap-p3", "interleaved-p3-nonuniform-shared", "sequential-p1"]


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """The fixture at EP=1, a layer for it, inputs and the baseline's step (computed once)."""
    plan = load(name, expert_model_parallel_size=1)
    layer = make_layer(plan)
    x, dy = inputs(plan)
    return plan, layer, x, dy, step(layer, layer, x, dy)


def _mutate_pass(draw, ops: list[dict], needs: dict[str, list[str]], streams: dict[str, list[str]]) -> list[dict]:
    ops = copy.deepcopy(ops)
    by_id = {op["id"]: op for op in ops}
    # streams: any stream of the op's kind
    kind_of = {name: kind for kind, names in streams.items() for name in names}
    for op in ops:
        if draw(st.booleans()):
            op["stream"] = draw(st.sampled_from(streams[kind_of[op["stream"]]]))
    # order: a random topological order of the data needs
    left = {op["id"]: set(needs[op["id"]]) for op in ops}
    order: list[str] = []
    while left:
        ready = sorted(i for i, n in left.items() if not n)
        pick = draw(st.sampled_from(ready))
        order.append(pick)
        del left[pick]
        for n in left.values():
            n.discard(pick)
    # deps: every need not yet covered by stream order; covered ones and earlier ops sometimes
    out, index, hb, last_on = [], {}, [], {}
    prev_in_place: dict[str, str] = {}
    for i, op_id in enumerate(order):
        op = by_id[op_id]
        prev = last_on.get(op["stream"])
        covered = 0 if prev is None else hb[prev] | (1 << prev)
        must = list(needs[op_id])
        if OP_KINDS[op["kind"]].get("in_place") == "prefix" and op["kind"] in prev_in_place:
            must.append(prev_in_place[op["kind"]])
        deps = []
        for d in must:
            if not covered >> index[d] & 1 or draw(st.booleans()):
                deps.append(d)
        if i and draw(st.booleans()):
            deps.append(order[draw(st.integers(0, i - 1))])
        deps = list(dict.fromkeys(deps))
        mask = covered
        for d in deps:
            mask |= hb[index[d]] | (1 << index[d])
        index[op_id] = i
        hb.append(mask)
        last_on[op["stream"]] = i
        if OP_KINDS[op["kind"]].get("in_place") == "prefix":
            prev_in_place[op["kind"]] = op_id
        out.append({**op, "deps": deps})
    return out


@st.composite
def valid_mutants(draw):
    name = draw(st.sampled_from(FIXTURES))
    plan = _reference(name)[0]
    doc = plan.to_dict()
    extra = draw(st.sampled_from([[], [("compute2", "compute")], [("comm2", "comm")],
                                  [("compute2", "compute"), ("comm2", "comm")]]))
    doc["streams"] = [*doc["streams"], *({"name": n, "kind": k} for n, k in extra)]
    streams: dict[str, list[str]] = {}
    for s in doc["streams"]:
        streams.setdefault(s["kind"], []).append(s["name"])
    for pass_name, forward in (("forward", True), ("backward", False)):
        doc[pass_name] = _mutate_pass(draw, doc[pass_name], data_needs(plan, forward), streams)
    doc["variant"] = f"{plan.variant}-mutant"
    return name, doc


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(valid_mutants())
def test_random_plans_the_validator_accepts_equal_the_baseline(mutant):
    name, doc = mutant
    plan = load_plan(doc)  # validates: every mutant must be accepted
    _, layer, x, dy, ref = _reference(name)
    block = AMPipeBlock.from_layer(layer, plan)
    assert_equal_within(ref, step(block, layer, x, dy), REL, f"{name} mutant")
