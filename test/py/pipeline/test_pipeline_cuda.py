"""The pipelined block on CUDA (skipped without a GPU): equivalence in fp32 and bf16, and
no host synchronisation inside the block (sync debug mode set to "error"); a plan with two
compute streams; dropless routing without a synchronising read of the counts; the emulated
delay's calibration (measured vs modelled)."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from ampipe.pipeline import AMPipeBlock, EmulatedComm
from ampipe.pipeline.side_by_side import run_block_comparison
from ampipe.pipeline.emulation import DelayInjector
from ampipe.pipeline.plan import PlanError

from host_reads import count_host_reads
from pipeline_helpers import inputs, load, load_scoped, make_layer, two_compute_streams

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PLANS = ["sequential-p1", "grouped-p4-nonuniform", "interleaved-p3", "interleaved-p8-nonuniform"]


def _step(block, layer, x, dy, dtype):
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y, losses = block(x)
        obj = (y.float() * dy).sum() + 3 * losses.aux_loss + 5 * losses.z_loss
    obj.backward()
    out = {"y": y.detach().float(), "aux_loss": losses.aux_loss.detach().float(), "dx": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    return out


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", PLANS)
def test_cuda_pipelined_block_equals_baseline(name, dtype, rel):
    plan = load(name, expert_model_parallel_size=1)
    layer = make_layer(plan).cuda()
    emu = EmulatedComm(latency_us=20, bandwidth_gbps=50, world_size=8)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
    x, dy = inputs(plan)
    x, dy = x.detach().cuda().requires_grad_(True), dy.cuda()
    ref = _step(layer, layer, x, dy, dtype)
    for _ in range(2):
        got = _step(block, layer, x, dy, dtype)
        for k in ref:
            scale = ref[k].abs().max().item() or 1.0
            err = (got[k] - ref[k]).abs().max().item() / scale
            assert err <= rel, f"{name} {dtype}: {k} differs by {err:.3e}"
    times = block.last_times["backward"].op_times_ms  # CUDA events, read after the step
    assert set(times) == {op.id for op in plan.backward}


@pytest.mark.parametrize("name", ["interleaved-p4", "grouped-p8-nonuniform"])
def test_cuda_block_performs_no_host_synchronisation(name, monkeypatch):
    # A capacity per chunk keeps every shape static: no host read at all, neither one that
    # set_sync_debug_mode flags nor an Event.synchronize()/.cpu()/.tolist() it does not
    # (counted by host_reads.py).
    plan = load(name, expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=4.0).cuda()
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(20, 50, 8))
    x, dy = inputs(plan)
    x, dy = x.detach().cuda().requires_grad_(True), dy.cuda()
    with count_host_reads(monkeypatch) as reads:
        _no_sync_step(block, x, dy)
    assert {k: v for k, v in reads.items() if k[0] is not None} == {}
    assert torch.isfinite(x.grad).all()


def _no_sync_step(block, x, dy):
    y, losses = block(x)  # warm-up: lazy init (cuBLAS handles, rope tables) may sync once
    ((y * dy).sum() + losses.aux_loss + losses.z_loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, losses = block(x)
        ((y * dy).sum() + losses.aux_loss + losses.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("scope,cf", [("chunk", None), ("sequence", 0.5)])
@pytest.mark.parametrize("name", ["interleaved-p4", "grouped-p3-nonuniform"])
def test_cuda_variable_layout_reads_counts_without_synchronising(name, scope, cf, monkeypatch):
    # A variable layout (dropless, or the whole sequence's capacity applied chunk by chunk,
    # whose running counts stay on the device): the split sizes reach the host through a
    # pinned copy started by the chunk's counts op and one event wait in its dispatch (then
    # .tolist() of the pinned host copy), never a synchronising read of a CUDA tensor, which
    # would block the host behind every kernel already queued.
    plan = load_scoped(name, scope, expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=cf, moe_token_drop_policy="position").cuda()
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(20, 50, 8))
    x, dy = inputs(plan)
    x, dy = x.detach().cuda().requires_grad_(True), dy.cuda()
    ref = _step(layer, layer, x, dy, torch.float32)
    with count_host_reads(monkeypatch) as reads:
        _no_sync_step(block, x, dy)
    P = plan.num_chunks
    assert {k: v for k, v in reads.items() if k[0] is not None} == {
        ("forward", "dispatch", "synchronize"): 2 * P, ("forward", "dispatch", "tolist"): 2 * P}  # two steps
    got = _step(block, layer, x, dy, torch.float32)
    for k in ref:
        scale = ref[k].abs().max().item() or 1.0
        assert (got[k] - ref[k]).abs().max().item() / scale <= 1e-4, k


@pytest.mark.parametrize("name", ["interleaved-p3", "grouped-p4-nonuniform"])
def test_cuda_two_compute_streams_equal_baseline(name):
    # Shared buffers (K/V, y, dK/dV) written from two compute streams, parameter gradients
    # added from both (ordered by events), engine gradients marked for the using stream.
    plan = two_compute_streams(load(name, expert_model_parallel_size=1))
    layer = make_layer(plan).cuda()
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(20, 50, 8))
    x, dy = inputs(plan)
    x, dy = x.detach().cuda().requires_grad_(True), dy.cuda()
    ref = _step(layer, layer, x, dy, torch.float32)
    for _ in range(3):
        got = _step(block, layer, x, dy, torch.float32)
        for k in ref:
            scale = ref[k].abs().max().item() or 1.0
            err = (got[k] - ref[k]).abs().max().item() / scale
            assert err <= 1e-4, f"{name}: {k} differs by {err:.3e}"
    streams = {t.stream for t in block.last_times["forward"].records()}
    assert streams == {"compute", "compute2", "comm"}


def test_cuda_rejects_a_backward_op_off_its_forward_stream():
    plan = two_compute_streams(load("interleaved-p3", expert_model_parallel_size=1))
    backward = tuple(dataclasses.replace(op, stream="compute") if op.id == "b.attn.1" else op
                     for op in plan.backward)
    bad = dataclasses.replace(plan, backward=backward)
    block = AMPipeBlock.from_layer(make_layer(bad).cuda(), bad)
    x, _ = inputs(bad)
    with pytest.raises(PlanError, match="b.attn.1"):
        block(x.cuda())


def test_cuda_sleep_calibration_matches_modelled_delays():
    dev = torch.device("cuda", torch.cuda.current_device())
    model = EmulatedComm(latency_us=2000, bandwidth_gbps=1e6, world_size=8)  # ~2 ms each
    inj = DelayInjector(model, dev)
    a = torch.randn(2048, 2048, device=dev)
    for _ in range(10):  # the clocks a step runs at
        a = a @ a
        a = a / a.norm()
    ratios = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        modelled = inj(1024)
        e.record()
        e.synchronize()
        ratios.append(s.elapsed_time(e) / (modelled * 1e3))
    r = statistics.median(ratios)
    assert 0.9 <= r <= 1.1, f"measured / modelled delay {r:.3f} (samples {ratios})"


def test_cuda_comparison_reports_delay_within_ten_percent():
    # A comm op with one rank moves nothing: its measured time is the injected delay (5 ms,
    # so that the host's enqueue lag, when the comm stream is idle, stays under a few %).
    plan = load("interleaved-p2", expert_model_parallel_size=1)
    out = run_block_comparison({}, plan, steps=3, warmup=1, device="cuda", tolerance=1e-4,
                               emulated_comm={"latency_us": 5000, "bandwidth_gbps": 1e6})
    assert out["equivalence"]["ok"], out["equivalence"]
    for kind, row in out["emulated_delay"].items():
        assert 0.9 <= row["ratio"] <= 1.1, f"{kind}: {row}"
