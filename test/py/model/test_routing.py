"""Router score orders, auxiliary and z-losses against hand-computed values, capacity semantics."""

import math

import pytest
import torch

from ampipe.model import ModelConfig, TransformerLayer
from ampipe.model import block_pieces as bp

torch.set_num_threads(1)


def router_layer(E, K, **kw):
    """A layer whose router logits equal its input (H = E, router weight = identity)."""
    cfg = ModelConfig(hidden_size=E, num_attention_heads=1, kv_channels=2, seq_length=8, num_experts=E,
                      moe_router_topk=K, moe_ffn_hidden_size=4, **kw)
    layer = TransformerLayer(cfg, 0).double()
    with torch.no_grad():
        layer.mlp.router.weight.copy_(torch.eye(E))
    return layer


def test_balanced_and_unbalanced_losses_equal_values_worked_out_by_hand():
    ln3 = math.log(3.0)
    layer = router_layer(2, 1, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    # token 0 probs [1/4, 3/4] → expert 1; token 1 probs [3/4, 1/4] → expert 0:
    # f = [1/2, 1/2], P = [1/2, 1/2], aux = 0.1 * 2 * (1/4 + 1/4) = 0.1
    r = bp.route(layer, torch.tensor([[[0.0, ln3]], [[ln3, 0.0]]]))
    losses = bp.moe_losses(layer.cfg, r.stats)
    assert r.indices.squeeze(1).tolist() == [1, 0]
    assert losses.aux_loss.item() == pytest.approx(0.1)
    # lse = log(1 + 3) for both tokens: z = 0.01 * log(4)^2
    assert losses.z_loss.item() == pytest.approx(0.01 * math.log(4.0) ** 2)
    # both tokens → expert 0: f = [1, 0], P = [3/4, 1/4], aux = 0.1 * 2 * 3/4 = 0.15
    r = bp.route(layer, torch.tensor([[[ln3, 0.0]], [[ln3, 0.0]]]))
    assert bp.moe_losses(layer.cfg, r.stats).aux_loss.item() == pytest.approx(0.15)


def hand_route(logits, K, order, renorm):
    """Python-loop routing and Megatron's losses, token by token."""
    T, E = len(logits), len(logits[0])
    counts, psum, zsum, choices = [0.0] * E, [0.0] * E, 0.0, []
    for row in logits:
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        probs = [e / sum(ex) for e in ex]
        lse = m + math.log(sum(ex))
        zsum += lse * lse
        for e in range(E):
            psum[e] += probs[e]
        top = sorted(range(E), key=lambda e: -row[e])[:K]
        if order == "softmax_then_topk":
            gates = [probs[e] for e in top]
            if renorm:
                gates = [g / sum(gates) for g in gates]
        else:
            mx = max(row[e] for e in top)
            w = [math.exp(row[e] - mx) for e in top]
            gates = [x / sum(w) for x in w]
        for e in top:
            counts[e] += 1
        choices.append((top, gates))
    aux = E * sum((counts[e] / (T * K)) * (psum[e] / T) for e in range(E))
    return choices, aux, zsum / T


@pytest.mark.parametrize("order, renorm", [("softmax_then_topk", False), ("softmax_then_topk", True),
                                           ("topk_then_softmax", False)])
def test_random_routing_matches_the_python_loop(order, renorm):
    E, K = 5, 2
    layer = router_layer(E, K, moe_router_score_order=order, moe_router_topk_renormalize=renorm,
                         moe_aux_loss_coeff=1.0, moe_z_loss_coeff=1.0)
    logits = torch.randn(6, 2, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    r = bp.route(layer, logits)
    choices, aux, z = hand_route(logits.reshape(-1, E).tolist(), K, order, renorm)
    assert r.indices.tolist() == [c[0] for c in choices]
    torch.testing.assert_close(r.gates, torch.tensor([c[1] for c in choices], dtype=torch.float32))
    losses = bp.moe_losses(layer.cfg, r.stats)
    assert losses.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    assert losses.z_loss.item() == pytest.approx(z, rel=1e-5)


def test_statistics_summed_over_chunks_give_the_whole_microbatch_losses():
    layer = router_layer(4, 2)
    x = torch.randn(10, 2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    whole = bp.moe_losses(layer.cfg, bp.route(layer, x).stats)
    parts = bp.sum_stats(*(bp.route(layer, x[a:b]).stats for a, b in ((0, 3), (3, 4), (4, 10))))
    summed = bp.moe_losses(layer.cfg, parts)
    torch.testing.assert_close(summed.aux_loss, whole.aux_loss)
    torch.testing.assert_close(summed.z_loss, whole.z_loss)
    # the mean of per-chunk losses is not the same thing (why the statistics are summed)
    per_chunk = [bp.moe_losses(layer.cfg, bp.route(layer, x[a:b]).stats).aux_loss for a, b in ((0, 3), (3, 10))]
    assert not torch.allclose(sum(per_chunk) / 2, whole.aux_loss)


def test_aux_loss_gradient_reaches_the_router_through_the_returned_loss():
    layer = router_layer(4, 2, moe_aux_loss_coeff=1.0, moe_z_loss_coeff=0.0)
    x = torch.randn(6, 1, 4, dtype=torch.float64)
    bp.moe_losses(layer.cfg, bp.route(layer, x).stats).total.backward()
    g = layer.mlp.router.weight.grad
    assert g is not None and g.abs().sum() > 0


# ------------------------------------------------------------------------------------ capacity


def moe_layer(cf, E=2, K=2, T_rows=4, **kw):
    cfg = ModelConfig(hidden_size=8, num_attention_heads=2, seq_length=T_rows, num_experts=E, moe_router_topk=K,
                      moe_ffn_hidden_size=6, moe_expert_capacity_factor=cf, **kw)
    return TransformerLayer(cfg, 0).double()


def expert_ffn(layer, e, x):
    """Expert e's SwiGLU FFN on rows x, written out (gate half first, as Megatron)."""
    ex = layer.mlp.experts
    gate, up = (x @ ex.w1()[e]).chunk(2, -1)
    return (torch.nn.functional.silu(gate) * up) @ ex.w2()[e]


@pytest.mark.parametrize("policy, want", [
    # expert 0 gets t0 t1 t3 (first choice) and t2 (second); expert 1 gets t2 (first) and t0 t1 t3
    # position (earliest tokens): e0 keeps t0, t1; e1 keeps t0, t1
    ("position", [[True, True], [True, True], [False, False], [False, False]]),
    # probs (highest gates): e0 gates t0 .6 t1 .9 t2 .3 t3 .8 -> t1, t3; e1: t0 .4 t1 .1 t2 .7 t3 .2 -> t2, t0
    ("probs", [[False, True], [True, False], [True, False], [True, False]]),
])
def test_capacity_drops_by_megatrons_policies(policy, want):
    layer = moe_layer(cf=0.5, moe_token_drop_policy=policy)  # capacity = ceil(0.5 * T=4 * K=2 / E=2) = 2
    g = torch.Generator().manual_seed(5)
    normed = torch.randn(4, 1, 8, generator=g, dtype=torch.float64)
    residual = torch.randn(4, 1, 8, generator=g, dtype=torch.float64)
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    gates = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]], dtype=torch.float64)
    stats = bp.route(layer, normed).stats
    routing = bp.Routing(indices, gates, None, stats)
    permuted = bp.permute(layer, normed, routing)
    assert permuted.capacity == 2
    kept = (permuted.row_map >= 0).tolist()
    assert kept == want
    assert permuted.tokens_per_expert.tolist() == [2, 2]
    d = bp.dispatch(layer, permuted)
    y = bp.unpermute(layer, bp.combine(layer, bp.experts(layer, d), d), permuted, routing, residual)
    # by hand: each token gets the gate-weighted FFN of its kept experts only
    x = normed.reshape(4, 8)
    for t in range(4):
        want_y = residual[t, 0].clone()
        for k in range(2):
            if kept[t][k]:
                want_y += gates[t, k] * expert_ffn(layer, indices[t, k].item(), x[t:t + 1])[0]
        torch.testing.assert_close(y[t, 0], want_y)


