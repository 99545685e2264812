"""Mixed precision is honoured: the comparison, the benchmark and the rank command run both
arms under the config's autocast; the pipelined block is right under an ambient autocast
(its communication thread included) and with bf16 parameters, whose gradients it sums
across chunks in fp32 (or into a Megatron-style ``main_grad``). The CUDA stream rules that
CPU can check: results handed to the caller's stream on every path, the incoming gradient
marked where it crosses streams."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ampipe.bench.pipeline import bench_pipeline
from ampipe.model import block_pieces
from ampipe.model.config import ModelConfig
from ampipe.pipeline import AMPipeBlock, EmulatedComm, function as function_mod, step as step_mod
from ampipe.pipeline.side_by_side import run_block_comparison
from ampipe.pipeline.worker_commands import run_block

from pipeline_helpers import assert_equal_within, inputs, load, make_layer, step
from test_worker_commands import FakeContext, experiment_config, fixture_plan

torch.set_num_threads(1)
TINY = dict(num_layers=1, seq_length=24, micro_batch_size=2, hidden_size=32, num_attention_heads=4,
            num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)


@pytest.fixture
def expert_dtypes(monkeypatch):
    """The dtype of every expert FFN output computed (any thread)."""
    seen: list[torch.dtype] = []
    real = block_pieces.experts_ffn

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(block_pieces, "experts_ffn", spy)
    return seen


@pytest.fixture
def dispatched_dtypes(monkeypatch):
    """The dtype the tokens of every dispatch travel in (baseline and pipelined block)."""
    seen: list[torch.dtype] = []
    real = block_pieces.dispatch_rows

    def spy(permuted, layout):
        out = real(permuted, layout)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(block_pieces, "dispatch_rows", spy)
    return seen


@pytest.mark.parametrize("dtype,want", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_comparison_runs_both_arms_in_the_configs_precision(dtype, want, expert_dtypes):
    plan = load("interleaved-p2", expert_model_parallel_size=1, dtype=dtype)
    out = run_block_comparison({}, plan, steps=1, warmup=0,
                               emulated_comm={"latency_us": 1, "bandwidth_gbps": 100},
                               tolerance=3e-2 if dtype == "bf16" else 1e-5)
    assert out["precision"] == dtype and out["equivalence"]["ok"], out["equivalence"]
    # baseline (1 call) + pipelined (2 chunks) per step
    # (The experts' dtype is the proof of precision: how far the two bf16 arms land from each
    # other is the machine's rounding, not a property to assert.)
    assert expert_dtypes == [want] * 3


def test_rank_command_runs_in_the_configs_precision(expert_dtypes):
    plan = fixture_plan("grouped-p2")
    plan["dims"].update(expert_model_parallel_size=1, dtype="bf16")
    r = run_block({"config": experiment_config(plan, steps=1), "plan": plan}, FakeContext())
    assert r["precision"] == "bf16" and r["equivalence"]["ok"] and r["equivalence"]["tolerance"] == 3e-2
    assert expert_dtypes and set(expert_dtypes) == {torch.bfloat16}


def test_benchmark_runs_in_the_configs_precision(expert_dtypes):
    cfg = ModelConfig(**TINY, dtype="bf16")
    out = bench_pipeline(cfg, ["interleaved-p2"], [0.5], warmup=0, iters=1, overhead_iters=1,
                         latency_us=1, log=lambda *_: None)
    assert out["precision"] == "bf16"
    assert expert_dtypes and set(expert_dtypes) == {torch.bfloat16}


def test_block_under_ambient_autocast_matches_baseline_comm_ops_included(dispatched_dtypes):
    # With emulated comm the dispatch/combine ops are deferred (finished when a later op
    # reads them): their parts must compute in the caller's autocast too.
    plan = load("interleaved-p4", expert_model_parallel_size=1)
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=EmulatedComm(1, 100, 8))
    x, dy = inputs(plan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = step(layer, layer, x, dy)
        n = len(dispatched_dtypes)
        got = step(block, layer, x, dy)
    assert dispatched_dtypes == [torch.bfloat16] * (n + plan.num_chunks)
    assert_equal_within(ref, got, 2e-2, "bf16 autocast, comm thread")


def _grads(m, layer, x, dy):
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    y, losses = m(x)
    ((y.float() * dy).sum() + 3 * losses.aux_loss + 5 * losses.z_loss).backward()
    return {"dx": x.grad.double(), **{n: p.grad.double() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("name", ["interleaved-p8", "grouped-p8-nonuniform"])
def test_bf16_parameters_error_is_that_of_the_bf16_baseline(name):
    # A swapped-in Megatron model has bf16 parameters (no autocast). Against an fp64 run of
    # the same weights, the pipelined block's error is within 2x the whole-sequence bf16
    # baseline's own error plus one bf16 unit roundoff (2^-8) of the gradient's scale, per
    # gradient (measured: at most 1.4x). The added unit keeps the bound a property of the
    # format: where the baseline happens to round luckily close, 2x its error alone is not.
    plan = load(name, expert_model_parallel_size=1)
    exact = make_layer(plan).double()
    layer = copy.deepcopy(exact).to(torch.bfloat16)
    x, dy = inputs(plan)
    x16 = x.detach().to(torch.bfloat16).requires_grad_(True)
    ref = _grads(exact, exact, x16.detach().double().requires_grad_(True), dy.double())
    base = _grads(layer, layer, x16, dy)
    got = _grads(AMPipeBlock.from_layer(layer, plan), layer, x16, dy)
    assert layer.mlp.experts.weight1.grad.dtype == torch.bfloat16
    for k in ref:
        scale = ref[k].abs().max().item()
        e_base = (base[k] - ref[k]).abs().max().item() / scale
        e_pipe = (got[k] - ref[k]).abs().max().item() / scale
        assert e_base < 5e-2, (k, e_base)  # a bf16 result (bf16 grads asserted above), not garbage
        assert e_pipe <= 2 * e_base + 2 ** -8, f"{name}: {k}: pipelined {e_pipe:.2e} vs baseline {e_base:.2e}"


def _bf16_step(plan):
    layer = make_layer(plan).to(torch.bfloat16)
    engine = AMPipeBlock.from_layer(layer, plan)._ampipe
    engine._device = torch.device("cpu")
    x = torch.zeros(plan.dims["seq_length"], plan.dims["micro_batch_size"], plan.dims["hidden_size"],
                    dtype=torch.bfloat16)
    return step_mod.Step(engine, x, engine._params(), track=True), layer


def test_parameter_gradients_are_summed_across_chunks_in_fp32():
    plan = load("interleaved-p8", expert_model_parallel_size=1)
    st, layer = _bf16_step(plan)
    p = layer.mlp.experts.weight1
    g = torch.Generator().manual_seed(0)
    # eight chunk contributions whose bf16 running sum rounds at every add
    parts = [(1 + torch.rand(p.shape, generator=g) * 2 ** -6).to(torch.bfloat16) for _ in range(8)]
    for part in parts:
        st._accumulate_param(p, part.clone())
    out = st.finish_param_grads()[st.param_index[id(p)]]
    exact = torch.stack([t.double() for t in parts]).sum(0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.to(torch.bfloat16))  # one rounding, of the exact sum


def test_parameters_with_main_grad_accumulate_there_as_megatron_does():
    plan = load("grouped-p4", expert_model_parallel_size=1)
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    ref = step(layer, layer, x, dy)
    params = dict(layer.named_parameters())
    flagged = {"mlp.experts.weight1", "self_attention.linear_qkv.weight"}
    for n, p in params.items():
        p.main_grad = torch.full_like(p, 0.5, dtype=torch.float32)  # already holds a sum
        if n in flagged:
            p.grad_added_to_main_grad = False
    x.grad = None
    for p in params.values():
        p.grad = None
    y, losses = block(x)
    ((y * dy).sum() + 3 * losses.aux_loss + 5 * losses.z_loss).backward()
    for n, p in params.items():
        torch.testing.assert_close(p.main_grad - 0.5, ref[f"grad.{n}"], rtol=1e-5, atol=1e-6)
        if n in flagged:  # Megatron's DDP hook sees the flag and a placeholder gradient
            assert p.grad_added_to_main_grad and p.grad is not None and not p.grad.any()
        else:
            assert p.grad is None, n


def test_no_grad_forward_hands_its_results_to_the_callers_stream(monkeypatch):
    handed: list[list[torch.Tensor]] = []
    real = function_mod.hand_to_caller
    monkeypatch.setattr(function_mod, "hand_to_caller", lambda ts: (handed.append(list(ts)), real(ts)))
    plan = load("interleaved-p3", expert_model_parallel_size=1)
    block = AMPipeBlock.from_layer(make_layer(plan), plan)
    x, _ = inputs(plan)
    with torch.no_grad():
        y, losses = block(x)
    assert len(handed) == 1 and [id(t) for t in handed[0]] == [id(y), id(losses.aux_loss), id(losses.z_loss)]
    handed.clear()
    y, losses = block(x)  # the grad path does the same
    assert len(handed) == 1 and handed[0][0].data_ptr() == y.data_ptr()


def test_island_backward_marks_the_incoming_gradient_not_its_conversion(monkeypatch):
    plan = load("grouped-p2", expert_model_parallel_size=1)
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    marked: list[int] = []
    monkeypatch.setattr(step_mod.Step, "_mark_used",
                        lambda self, *ts: marked.extend(id(t) for t in ts if t is not None))
    engine = block._ampipe
    engine._device = x.device
    st = step_mod.Step(engine, x.detach().requires_grad_(True), engine._params(), track=True)
    st.x_grad = True
    engine._executor.run(plan.forward, st.forward_op, "forward", needs=engine._needs["forward"])
    island = st.islands[("unpermute", 1)]
    g = torch.randn(island.outputs[0].shape).to(torch.bfloat16)  # another dtype than y's
    marked.clear()
    st._run_island_backward(("unpermute", 1), [g])
    assert id(g) in marked
