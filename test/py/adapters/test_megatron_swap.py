"""swap_blocks over the Megatron-Core test double: same outputs, losses and every gradient
as the unswapped model (fp32, within 1e-5); unrecognised layers reported by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megatron_double as md
from ampipe.adapters import adapter_for
from ampipe.adapters.megatron import MegatronLayerAdapter
from ampipe.model.adapter import NotSwappable
from ampipe.pipeline import AMPipeBlock, PlanError, block_dims, load_plan, swap_blocks, unswap_blocks
from ampipe.pipeline.plan import retarget_plan

PLANS = Path(__file__).resolve().parents[2] / "fixtures" / "plans"

S, B, V = 24, 2, 64


def make_model(grouped=False, groups=2, norm="RMSNorm", pre_softmax=False, glu=True, bias=None,
               seed=0, dense_layers=(), **over):
    bias = (not grouped) if bias is None else bias
    cfg = md.TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=groups,
        num_moe_experts=4, moe_router_topk=2, moe_router_pre_softmax=pre_softmax,
        moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_ffn_hidden_size=16,
        gated_linear_unit=glu, activation_func=F.silu if glu else F.gelu, normalization=norm,
        add_bias_linear=bias, hidden_dropout=0.0, attention_dropout=0.0, **over)
    return md.GPTModel(cfg, vocab_size=V, max_sequence_length=S, grouped=grouped, seed=seed,
                       dense_layers=dense_layers)


def plan_for(model, name="interleaved-p2", **dims):
    adapter = MegatronLayerAdapter(model.decoder.layers[0])
    base = load_plan(PLANS / f"{name}.json")
    return retarget_plan(base, {**block_dims(adapter, S, B), **dims})


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def run(model, ids, labels, dy_scale=1.0):
    """Per-token loss, layer-0 output (through a hook), tracked aux losses, every gradient."""
    md.clear_aux_losses_tracker()
    model.train()
    model.zero_grad(set_to_none=True)
    seen = {}
    hook = model.decoder.layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("y0", out[0].detach()))
    try:
        loss = model(ids, labels=labels)
        (loss.mean() * dy_scale).backward()
    finally:
        hook.remove()
    out = {"loss": loss.detach(), "layer0": seen["y0"]}
    for name, entry in md.get_moe_layer_wise_logging_tracker().items():
        out[f"tracked.{name}"] = entry["values"].clone()
    out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def assert_close(ref, got, rel=1e-5):
    assert ref.keys() == got.keys()
    for k in ref:
        scale = ref[k].abs().max().item() or 1.0
        err = (got[k] - ref[k]).abs().max().item() / scale
        assert err <= rel, f"{k} differs by {err:.2e} relative to {scale:.2e}"


CASES = {
    "sequential-gqa-rms-topk-then-softmax-swiglu-bias": dict(grouped=False, groups=2, norm="RMSNorm", pre_softmax=False),
    "sequential-mha-layernorm-softmax-then-topk-gelu-bias": dict(grouped=False, groups=4, norm="LayerNorm", pre_softmax=True, glu=False),
    "grouped-gqa-layernorm-topk-then-softmax-swiglu": dict(grouped=True, groups=2, norm="LayerNorm", pre_softmax=False),
    "grouped-mqa-rms-softmax-then-topk-gelu": dict(grouped=True, groups=1, norm="RMSNorm", pre_softmax=True, glu=False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("plan_name", ["interleaved-p2", "grouped-p3-nonuniform"])
def test_swapped_double_equals_unswapped(case, plan_name):
    model = make_model(**CASES[case])
    ids, labels = batch()
    ref = run(model, ids, labels)
    assert ref["grad.decoder.layers.0.mlp.router.weight"].abs().max() > 0
    names, params = list(model.state_dict()), [id(p) for p in model.parameters()]

    plan = plan_for(model, plan_name)
    report = swap_blocks(model, plan)
    assert report.swapped == ["decoder.layers.0", "decoder.layers.1"] and not report.skipped
    assert all(isinstance(l, AMPipeBlock) and isinstance(l, md.TransformerLayer) for l in model.decoder.layers)
    assert list(model.state_dict()) == names  # no renamed or added keys
    assert [id(p) for p in model.parameters()] == params  # the same Parameter objects, no copies
    got = run(model, ids, labels)
    assert_close(ref, got)
    assert model.decoder.layers[0].last_times is not None  # it really ran the plan

    assert unswap_blocks(model) == ["decoder.layers.0", "decoder.layers.1"]
    assert all(type(l) is md.TransformerLayer for l in model.decoder.layers)
    assert_close(ref, run(model, ids, labels), rel=0)


def test_aux_loss_gradient_reaches_the_router_through_the_scaler():
    # Only the aux and z-losses have a gradient here (the LM loss is scaled by 0): what the
    # router gets comes through MoEAuxLossAutoScaler, with its backward scale applied.
    model = make_model(grouped=True)
    ids, labels = batch(2)
    md.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(2.5))
    try:
        ref = run(model, ids, labels, dy_scale=0.0)
        swap_blocks(model, plan_for(model))
        got = run(model, ids, labels, dy_scale=0.0)
    finally:
        md.MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    g = got["grad.decoder.layers.0.mlp.router.weight"]
    assert g.abs().max() > 0
    assert_close(ref, got)
    # Without the scaler's contribution the router would get no gradient at all.
    assert got["tracked.load_balancing_loss"].shape == (2,) and (got["tracked.load_balancing_loss"] > 0).all()


def test_eval_mode_adds_no_aux_loss_and_matches():
    model = make_model(grouped=False)
    ids, _ = batch(3)
    model.eval()
    with torch.no_grad():
        ref = model(ids)
        swap_blocks(model, plan_for(model))
        md.clear_aux_losses_tracker()
        got = model(ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert md.get_moe_layer_wise_logging_tracker() == {}


def test_unrecognised_layers_are_reported_by_name_and_left_alone():
    class Odd(nn.Module):  # has the shape of a layer but no config: no adapter recognises it
        def __init__(self):
            super().__init__()
            self.self_attention = nn.Linear(2, 2)
            self.mlp = nn.Linear(2, 2)

    model = make_model(dense_layers=(1,))
    model.extra = nn.ModuleList([Odd()])
    report = swap_blocks(model, plan_for(model))
    assert report.swapped == ["decoder.layers.0"]
    assert set(report.skipped) == {"decoder.layers.1", "extra.0"}
    assert "mlp.router" in report.skipped["decoder.layers.1"]
    assert "'config'" in report.skipped["extra.0"]
    assert type(model.decoder.layers[1]) is md.TransformerLayer and type(model.extra[0]) is Odd
    assert "left unswapped: decoder.layers.1" in str(report)


@pytest.mark.parametrize("field,value,needle", [
    ("moe_router_score_function", "sqrtsoftplus", "config.moe_router_score_function='sqrtsoftplus'"),
    ("moe_router_load_balancing_type", "seq_aux_loss", "config.moe_router_load_balancing_type='seq_aux_loss'"),
    ("moe_pad_expert_input_to_capacity", True, "config.moe_pad_expert_input_to_capacity=True"),
    ("moe_router_dtype", "fp64", "config.moe_router_dtype='fp64'"),
    # the config says QK layernorm, the layer has no q_layernorm module
    ("qk_layernorm", True, "config.qk_layernorm=True but self_attention.q_layernorm"),
    ("tensor_model_parallel_size", 2, "config.tensor_model_parallel_size=2"),
])
def test_features_the_block_does_not_implement_are_refused_naming_the_field(field, value, needle):
    model = make_model()
    plan = plan_for(model)
    for layer in model.decoder.layers:
        layer.config = dataclasses.replace(layer.config, **{field: value})
    report = swap_blocks(model, plan)
    assert report.swapped == []
    assert all(needle in why for why in report.skipped.values()), report.skipped


def test_structure_it_does_not_recognise_names_the_attribute():
    layer = make_model().decoder.layers[0]
    del layer.self_attention.core_attention
    with pytest.raises(NotSwappable, match="self_attention.core_attention"):
        adapter_for(layer)
    layer = make_model(grouped=False).decoder.layers[0]
    layer.mlp.experts.local_experts[1].linear_fc1.weight = nn.Parameter(torch.zeros(3, 32))
    with pytest.raises(NotSwappable, match=r"local_experts.1.linear_fc1.weight has shape \[3, 32\]"):
        adapter_for(layer)


def test_a_plan_with_other_dims_is_refused_naming_the_field_and_the_command():
    model = make_model()
    plan = plan_for(model, hidden_size=64)
    with pytest.raises(PlanError) as e:
        swap_blocks(model, plan)
    msg = str(e.value)
    assert "dims.hidden_size = 64" in msg and "32" in msg
    assert "ampipe plan" in msg and "--set model.hidden_size=32" in msg
    assert not any(isinstance(l, AMPipeBlock) for l in model.decoder.layers)  # nothing swapped


def test_a_causal_attention_mask_is_accepted_and_another_refused():
    model = make_model()
    ids, labels = batch()
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    model.train()
    ref = model(ids, attention_mask=causal, labels=labels).detach()
    swap_blocks(model, plan_for(model))
    torch.testing.assert_close(model(ids, attention_mask=causal, labels=labels).detach(), ref,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        model(ids, attention_mask=torch.zeros(1, 1, S, S, dtype=torch.bool), labels=labels)


@pytest.mark.slow
def test_megatron_adapter_imports_nothing_from_megatron():
    import subprocess
    import sys

    code = ("import sys, ampipe.adapters.megatron, ampipe.pipeline; "
            "assert not [m for m in sys.modules if m.startswith('megatron')], 'imported megatron'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_layer_with_parameters_no_op_covers_is_left_unswapped_naming_them():
    model = make_model()
    model.decoder.layers[1].self_attention.extra_scale = nn.Parameter(torch.ones(3))
    report = swap_blocks(model, plan_for(model))
    assert report.swapped == ["decoder.layers.0"]
    assert "self_attention.extra_scale" in report.skipped["decoder.layers.1"]
    assert type(model.decoder.layers[1]) is md.TransformerLayer


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("grouped", [False, True])
def test_swapped_double_equals_unswapped_on_cuda(grouped):
    model = make_model(grouped=grouped).cuda()
    ids, labels = (t.cuda() for t in batch())
    ref = run(model, ids, labels)
    swap_blocks(model, plan_for(model, "grouped-p3-nonuniform"))
    got = run(model, ids, labels)
    assert_close({k: v.cpu() for k, v in ref.items()}, {k: v.cpu() for k, v in got.items()}, rel=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
def test_bf16_double_swaps_and_agrees_to_bf16_rounding(grouped):
    # bf16 parameters (Megatron's --bf16): the plan's dtype is read from the config, the
    # block runs in the parameters' dtype; the double's router computes logits in bf16 and
    # ampipe's in fp32, so they agree to bf16 rounding, not to fp32's.
    model = make_model(grouped=grouped, bf16=True).to(torch.bfloat16)
    plan = plan_for(model)
    assert plan.dims["dtype"] == "bf16"
    ids, labels = batch()
    ref = run(model, ids, labels)
    swap_blocks(model, plan)
    got = run(model, ids, labels)
    assert_close({k: v.float() for k, v in ref.items()}, {k: v.float() for k, v in got.items()}, rel=3e-2)


def test_call_arguments_the_block_does_not_support_are_named():
    model = make_model()
    swap_blocks(model, plan_for(model))
    layer = model.decoder.layers[0]
    x = torch.randn(S, B, 32)
    layer(hidden_states=x, some_future_argument=None)  # None: accepted
    with pytest.raises(NotImplementedError, match="argument packed_seq_params"):
        layer(x, packed_seq_params=object())
    with pytest.raises(NotImplementedError, match="argument some_future_argument"):
        layer(x, some_future_argument=1)


def test_per_token_loss_scaling_and_mtp_layers_follow_megatron():
    # calculate_per_token_loss: Megatron's router attaches aux * local tokens; mtp_num_layers
    # widens the tracker.
    model = make_model(grouped=True, calculate_per_token_loss=True, mtp_num_layers=1)
    ids, labels = batch(4)
    ref = run(model, ids, labels)
    assert ref["tracked.load_balancing_loss"].shape == (3,)
    swap_blocks(model, plan_for(model))
    assert_close(ref, run(model, ids, labels))


@pytest.mark.slow
def test_expert_parallel_double_equals_ep1(tmp_path):
    from rank_procs import run_ranks

    out = run_ranks(Path(__file__).with_name("megatron_ep_worker.py"), 2, tmp_path)
    for r, text in enumerate(out):
        for case in ("sequential", "grouped", "features"):
            assert f"megatron double EP=2 {case} ok" in text, (r, text)
