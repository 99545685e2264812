"""Failures, memory, dK/dV accumulation and the parameter-sharing swap of AMPipeBlock."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import ampipe.pipeline.ops as ops_mod
import ampipe.pipeline.step as step_mod
from ampipe.pipeline import AMPipeBlock, EmulatedComm, OpFailed, baseline_layers, pipeline_layers

from pipeline_helpers import assert_equal_within, inputs, load, make_layer, step

torch.set_num_threads(1)
FAST_EMU = EmulatedComm(latency_us=1, bandwidth_gbps=1000.0, world_size=2)


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _failing(real, chunk_to_fail: int, arg_of_chunk):
    def wrapper(*args, **kwargs):
        if arg_of_chunk(args) == chunk_to_fail:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("kind,op_id", [("combine_rows", "f.combine.1"), ("experts", "f.experts.2")])
def test_op_failing_mid_forward_names_the_op_and_leaves_no_thread(monkeypatch, kind, op_id):
    plan = load("interleaved-p4")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=FAST_EMU)  # comm ops deferred
    x, dy = inputs(plan)
    ref = step(layer, layer, x, dy)
    block(x)
    before = _threads()
    calls = {"n": 0}
    real = getattr(ops_mod.pieces, kind)

    def count_and_fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(op_id.rsplit(".", 1)[1]) + 1:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(ops_mod.pieces, kind, count_and_fail)
    with pytest.raises(OpFailed, match=rf"forward op '{op_id}'.*injected failure") as info:
        block(x)
    assert info.value.op.id == op_id
    assert _threads() == before  # a pass starts no thread, and a failed one leaves none
    monkeypatch.setattr(ops_mod.pieces, kind, real)
    assert_equal_within(ref, step(block, layer, x, dy), 1e-5, "after a failed step")


def test_second_backward_and_double_backward_are_refused():
    plan = load("grouped-p2")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    y, losses = block(x)
    loss = (y * dy).sum() + losses.aux_loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    y, losses = block(x)
    (g,) = torch.autograd.grad((y * dy).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_op_failing_mid_backward_names_the_op_and_leaves_no_thread(monkeypatch):
    plan = load("grouped-p4-nonuniform")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=FAST_EMU)
    x, dy = inputs(plan)
    real = ops_mod.BACKWARD["attn_bwd"]

    def fail_chunk_1(st, io):
        if io.chunk == 1:
            raise ValueError("injected backward failure")
        return real(st, io)

    monkeypatch.setitem(ops_mod.BACKWARD, "attn_bwd", fail_chunk_1)
    y, losses = block(x)
    before = _threads()
    with pytest.raises(OpFailed, match=r"backward op 'b\.attn\.1'.*injected backward failure"):
        ((y * dy).sum() + losses.aux_loss).backward()
    assert _threads() == before


class _Checkpointed(torch.nn.Module):
    """A block under non-reentrant activation checkpointing: its backward recomputes the
    block's forward from inside the block's own backward pass (a pass nested in an op)."""

    def __init__(self, block: torch.nn.Module, early_stop: bool) -> None:
        super().__init__()
        self.block, self.early_stop = block, early_stop

    def forward(self, x: torch.Tensor):
        def run(x: torch.Tensor):
            y, losses = self.block(x)
            return y, losses.aux_loss, losses.z_loss

        with torch.utils.checkpoint.set_checkpoint_early_stop(self.early_stop):
            y, aux, z = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        return y, ops_mod.MoELosses(aux_loss=aux, z_loss=z)


@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing_recomputes_the_block(early_stop):
    # Early stop ends the recompute by raising from a saved-tensor hook: the executor must let
    # that through unwrapped. Without it, the recompute is a whole pass nested in an op of
    # the backward pass, on the same executor: it needs a communication thread of its own.
    plan = load("interleaved-p4")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=FAST_EMU)
    x, dy = inputs(plan)
    ref = step(layer, layer, x, dy)
    got = step(_Checkpointed(block, early_stop), layer, x, dy)
    assert_equal_within(ref, got, 1e-5, f"checkpointed, early_stop={early_stop}")


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some lazy torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_steps_do_not_grow_memory():
    plan = load("interleaved-p8-nonuniform")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=FAST_EMU)
    x, dy = inputs(plan)
    step(block, layer, x, dy)
    counts = []
    for _ in range(4):
        step(block, layer, x, dy)
        counts.append(_live_tensors())
    assert len(set(counts)) == 1, counts
    # forward without backward (e.g. an abandoned step) frees everything too
    before = _live_tensors()
    y, losses = block(x)
    del y, losses
    assert _live_tensors() == before


class _KVShapedOutputs(TorchDispatchMode):
    """Counts op outputs shaped like a sequence-long K or V tensor."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.shape == self.shape:
                self.count += 1
        return out


def _full_length_kv_tensors_in_backward(name: str) -> int:
    plan = load(name)
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    y, losses = block(x)
    d = plan.dims
    mode = _KVShapedOutputs((d["seq_length"], d["micro_batch_size"], d["num_query_groups"],
                             d["kv_channels"]))
    with mode:
        ((y * dy).sum() + losses.aux_loss).backward()
    return mode.count


