"""The swap mechanics on ampipe's own GPT: in place, hooks kept, parameters read per call
(FSDP-style replacement), torch.compile of the model still runs, refusals."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from torch import nn

import ampipe
from ampipe.model.gpt import GPTModel
from ampipe.model.layers import TransformerLayer
from ampipe.pipeline import AMPipeBlock, apply_ampipe, unapply_ampipe
from ampipe.pipeline.dims import model_config_from_plan

PLANS = Path(__file__).resolve().parents[2] / "fixtures" / "plans"


def setup(plan_name="grouped-p2", **over):
    plan = ampipe.load_plan(PLANS / f"{plan_name}.json")
    plan = type(plan)(**{**plan.__dict__, "dims": {**plan.dims, "expert_model_parallel_size": 1}})
    cfg = model_config_from_plan(plan, {"num_layers": 2, "vocab_size": 64, **over})
    model = GPTModel(cfg, seed=5)
    ids = torch.randint(0, 64, (cfg.micro_batch_size, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    return plan, model, ids


def grads(model, ids, run=None):
    model.zero_grad(set_to_none=True)
    out = (run if run is not None else model)(ids, ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_swap_is_in_place_and_keeps_hooks():
    plan, model, ids = setup()
    layer = model.decoder.layers[0]
    calls = []
    layer.register_forward_hook(lambda m, a, out: calls.append(type(m).__name__))
    ref_loss, ref = grads(model, ids)
    report = ampipe.swap_blocks(model, plan)
    assert report.swapped == ["decoder.layers.0", "decoder.layers.1"]
    assert model.decoder.layers[0] is layer and isinstance(layer, TransformerLayer) and isinstance(layer, AMPipeBlock)
    loss, got = grads(model, ids)
    assert calls == ["TransformerLayer", "AMPipeTransformerLayer"]  # the hook fired on both runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert ampipe.swap_blocks(model, plan).skipped == {"decoder.layers.0": "already pipelined",
                                                       "decoder.layers.1": "already pipelined"}
    with pytest.raises(ValueError, match="pipelined already"):
        apply_ampipe(layer, plan)


def test_parameters_replaced_after_the_swap_are_the_ones_trained():
    # FSDP-style: a submodule's Parameter object replaced under the pipelined layer.
    plan, model, ids = setup()
    ampipe.swap_blocks(model, plan)
    lin = model.decoder.layers[0].self_attention.linear_qkv
    new = nn.Parameter(lin.weight.detach().clone() * 1.01)
    lin.weight = new
    grads(model, ids)
    assert new.grad is not None and new.grad.abs().max() > 0


@pytest.mark.slow
def test_torch_compile_of_the_model_still_runs():
    plan, model, ids = setup()
    ref_loss, ref = grads(model, ids)
    ampipe.swap_blocks(model, plan)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the model, breaks at the block
    try:
        loss, got = grads(model, ids, run=compiled)
    finally:
        torch._dynamo.reset()  # drop the compiled frames (and what they hold) for later tests
        del compiled
        gc.collect()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_unapply_refuses_a_class_changed_after_the_swap():
    plan, model, _ = setup()
    layer = apply_ampipe(model.decoder.layers[0], plan)
    layer.__class__ = type("Wrapped", (type(layer),), {})
    with pytest.raises(ValueError, match="class was changed after apply_ampipe"):
        unapply_ampipe(layer)
    assert isinstance(layer, AMPipeBlock)  # nothing undone


def test_dense_layers_are_reported():
    plan, model, _ = setup("interleaved-p2", moe_layer_freq=2)
    report = ampipe.swap_blocks(model, plan)
    assert report.swapped == ["decoder.layers.0"]
    assert report.skipped == {"decoder.layers.1": "a dense layer (mlp is an MLP, not an MoE layer)"}


@pytest.mark.slow
def test_import_ampipe_stays_light_and_exports_the_swap_api():
    import subprocess
    import sys

    code = ("import sys, ampipe; assert 'torch' not in sys.modules; "
            "assert callable(ampipe.swap_blocks) and callable(ampipe.load_plan) and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
