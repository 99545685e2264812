"""The baseline block and the GPT model: chunked pieces equal the block, seeds, state dicts, names."""

import io

import pytest
import torch

from ampipe.model import ModelConfig, TransformerLayer
from ampipe.model import block_pieces as bp
from ampipe.model.checkpoint import grouped_to_sequential, sequential_to_grouped, shard_experts
from ampipe.model.gpt import GPTModel, init_parameters

torch.set_num_threads(1)

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=2,
             vocab_size=64, ffn_hidden_size=48, num_experts=4, moe_ffn_hidden_size=24)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_query_groups": 2, "normalization": "RMSNorm", "moe_router_score_order": "topk_then_softmax"},
        {"add_bias_linear": True, "moe_expert_activation": "gelu", "moe_router_topk": 1},
        {"moe_expert_capacity_factor": 4.0},  # capacity never reached in any chunk: no drops
        {"moe_shared_expert_intermediate_size": 16, "moe_shared_expert_gate": True, "qk_layernorm": True},
        {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
    ],
)
@pytest.mark.parametrize("layer_number", [0, 1])
def test_pieces_chunk_by_chunk_equal_the_baseline_block_forward_and_backward(extra, layer_number):
    cfg = ModelConfig(**{**SMALL, **extra, "moe_layer_freq": 2})
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, layer_number).double()
    init_parameters(layer, cfg, seed=3)
    x = torch.randn(16, 2, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(16, 2, 32, dtype=torch.float64)
    params = [x] + list(layer.parameters())

    def objective(y, losses):
        return (y * dy).sum() + (losses.total if losses is not None else 0)

    counts = getattr(layer, "routed_counts", None)  # the expert bias's kept-slot counts, if any
    y_full, l_full = layer(x)
    g_full = torch.autograd.grad(objective(y_full, l_full), params)
    counted = None if counts is None else counts.clone()
    y_chunk, l_chunk = bp.chunked_block_forward(layer, x, [0, 5, 6, 13, 16])
    g_chunk = torch.autograd.grad(objective(y_chunk, l_chunk), params)
    if counted is not None and layer.is_moe:  # both forwards add the kept slots of every token
        assert counted.sum() > 0
        torch.testing.assert_close(counts, 2 * counted)

    torch.testing.assert_close(y_chunk, y_full)
    assert layer.is_moe == (l_full is not None)
    if l_full is not None:
        torch.testing.assert_close(l_chunk.aux_loss, l_full.aux_loss)
        torch.testing.assert_close(l_chunk.z_loss, l_full.z_loss)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_chunk, g_full):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("bounds", [[0, 8], [1, 16], [0, 8, 8, 16], [0, 10, 6, 16], []])
def test_chunked_block_forward_refuses_boundaries_that_do_not_tile_the_sequence(bounds):
    layer = TransformerLayer(ModelConfig(**SMALL), 0)
    with pytest.raises(ValueError, match=r"chunked_block_forward: boundaries .* must rise from 0 to the sequence length 16"):
        bp.chunked_block_forward(layer, torch.randn(16, 2, 32), bounds)


MEGATRON_NAMES = {
    "embedding.word_embeddings.weight",
    "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.bias",
    "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.bias",
    "decoder.layers.0.mlp.router.weight",
    "decoder.layers.0.mlp.experts.weight1", "decoder.layers.0.mlp.experts.weight2",
    "decoder.layers.1.input_layernorm.weight", "decoder.layers.1.input_layernorm.bias",
    "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.bias",
    "decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
}


def test_parameter_names_follow_megatron_core():
    cfg = ModelConfig(**SMALL, moe_layer_freq=2)
    assert set(GPTModel(cfg, seed=0).state_dict()) == MEGATRON_NAMES
    untied = GPTModel(cfg.replace(untie_embeddings_and_output_weights=True,
                                  position_embedding_type="learned_absolute"), seed=0).state_dict()
    assert set(untied) == MEGATRON_NAMES | {"output_layer.weight", "embedding.position_embeddings.weight"}
    shapes = {k: tuple(v.shape) for k, v in GPTModel(cfg, seed=0).state_dict().items()}
    assert shapes["decoder.layers.0.mlp.experts.weight1"] == (32, 4 * 2 * 24)  # [H, E * 2F] (SwiGLU)
    assert shapes["decoder.layers.0.mlp.experts.weight2"] == (4 * 24, 32)  # [E * F, H]
    assert shapes["decoder.layers.0.mlp.router.weight"] == (4, 32)