@pytest.mark.parametrize("K, E", [(1, 4), (2, 4), (3, 3)])
def test_dropless_equals_an_infinite_capacity(K, E):
    torch.manual_seed(6)
    dropless = moe_layer(None, E=E, K=K, T_rows=8)
    huge = moe_layer(float(E), E=E, K=K, T_rows=8)  # capacity = T*K >= any expert's slots
    huge.load_state_dict(dropless.state_dict())
    x = torch.randn(8, 2, 8, dtype=torch.float64, requires_grad=True)
    y1, l1 = dropless(x)
    g1 = torch.autograd.grad((y1.square().sum() + l1.total), [x] + list(dropless.parameters()))
    y2, l2 = huge(x)
    g2 = torch.autograd.grad((y2.square().sum() + l2.total), [x] + list(huge.parameters()))
    torch.testing.assert_close(y2, y1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_a_small_capacity_really_drops_and_changes_the_output():
    torch.manual_seed(7)
    dropless = moe_layer(None, E=4, K=2, T_rows=8)
    tight = moe_layer(0.25, E=4, K=2, T_rows=8)
    tight.load_state_dict(dropless.state_dict())
    x = torch.randn(8, 2, 8, dtype=torch.float64)
    normed = bp.proj(tight, bp.attention(tight, *vars(bp.qkv(tight, x)).values()), x)[1]
    p = bp.permute(tight, normed, bp.route(tight, normed))
    assert (p.row_map < 0).any() and p.capacity == 2
    assert not torch.allclose(tight(x)[0], dropless(x)[0])


def test_experts_handle_empty_experts_and_an_empty_chunk():
    layer = moe_layer(None, E=4, K=1)
    x = torch.randn(5, 8, dtype=torch.float64)
    out = bp.experts_ffn(layer, x, [0, 3, 0, 2])
    torch.testing.assert_close(out[:3], expert_ffn(layer, 1, x[:3]))
    torch.testing.assert_close(out[3:], expert_ffn(layer, 3, x[3:]))
    assert bp.experts_ffn(layer, x[:0], [0, 0, 0, 0]).shape == (0, 8)
    with pytest.raises(ValueError, match="do not cover"):
        bp.experts_ffn(layer, x, [1, 1, 1, 1])


# ------------------------------------------------------------------ sigmoid, expert bias, groups, scaling


def hand_sigmoid_route(logits, K, bias=None, scale=None, groups=None):
    """Megatron's sigmoid routing, token by token in Python: experts chosen by sigmoid + bias
    (within the `group_topk` best groups of `num_groups`, ranked by their top-(K/group_topk)
    scores), gates the chosen sigmoids normalised (K > 1) then scaled; the aux-loss scores are
    the sigmoids normalised over every expert, counted at their plain top-K."""
    E = len(logits[0])
    bias = bias or [0.0] * E
    counts, psum, out = [0.0] * E, [0.0] * E, []
    for row in logits:
        s = [1 / (1 + math.exp(-v)) for v in row]
        sel = [s[e] + bias[e] for e in range(E)]
        allowed = list(range(E))
        if groups:
            G, Gk = groups
            per = E // G
            score = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:K // Gk]) for g in range(G)]
            best = sorted(range(G), key=lambda g: -score[g])[:Gk]
            allowed = [e for e in range(E) if e // per in best]
        top = sorted(allowed, key=lambda e: -sel[e])[:K]
        gates = [s[e] for e in top]
        if K > 1:
            gates = [g / sum(gates) for g in gates]
        gates = [g * (scale or 1.0) for g in gates]
        out.append((top, gates))
        norm = [v / sum(s) for v in s]
        for e in range(E):
            psum[e] += norm[e]
        for e in sorted(range(E), key=lambda e: -norm[e])[:K]:
            counts[e] += 1
    return out, counts, psum


@pytest.mark.parametrize("K,bias,scale,groups", [
    (2, None, None, None),
    (3, [0.3, -0.2, 0.05, 0.0, 0.4, -0.1], None, None),  # the bias changes the choice, not the gates
    (1, [0.0, 0.9, 0.0, 0.0, 0.0, 0.0], 2.5, None),  # top-1: no normalisation, then the factor
    (2, [0.1, 0.0, -0.1, 0.2, 0.0, 0.05], 2.5, (3, 1)),  # groups of two experts, one group per token
    (4, None, None, (3, 2)),
])
def test_sigmoid_routing_with_bias_groups_and_scaling_equals_a_token_by_token_loop(K, bias, scale, groups):
    E = 6
    over = dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=scale,
                moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.0)
    if bias is not None:
        over["moe_router_enable_expert_bias"] = True
    if groups is not None:
        over.update(moe_router_num_groups=groups[0], moe_router_group_topk=groups[1])
    layer = router_layer(E, K, **over)
    if bias is not None:
        layer.mlp.router.expert_bias.copy_(torch.tensor(bias))
    logits = torch.randn(10, 1, E, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    r = bp.route(layer, logits)
    want, counts, psum = hand_sigmoid_route(logits.squeeze(1).tolist(), K, bias, scale, groups)
    for t, (top, gates) in enumerate(want):
        assert r.indices[t].tolist() == top, t
        assert r.gates[t].tolist() == pytest.approx(gates, rel=1e-6), t
    assert r.stats.tokens_per_expert.tolist() == counts
    assert r.stats.probs_sum.tolist() == pytest.approx(psum, rel=1e-6)
    if bias is not None:  # the bias changed which experts some token chose
        unbiased = bp.route(router_layer(E, K, **{**over, "moe_router_enable_expert_bias": False}), logits)
        assert not torch.equal(unbiased.indices, r.indices)


def test_group_limited_topk_with_softmax_scores_keeps_the_experts_in_the_best_groups():
    # Experts 0-1 | 2-3, top-2 from one group, groups ranked by the sum of their top-2 logits:
    # token 0's best expert (0) is in the weaker group (3 - 5 < 2 + 1.9), so it gets experts 2, 3.
    layer = router_layer(4, 2, moe_router_num_groups=2, moe_router_group_topk=1,
                         moe_router_score_order="topk_then_softmax")
    r = bp.route(layer, torch.tensor([[[3.0, -5.0, 2.0, 1.9]], [[0.0, 0.1, 0.5, -1.0]]], dtype=torch.float64))
    assert r.indices.tolist() == [[2, 3], [1, 0]]  # not [0, 2] and [2, 1]: those cross groups
    assert r.gates[0].tolist() == pytest.approx([1 / (1 + math.exp(-0.1)), 1 / (1 + math.exp(0.1))])
    # the aux loss still counts the plain top-2 over every expert
    assert r.stats.tokens_per_expert.tolist() == [1.0, 1.0, 2.0, 0.0]


def test_the_expert_bias_update_moves_each_bias_by_the_rate_towards_balance():
    from ampipe.model.expert_bias import update_expert_bias

    layer = router_layer(4, 1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                         moe_router_bias_update_rate=0.25)
    router = layer.mlp.router
    router.expert_bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    router.local_tokens_per_expert.copy_(torch.tensor([3.0, 1.0, 2.0, 2.0]))  # mean 2
    assert update_expert_bias(layer) == 1
    assert router.expert_bias.tolist() == [-0.25, 1.25, -1.0, 0.5]  # sign(2 - count) * 0.25
    assert router.local_tokens_per_expert.tolist() == [0.0] * 4
    # eval mode: no update, the counts are still cleared (as Megatron's reset)
    router.local_tokens_per_expert.fill_(5.0)
    layer.eval()
    assert update_expert_bias(layer) == 0 and router.expert_bias.tolist() == [-0.25, 1.25, -1.0, 0.5]
    assert router.local_tokens_per_expert.tolist() == [0.0] * 4


def test_the_baseline_counts_the_kept_slots_only_with_grad_enabled():
    layer = router_layer(4, 2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    x = torch.randn(8, 1, 4, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    assert layer.mlp.router.local_tokens_per_expert.sum() == 0
    layer(x)
    assert layer.mlp.router.local_tokens_per_expert.sum() == 16
