"""Capacity semantics of the pipelined block, with capacity factors that really drop tokens.

- ``capacity_scope: sequence`` (``position`` policy): the whole sequence's capacity applied
  chunk by chunk from the running per-expert counts equals the baseline exactly, drops
  included (outputs, losses, dx, every gradient), for P in 2, 3, 4, 8, uniform and
  non-uniform boundaries (EP=2: test_expert_parallel_pipeline.py).
- ``capacity_scope: chunk`` (the paper's): capacity per chunk. It drops exactly what a
  per-chunk reference written from the block pieces drops, and is a different function from
  the baseline (documented as such).
"""

from __future__ import annotations

import pytest
import torch

from ampipe.model import block_pieces as bp
from ampipe.model.config import ConfigError
from ampipe.pipeline import AMPipeBlock, EmulatedComm

from pipeline_helpers import assert_equal_within, inputs, load_scoped, make_layer, step

torch.set_num_threads(1)
CF = 0.5  # capacity ceil(0.5 * T * K / E): half the slots of a balanced router drop


def _kept(layer, x) -> torch.Tensor:
    """[T, K]: which slots the baseline block keeps on x."""
    with torch.no_grad():
        t = bp.qkv(layer, x)
        _, normed = bp.proj(layer, bp.attention(layer, t.q, t.k, t.v), x)
        return bp.permute(layer, normed, bp.route(layer, normed)).row_map >= 0


def _drops(layer, x) -> tuple[int, int]:
    """(dropped, routed) slots of the baseline block on x."""
    kept = _kept(layer, x)
    return int((~kept).sum()), kept.numel()


SEQUENCE_PLANS = ["grouped-p2", "interleaved-p3", "grouped-p4", "interleaved-p8",
                  "interleaved-p2-nonuniform", "grouped-p3-nonuniform", "interleaved-p4-nonuniform",
                  "grouped-p8-nonuniform"]


@pytest.mark.parametrize("name", SEQUENCE_PLANS)
def test_sequence_scope_equals_the_baseline_drops_included(name):
    plan = load_scoped(name, "sequence", expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=CF, moe_token_drop_policy="position")
    x, dy = inputs(plan)
    dropped, routed = _drops(layer, x)
    assert dropped > routed // 4, (dropped, routed)  # really drops
    # the comm thread too (emulated comm) on every other plan
    emu = EmulatedComm(1, 100, 8) if SEQUENCE_PLANS.index(name) % 2 else None
    block = AMPipeBlock.from_layer(layer, plan, emulated_comm=emu)
    ref = step(layer, layer, x, dy)
    assert_equal_within(ref, step(block, layer, x, dy), 1e-5, name)
    assert_equal_within(ref, step(block, layer, x, dy), 1e-5, name + " (second step)")


def test_sequence_scope_no_grad_and_a_capacity_nothing_reaches():
    plan = load_scoped("interleaved-p4", "sequence", expert_model_parallel_size=1)
    for cf in (CF, 8.0):
        layer = make_layer(plan, moe_expert_capacity_factor=cf, moe_token_drop_policy="position")
        block = AMPipeBlock.from_layer(layer, plan)
        x, _ = inputs(plan)
        with torch.no_grad():
            torch.testing.assert_close(block(x)[0], layer(x)[0], rtol=1e-5, atol=1e-6)


def test_sequence_scope_with_the_probs_policy_is_refused_naming_both_fields():
    plan = load_scoped("grouped-p2", "sequence", expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=CF)  # probs: Megatron's default
    with pytest.raises(ConfigError, match=r"^pipeline\.capacity_scope: sequence needs "
                                          r"model\.moe_token_drop_policy: position.*got model\.moe_token_drop_policy: probs"):
        AMPipeBlock.from_layer(layer, plan)


def _per_chunk_reference(layer, x, boundaries):
    """The block with capacity sized per chunk, written from the pieces: attention over the
    whole sequence, then each chunk's rows routed, permuted (capacity of its T_c tokens) and
    sent through the experts on their own; losses from the summed statistics."""
    t = bp.qkv(layer, x)
    h, normed = bp.proj(layer, bp.attention(layer, t.q, t.k, t.v), x)
    ys, stats, kept = [], [], []
    for lo, hi in zip(boundaries, boundaries[1:]):
        n, r = normed[lo:hi], h[lo:hi]
        routing = bp.route(layer, n)
        p = bp.permute(layer, n, routing)
        d = bp.dispatch(layer, p)
        ys.append(bp.unpermute(layer, bp.combine(layer, bp.experts(layer, d), d), p, routing, r))
        stats.append(routing.stats)
        kept.append(p.row_map >= 0)
    return torch.cat(ys), bp.moe_losses(layer.cfg, bp.sum_stats(*stats)), torch.cat(kept)


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("name", ["interleaved-p4", "grouped-p3-nonuniform"])
def test_chunk_scope_drops_exactly_what_a_per_chunk_reference_drops(name, policy):
    plan = load_scoped(name, "chunk", expert_model_parallel_size=1)
    layer = make_layer(plan, moe_expert_capacity_factor=CF, moe_token_drop_policy=policy)
    block = AMPipeBlock.from_layer(layer, plan)
    x, dy = inputs(plan)

    class Reference(torch.nn.Module):
        def forward(self, x):
            y, losses, self.kept = _per_chunk_reference(layer, x, plan.boundaries)
            return y, losses

    ref_block = Reference()
    ref = step(ref_block, layer, x, dy)
    assert not ref_block.kept.all()  # it drops
    got = step(block, layer, x, dy)
    assert_equal_within(ref, got, 1e-5, f"{name} {policy}")
    # and it is another function than the baseline: the whole sequence's capacity keeps others
    assert (_kept(layer, x) != ref_block.kept).any()
