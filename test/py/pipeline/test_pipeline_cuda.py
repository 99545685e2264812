"""The pipelined block on CUDA (skipped without a GPU): equivalence in fp32 and bf16, and
no host synchronisation inside the block (sync debug mode set to "error")."""

from __future__ import annotations

import pytest
import torch

from ampipe.pipeline import AMPipeBlock, EmulatedComm

from pipeline_helpers import inputs, load, make_layer

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
def test_cuda_block_performs_no_host_synchronisation(name):
    # A capacity keeps every shape static; dropless routing must read the per-expert counts
    # on the host (inherent to dropless: the split sizes), which is a synchronisation.
    plan = load(name, expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=4.0).cuda()
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(20, 50, 8))
    x, dy = inputs(plan)
    x, dy = x.detach().cuda().requires_grad_(True), dy.cuda()
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
    assert torch.isfinite(x.grad).all()
