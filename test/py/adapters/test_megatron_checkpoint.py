"""Megatron-Core-named checkpoints into and out of ampipe's GPT: the Megatron-Core test
double's own state dict loads into ampipe's `GPTModel`, which then computes the double's
logits; saving gives the double's names back; unknown and missing keys are named."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import megatron_double as md
from ampipe.model.checkpoint import (CheckpointKeyError, load_megatron_state_dict, megatron_state_dict,
                                     save_megatron_checkpoint)
from ampipe.model.config import ModelConfig
from ampipe.model.gpt import GPTModel

S, B, V = 16, 2, 64


def pair(grouped: bool, norm: str = "RMSNorm", pre_softmax: bool = False, glu: bool = True):
    bias = not grouped  # Megatron's GroupedMLP has no biases
    mcfg = md.TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, num_moe_experts=4,
        moe_router_topk=2, moe_router_pre_softmax=pre_softmax, moe_ffn_hidden_size=16,
        gated_linear_unit=glu, activation_func=F.silu if glu else F.gelu, normalization=norm,
        add_bias_linear=bias, hidden_dropout=0.0, attention_dropout=0.0)
    double = md.GPTModel(mcfg, vocab_size=V, max_sequence_length=S, grouped=grouped, seed=4)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      seq_length=S, micro_batch_size=B, vocab_size=V, normalization=norm,
                      position_embedding_type="rope", add_bias_linear=bias,
                      untie_embeddings_and_output_weights=True, num_experts=4, moe_router_topk=2,
                      moe_router_score_order="softmax_then_topk" if pre_softmax else "topk_then_softmax",
                      moe_ffn_hidden_size=16, moe_expert_activation="swiglu" if glu else "gelu")
    return double, GPTModel(cfg, seed=0)


@pytest.mark.parametrize("grouped,norm,pre_softmax,glu", [
    (False, "RMSNorm", False, True), (True, "LayerNorm", True, False), (True, "RMSNorm", False, True)])
def test_megatron_checkpoint_loads_into_ampipe_and_computes_the_same_logits(tmp_path, grouped, norm, pre_softmax, glu):
    double, model = pair(grouped, norm, pre_softmax, glu)
    sd = dict(double.state_dict())
    sd["decoder.layers.0.self_attention.core_attention._extra_state"] = None  # as TE writes them
    sd["decoder.layers.1.mlp.experts._extra_state"] = None
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": sd, "checkpoint_version": 3.0, "iteration": 7,
                "args": argparse.Namespace(num_layers=2)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_megatron_state_dict(model, path)
    report = load_megatron_state_dict(model, path, weights_only=False)
    assert sorted(report.ignored) == ["decoder.layers.0.self_attention.core_attention._extra_state",
                                      "decoder.layers.1.mlp.experts._extra_state"]
    assert report.missing == [] and report.unexpected == []
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    double.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, double(ids), rtol=1e-5, atol=1e-5)

    back = megatron_state_dict(model, "GroupedMLP" if grouped else "SequentialMLP")
    ref = double.state_dict()
    assert sorted(back) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(back[k], ref[k], rtol=0, atol=0, msg=k)


def test_save_then_load_round_trips_through_a_file(tmp_path):
    _, model = pair(grouped=False)
    path = tmp_path / "ckpt.pt"
    save_megatron_checkpoint(model, path, iteration=3)
    doc = torch.load(path, weights_only=True)
    assert doc["iteration"] == 3 and "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in doc["model"]
    _, other = pair(grouped=False)
    load_megatron_state_dict(other, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_missing_and_unknown_keys_are_listed_by_name_and_nothing_is_loaded():
    double, model = pair(grouped=True)
    sd = dict(double.state_dict())
    del sd["decoder.layers.1.mlp.router.weight"]
    sd["decoder.layers.0.self_attention.linear_qkv.weight_scale"] = torch.ones(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointKeyError) as e:
        load_megatron_state_dict(model, sd)
    msg = str(e.value)
    assert "missing 1 key(s): decoder.layers.1.mlp.router.weight" in msg
    assert "unknown 1 key(s): decoder.layers.0.self_attention.linear_qkv.weight_scale" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = load_megatron_state_dict(model, sd, strict=False)
    assert report.missing == ["decoder.layers.1.mlp.router.weight"]
    assert report.unexpected == ["decoder.layers.0.self_attention.linear_qkv.weight_scale"]
    assert torch.equal(model.state_dict()["decoder.layers.0.mlp.router.weight"], sd["decoder.layers.0.mlp.router.weight"])


def test_a_shape_mismatch_names_the_key():
    double, model = pair(grouped=True)
    sd = dict(double.state_dict())
    sd["decoder.final_layernorm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"decoder.final_layernorm.weight: the checkpoint has shape \[7\]"):
        load_megatron_state_dict(model, sd)


def test_transformer_engine_names_are_read_too():
    double, model = pair(grouped=False)
    sd = {}
    for k, t in double.state_dict().items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        for i in range(4):  # TEGroupedMLP: linear_fc1.weight{i}
            for fc in ("linear_fc1", "linear_fc2"):
                for kind in ("weight", "bias"):
                    k = k.replace(f"mlp.experts.local_experts.{i}.{fc}.{kind}", f"mlp.experts.{fc}.{kind}{i}")
        sd[k] = t
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight2" in sd
    load_megatron_state_dict(model, sd)
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    double.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, double(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_a_checkpoint_of_a_modern_moe_loads_and_computes_the_same_logits(tmp_path, norm):
    # QK layernorm, a gated shared expert, sigmoid scores with an expert bias (a buffer in the
    # checkpoint), scaled gates and group-limited top-k: the double's names and values load into
    # ampipe's GPT, whose own math then gives the double's logits; saving gives them back.
    router = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2, moe_router_group_topk=1)
    mcfg = md.TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, num_moe_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=16, gated_linear_unit=True, activation_func=F.silu,
        normalization=norm, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        qk_layernorm=True, moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True, **router)
    double = md.GPTModel(mcfg, vocab_size=V, max_sequence_length=S, seed=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in double.state_dict(keep_vars=True).items():
            if "q_layernorm" in name or "k_layernorm" in name or name.endswith("expert_bias"):
                t.copy_(1 + torch.randn(t.shape, generator=g) * 0.5 if "layernorm" in name
                        else (torch.rand(t.shape, generator=g) - 0.5) * 0.2)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=S,
                      micro_batch_size=B, vocab_size=V, normalization=norm, position_embedding_type="rope",
                      add_bias_linear=False, untie_embeddings_and_output_weights=True, num_experts=4,
                      moe_router_topk=2, moe_ffn_hidden_size=16, moe_expert_activation="swiglu", qk_layernorm=True,
                      moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True, **router)
    model = GPTModel(cfg, seed=0)
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": double.state_dict(), "iteration": 1}, path)
    report = load_megatron_state_dict(model, path)
    assert report.missing == [] and report.unexpected == []
    for key in ("decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.1.mlp.shared_experts.gate_weight",
                "decoder.layers.1.mlp.shared_experts.linear_fc2.weight", "decoder.layers.0.mlp.router.expert_bias"):
        assert key in report.loaded
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
    double.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, double(ids), rtol=1e-5, atol=1e-5)
    back = megatron_state_dict(model, "SequentialMLP")
    ref = double.state_dict()
    assert sorted(back) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(back[k], ref[k], rtol=0, atol=0, msg=k)