def test_dk_dv_accumulate_in_prefixes_not_full_length_per_chunk():
    # Same GQA dims, P=1 vs P=8: a full-length dK/dV per chunk would add 2 per extra chunk.
    assert load("grouped-p8").dims["num_query_groups"] == load("grouped-p1").dims["num_query_groups"]
    p1 = _full_length_kv_tensors_in_backward("grouped-p1")
    p8 = _full_length_kv_tensors_in_backward("grouped-p8")
    assert p8 <= p1, (p1, p8)


def test_block_shares_parameters_and_state_dict_names_with_the_layer():
    plan = load("grouped-p2")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    sd_layer, sd_block = layer.state_dict(), block.state_dict()
    assert list(sd_layer) == list(sd_block)
    for k in sd_layer:
        assert sd_layer[k].data_ptr() == sd_block[k].data_ptr(), k
    back = block.to_layer()
    assert [id(p) for p in back.parameters()] == [id(p) for p in layer.parameters()]
    with torch.no_grad():
        layer.self_attention.linear_qkv.weight.mul_(1.5)  # seen by both: no copies
    x, dy = inputs(plan)
    assert_equal_within(step(layer, layer, x, dy), step(block, layer, x, dy), 1e-5, "shared")
    block.load_state_dict(sd_layer)


def test_gpt_model_switches_blocks_without_copying():
    from ampipe.model.gpt import GPTModel
    from ampipe.pipeline.dims import model_config_from_plan

    plan = load("interleaved-p2", expert_model_parallel_size=1)
    cfg = model_config_from_plan(plan, {"num_layers": 2, "vocab_size": 64, "moe_layer_freq": 2})
    model = GPTModel(cfg, seed=5)
    ids = torch.randint(0, 64, (cfg.micro_batch_size, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    ref = model(ids, ids)
    names = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    assert pipeline_layers(model, plan) == ["decoder.layers.0"]  # layer 1 is dense
    assert isinstance(model.decoder.layers[0], AMPipeBlock)
    assert list(model.state_dict()) == names
    assert [id(p) for p in model.parameters()] == params
    out = model(ids, ids)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert baseline_layers(model) == ["decoder.layers.0"]
    assert type(model.decoder.layers[0]) is not AMPipeBlock
    torch.testing.assert_close(model(ids, ids).loss, ref.loss, rtol=0, atol=0)


def test_parameters_replaced_by_assign_are_the_ones_trained():
    # load_state_dict(assign=True) puts new Parameter objects in place: the block's per-op
    # parameter lists must follow, or the new parameters would get no gradient.
    plan = load("grouped-p2")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    ref = step(layer, layer, x, dy)
    old = list(block.parameters())
    block.load_state_dict({k: v.clone() for k, v in block.state_dict().items()}, assign=True)
    assert all(p is not q for p, q in zip(block.parameters(), old))
    assert_equal_within(ref, step(block, block, x, dy), 1e-5, "after load_state_dict(assign=True)")


def test_island_gradient_of_the_wrong_shape_is_refused():
    # The engine, called directly, would sum a broadcastable gradient down without a word.
    plan = load("grouped-p2")
    block = AMPipeBlock.from_layer(make_layer(plan), plan)
    x, _ = inputs(plan)
    y, _ = block(x)
    step_state = y.grad_fn.step
    lo, hi = plan.chunk_rows(0)
    wrong = torch.ones(2, hi - lo, *y.shape[1:])  # the chunk's output broadcasts to it
    with pytest.raises(RuntimeError, match=r"gradient of shape \(2, .*unpermute"):
        step_state._run_island_backward(("unpermute", 0), [wrong])


def test_engine_fallback_computes_the_same_gradients(monkeypatch):
    # Without the engine's private entry point, islands go through torch.autograd.grad.
    plan = load("interleaved-p3")
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    ref = step(layer, layer, x, dy)
    monkeypatch.setattr(step_mod, "_ENGINE", None)
    assert_equal_within(ref, step(block, layer, x, dy), 1e-5, "torch.autograd.grad fallback")


@pytest.mark.parametrize("name", ["grouped-p1", "interleaved-p4"])
def test_gradients_are_handed_to_autograd_not_copied(monkeypatch, name):
    """The block's dx and parameter gradients become ``x.grad`` / ``p.grad`` themselves: the
    engine's AccumulateGrad adopts a gradient only when nothing else references it, else it
    copies every parameter's gradient once per call (the step used to keep them)."""
    plan = load(name)
    layer = make_layer(plan)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)
    handed: list[int] = []
    real = step_mod.Step.end_backward

    def record(self):
        dx, grads = real(self)
        handed[:] = [dx.data_ptr()] + [g.data_ptr() for g in grads]
        return dx, grads

    monkeypatch.setattr(step_mod.Step, "end_backward", record)
    x.grad = None
    y, losses = block(x)
    ((y * dy).sum() + losses.aux_loss).backward()
    params = list(layer.parameters())
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in params)
    assert handed == [x.grad.data_ptr()] + [p.grad.data_ptr() for p in params]