def test_same_seed_gives_an_identical_loss_on_cpu_and_another_seed_does_not():
    cfg = ModelConfig(**SMALL, hidden_dropout=0.1, attention_dropout=0.1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss(seed):
        torch.manual_seed(123)  # dropout masks
        m = GPTModel(cfg, seed=seed)
        m.train()
        out = m(ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), m.embedding.word_embeddings.weight.grad.clone()

    (l1, g1), (l2, g2), (l3, _) = loss(5), loss(5), loss(6)
    assert l1 == l2 and torch.equal(g1, g2)
    assert l1 != l3


def test_state_dict_round_trip_restores_outputs_exactly():
    cfg = ModelConfig(**SMALL, untie_embeddings_and_output_weights=True, add_bias_linear=True,
                      moe_expert_capacity_factor=1.0, normalization="RMSNorm")
    a = GPTModel(cfg, seed=1).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = GPTModel(cfg, seed=2).eval()
    ids = torch.randint(0, 64, (2, 16))
    assert not torch.equal(a(ids).logits, b(ids).logits)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_tied_head_shares_the_embedding_and_untied_head_does_not():
    cfg = ModelConfig(**SMALL)
    tied = GPTModel(cfg, seed=0)
    assert tied.output_layer is None and tied.output_weight() is tied.embedding.word_embeddings.weight
    untied = GPTModel(cfg.replace(untie_embeddings_and_output_weights=True), seed=0)
    assert untied.output_weight() is untied.output_layer.weight


def test_gpt_outputs_and_losses():
    cfg = ModelConfig(**SMALL, moe_layer_freq=2, num_query_groups=2)
    m = GPTModel(cfg, seed=0)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))  # unrelated to the input (labels=ids favours the tied head)
    out = m(ids, labels=labels)
    assert out.logits.shape == (2, 16, 64)
    assert len(out.layer_losses) == 1  # layer 1 is dense
    torch.testing.assert_close(out.aux_loss, out.layer_losses[0].aux_loss)
    # untrained model: LM loss near log(V), balanced-ish aux loss near its coefficient
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert 0.5 * cfg.moe_aux_loss_coeff < out.aux_loss.item() < 2 * cfg.moe_aux_loss_coeff
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="no labels"):
        m(ids).loss
    # a loss mask that keeps only batch row 0 gives row 0's mean loss
    mask = torch.zeros(2, 16)
    mask[0] = 1
    masked = m(ids, labels=labels, loss_mask=mask).lm_loss
    logits = out.logits.detach()
    want = torch.nn.functional.cross_entropy(logits[0], labels[0])
    torch.testing.assert_close(masked.detach(), want)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_autocast_runs_on_cpu_close_to_fp32(dtype):
    cfg = ModelConfig(**SMALL)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = GPTModel(cfg, seed=0)(ids, labels=ids).lm_loss.item()
    m = GPTModel(cfg.replace(dtype=dtype), seed=0)
    out = m(ids, labels=ids)
    assert out.logits.dtype == cfg.replace(dtype=dtype).torch_dtype
    assert m.decoder.layers[0].mlp.experts.weight1.dtype == torch.float32  # master weights stay fp32
    out.loss.backward()
    assert abs(out.lm_loss.item() - ref) < 0.05
    assert torch.isfinite(m.embedding.word_embeddings.weight.grad).all()


def test_expert_shards_and_megatron_sequential_names_round_trip():
    cfg = ModelConfig(**SMALL, add_bias_linear=True)
    full = GPTModel(cfg, seed=4).state_dict()
    key = "decoder.layers.0.mlp.experts.weight1"
    shards = [shard_experts(full, cfg, r, 2) for r in range(2)]
    assert shards[0][key].shape == (32, 2 * 48)
    # expert 3 is rank 1's local expert 1
    w1 = full[key].view(4, 32, 48)
    assert torch.equal(shards[1][key].view(2, 32, 48)[1], w1[3])
    # a model built for EP rank 1 of 2 (same seed) has exactly that shard
    from ampipe.parallel import ExpertParallel

    ep_model = GPTModel(cfg, ep=ExpertParallel(group=None, size=2, rank=1), seed=4)
    for k, v in ep_model.state_dict().items():
        assert torch.equal(v, shards[1][k]), k
    seq = grouped_to_sequential(full, cfg)
    fc1 = seq["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert fc1.shape == (48, 32) and torch.equal(fc1, w1[3].t())
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.bias" in seq
    back = sequential_to_grouped(seq, cfg)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
