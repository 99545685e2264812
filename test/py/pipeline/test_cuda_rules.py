"""The decisions behind the CUDA paths, checked on CPU: the backward-stream rule, when
per-parameter events are needed, the shared executors, the sleep calibration's estimate,
the measured-vs-modelled delay report, dropless split sizes handed over from the host."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ampipe.parallel.expert_comm import dispatch_layout, exchange_counts, layout_from_counts
from ampipe.parallel.groups import ExpertParallel
from ampipe.pipeline import AMPipeBlock, EmulatedComm
from ampipe.pipeline.ops import HostCounts
from ampipe.pipeline.side_by_side import run_block_comparison
from ampipe.pipeline.emulation import delay_report, sleep_rate
from ampipe.pipeline.plan import PlanError, check_cuda_streams, compute_stream_count
from ampipe.pipeline.streams import shared_executor, stream_priority

from pipeline_helpers import (PLAN_NAMES, assert_equal_within, inputs, load, make_layer, step,
                              two_compute_streams)

torch.set_num_threads(1)


def _moved(plan, kind, chunk, stream):
    ops = tuple(dataclasses.replace(op, stream=stream) if (op.kind, op.chunk) == (kind, chunk) else op
                for op in plan.backward)
    return dataclasses.replace(plan, backward=ops)


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_every_fixture_runs_on_cuda_streams_as_written(name):
    plan = load(name)
    check_cuda_streams(plan)
    assert compute_stream_count(plan) == 1


def test_backward_op_on_another_stream_than_its_forward_is_rejected_for_cuda():
    plan = two_compute_streams(load("interleaved-p3"))
    check_cuda_streams(plan)
    assert compute_stream_count(plan) == 2
    bad = _moved(plan, "attn_bwd", 1, "compute")  # attn[1] is on compute2
    with pytest.raises(PlanError, match=r"'b\.attn\.1'.*'compute'.*'compute2'"):
        check_cuda_streams(bad)
    # the block applies the rule when it builds a CUDA executor (before touching the device)
    layer = make_layer(bad)
    block = AMPipeBlock.from_layer(layer, bad)
    with pytest.raises(PlanError, match="must use its forward op's stream"):
        block._ampipe._executor_for(torch.device("cuda"))
    # on CPU the stream of a compute op is only an order: it runs, and equals the baseline
    x, dy = inputs(bad)
    assert_equal_within(step(layer, layer, x, dy), step(block, layer, x, dy), 1e-5, "cpu")


@pytest.mark.parametrize("name", ["interleaved-p3", "grouped-p4-nonuniform"])
def test_two_compute_stream_plan_equals_baseline(name):
    plan = two_compute_streams(load(name, expert_model_parallel_size=1))
    assert {op.stream for op in plan.forward} == {"compute", "compute2", "comm"}
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(5, 100, 8))
    x, dy = inputs(plan)
    assert_equal_within(step(layer, layer, x, dy), step(block, layer, x, dy), 1e-5, name)


def test_blocks_share_one_executor_per_device_and_stream_spec():
    plan = load("interleaved-p2", expert_model_parallel_size=1)
    a = AMPipeBlock.from_layer(make_layer(plan), plan)
    b = AMPipeBlock.from_layer(make_layer(plan), plan)
    cpu = torch.device("cpu")
    assert a._ampipe._executor_for(cpu) is b._ampipe._executor_for(cpu)
    other = two_compute_streams(plan)
    assert shared_executor(other.streams, cpu) is not a._ampipe._executor_for(cpu)
    assert shared_executor(plan.streams, cpu, record_times=False) is not a._ampipe._executor_for(cpu)
    assert stream_priority("comm") < stream_priority("compute")


def test_sleep_rate_is_the_median_without_the_first_sample():
    # the first sample may catch the clock ramp (half the rate); the others agree
    assert sleep_rate(1_000_000, [2.0, 1.0, 1.0, 1.1, 0.9]) == pytest.approx(1e9)
    assert sleep_rate(1_000_000, [0.5, 0.5]) == pytest.approx(2e9)
    with pytest.raises(ValueError, match="unusable"):
        sleep_rate(1_000_000, [1.0, 0.0, 0.0])


def test_delay_report_sums_per_comm_kind():
    plan = load("interleaved-p2")
    measured = {op.id: 2.0 for op in plan.forward}
    modelled = {op.id: 1.0 for op in plan.forward if op.is_comm and op.kind != "counts"}  # no token moves
    rep = delay_report(plan.forward, measured, modelled)
    assert rep == {"dispatch": {"ops": 2, "measured_ms": 4.0, "modelled_ms": 2.0, "ratio": 2.0},
                   "combine": {"ops": 2, "measured_ms": 4.0, "modelled_ms": 2.0, "ratio": 2.0}}


def test_block_records_the_modelled_delay_of_every_comm_op():
    plan = load("grouped-p2", expert_model_parallel_size=1)
    layer = make_layer(plan)
    emu = EmulatedComm(latency_us=50, bandwidth_gbps=20, world_size=4)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
    x, dy = inputs(plan)
    step(block, layer, x, dy)
    d = plan.dims
    for name, ops in (("forward", plan.forward), ("backward", plan.backward)):
        got = block.last_delays_ms[name]
        assert set(got) == {op.id for op in ops if op.is_comm and op.kind != "counts"}
        for op in ops:
            if op.is_comm and op.kind != "counts":  # dropless: T_c * K rows of H fp32 values
                lo, hi = plan.chunk_rows(op.chunk)
                nbytes = (hi - lo) * d["micro_batch_size"] * d["moe_router_topk"] * d["hidden_size"] * 4
                assert got[op.id] == pytest.approx(emu.delay_s(nbytes) * 1e3)
    plain = AMPipeBlock.from_layer(layer, plan)
    step(plain, layer, x, dy)
    assert plain.last_delays_ms == {"forward": {}, "backward": {}}


def test_comparison_reports_measured_vs_modelled_delay_per_kind():
    plan = load("interleaved-p2", expert_model_parallel_size=1)
    out = run_block_comparison({}, plan, steps=1, warmup=0,
                               emulated_comm={"latency_us": 100, "bandwidth_gbps": 50})
    rep = out["emulated_delay"]
    assert set(rep) == {"dispatch", "combine", "dispatch_bwd", "combine_bwd"}
    for kind, row in rep.items():
        assert row["ops"] == 2 and row["modelled_ms"] >= 2 * 0.1 and row["measured_ms"] > 0, kind
        assert row["ratio"] == pytest.approx(row["measured_ms"] / row["modelled_ms"])
    assert run_block_comparison({}, plan, steps=1, warmup=0)["emulated_delay"] is None


def test_dropless_split_sizes_from_the_counts_op_match_the_direct_read():
    counts = torch.tensor([3, 0, 5, 1])
    ep = ExpertParallel.single()
    ref = dispatch_layout(counts, ep, 4, None)
    send, recv = HostCounts(exchange_counts(counts, ep)[0]).get()
    assert (send, recv) == ([3, 0, 5, 1], [3, 0, 5, 1])
    assert layout_from_counts(send, recv, 1, 4) == ref
    with pytest.raises(ValueError, match="counts must have 4 entries"):
        layout_from_counts([3, 0, 5], recv, 1, 4)


@pytest.mark.parametrize("scope,cf,policy,reads_per_chunk", [
    ("chunk", None, "probs", 1),           # dropless: the split sizes
    ("chunk", 0.5, "probs", 0),            # a capacity per chunk: static shapes, nothing read
    ("sequence", 0.5, "position", 1),      # the whole sequence's capacity: kept counts vary
])
@pytest.mark.parametrize("name", ["interleaved-p4", "grouped-p3-nonuniform"])
def test_the_host_reads_device_values_only_in_dispatch_once_per_chunk(monkeypatch, name, scope, cf,
                                                                      policy, reads_per_chunk):
    # Counted through wrappers of .tolist/.cpu/.item and Event/Stream/device synchronize
    # (host_reads.py), which set_sync_debug_mode does not see; the same rule on CUDA in
    # test_pipeline_cuda.py.
    from host_reads import count_host_reads
    from pipeline_helpers import load_scoped

    plan = load_scoped(name, scope, expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=cf, moe_token_drop_policy=policy)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(1, 100, 8))
    x, dy = inputs(plan)
    step(block, layer, x, dy)  # warm-up
    with count_host_reads(monkeypatch) as reads:
        y, losses = block(x)
        ((y * dy).sum() + losses.aux_loss + losses.z_loss).backward()
    want = {("forward", "dispatch", "tolist"): plan.num_chunks * reads_per_chunk} if reads_per_chunk else {}
    assert dict(reads) == want
