"""`ampipe train`'s step updates the expert bias once per step from the step's counts (as
Megatron's finalize_model_grads), the same with the baseline layers and the pipelined ones."""

from __future__ import annotations

import torch

from synthetic import fixture_plan, model_dict
from test_train_loop import trainer

FEATURES = dict(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True, qk_layernorm=True,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=0.01)


def biases(t):
    return [layer.mlp.router.expert_bias.clone() for layer in t.model.decoder.layers]


def test_the_expert_bias_moves_each_step_alike_baseline_and_pipelined(tmp_path):
    for steps in (1, 3):
        base, _ = trainer(tmp_path / f"base{steps}", steps=steps, warmup_steps=1, model=model_dict("grouped-p2-shared", **FEATURES))
        pipe, _ = trainer(tmp_path / f"pipe{steps}", steps=steps, warmup_steps=1, plan=fixture_plan("grouped-p2-shared"),
                          model=model_dict("grouped-p2-shared", **FEATURES))
        assert all(torch.equal(b, torch.zeros(4)) for b in biases(base))
        base.run(), pipe.run()
        for a, b in zip(biases(base), biases(pipe)):
            assert torch.equal(a, b)
            # steps of ±0.01 (0 for an expert at the mean): on the 0.01 grid; after one, not all zero
            assert torch.allclose(a / 0.01, (a / 0.01).round(), atol=1e-5)
            assert steps > 1 or a.abs().max() > 0
        for t in (base, pipe):  # the counts were consumed by the update
            assert all(layer.mlp.router.local_tokens_per_expert.sum() == 0 for layer in t.model.decoder.layers)
