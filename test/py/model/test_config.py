"""ModelConfig: contract field names, defaults, and errors that name the field before allocation."""

import pytest
import torch

from ampipe.model import ConfigError, ModelConfig
from ampipe.model.gpt import GPTModel
from ampipe.parallel import ExpertParallel


def test_defaults_match_the_contract_and_resolve_derived_fields():
    cfg = ModelConfig()
    d = cfg.to_dict()
    assert d["num_query_groups"] == 4 and d["kv_channels"] == 32
    assert d["moe_router_score_order"] == "softmax_then_topk" and d["moe_expert_capacity_factor"] is None
    assert ModelConfig.from_dict(d) == cfg.replace(num_query_groups=4, kv_channels=32)


def test_from_dict_accepts_a_whole_experiment_config_and_rejects_unknown_keys():
    cfg = ModelConfig.from_dict({"model": {"hidden_size": 64, "num_attention_heads": 2}, "run": {"steps": 1}})
    assert cfg.hidden_size == 64 and cfg.head_dim == 32
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({"hidden_sise": 64})
    assert e.value.field == "model.hidden_sise"
    assert ModelConfig.from_dict({"hidden_sise": 64}, strict=False).hidden_size == 128


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"hidden_size": 100, "num_attention_heads": 8}, "model.num_attention_heads"),
        ({"num_attention_heads": 8, "num_query_groups": 3}, "model.num_query_groups"),
        ({"num_experts": 2, "moe_router_topk": 3}, "model.moe_router_topk"),
        ({"num_layers": 2, "moe_layer_freq": 3}, "model.moe_layer_freq"),
        ({"normalization": "BatchNorm"}, "model.normalization"),
        ({"dtype": "fp8"}, "model.dtype"),
        ({"moe_expert_capacity_factor": 0.0}, "model.moe_expert_capacity_factor"),
        ({"hidden_dropout": 1.0}, "model.hidden_dropout"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"moe_router_topk": True}, "model.moe_router_topk"),
        ({"kv_channels": 7, "num_attention_heads": 4}, "model.kv_channels"),  # odd head dim with rope
        ({"moe_router_score_function": "sqrtsoftplus"}, "model.moe_router_score_function"),
        ({"moe_router_enable_expert_bias": True}, "model.moe_router_enable_expert_bias"),  # needs sigmoid
        ({"moe_router_topk_scaling_factor": 0.0}, "model.moe_router_topk_scaling_factor"),
        ({"moe_router_bias_update_rate": -1.0}, "model.moe_router_bias_update_rate"),
        ({"moe_router_group_topk": 1}, "model.moe_router_group_topk"),  # no num_groups
        ({"num_experts": 6, "moe_router_num_groups": 4, "moe_router_group_topk": 1}, "model.moe_router_num_groups"),
        ({"num_experts": 8, "moe_router_num_groups": 2, "moe_router_group_topk": 3}, "model.moe_router_group_topk"),
        ({"num_experts": 8, "moe_router_topk": 4, "moe_router_num_groups": 4, "moe_router_group_topk": 1},
         "model.moe_router_group_topk"),  # one group of two experts cannot hold four
        ({"moe_shared_expert_gate": True}, "model.moe_shared_expert_gate"),
        ({"moe_shared_expert_intermediate_size": 64, "add_bias_linear": True}, "model.moe_shared_expert_intermediate_size"),
        ({"moe_shared_expert_intermediate_size": 0}, "model.moe_shared_expert_intermediate_size"),
        ({"qk_layernorm": 1}, "model.qk_layernorm"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_kv_channels_lifts_the_divisibility_requirement():
    cfg = ModelConfig(hidden_size=100, num_attention_heads=8, kv_channels=16)
    assert cfg.head_dim == 16


def test_experts_not_divisible_by_ep_is_rejected_before_anything_is_allocated():
    # These sizes would need terabytes: reaching allocation would fail differently (or hang).
    huge = dict(hidden_size=1 << 16, num_attention_heads=1 << 8, vocab_size=1 << 30, num_experts=6,
                moe_ffn_hidden_size=1 << 20, ffn_hidden_size=1 << 20)
    cfg = ModelConfig(**huge)
    with pytest.raises(ConfigError) as e:
        GPTModel(cfg, ep=ExpertParallel(group=None, size=4, rank=0))
    assert e.value.field == "model.num_experts"
    with pytest.raises(ConfigError) as e:
        cfg.check_parallel(2, world_size=3)
    assert e.value.field == "parallelism.world_size"


def test_capacity_is_ceil_of_factor_times_slots_per_expert():
    cfg = ModelConfig(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=1.25)
    assert cfg.expert_capacity(10) == 7  # ceil(1.25 * 10 * 2 / 4) = ceil(6.25)
    assert ModelConfig().expert_capacity(10) is None
    assert cfg.torch_dtype is torch.float32


def test_drop_policy_and_capacity_scope_are_checked_with_the_schemas_wording():
    from ampipe.model.config import ConfigError, check_capacity_scope

    assert ModelConfig().moe_token_drop_policy == "probs"  # Megatron's default
    with pytest.raises(ConfigError, match=r"^model\.moe_token_drop_policy: must be one of probs, position; got 'random'"):
        ModelConfig(moe_token_drop_policy="random")
    check_capacity_scope("sequence", "position")
    check_capacity_scope("chunk", "probs")
    with pytest.raises(ConfigError) as e:
        check_capacity_scope("sequence", "probs")
    assert str(e.value) == (
        "pipeline.capacity_scope: sequence needs model.moe_token_drop_policy: position (with probs, which "
        "tokens a chunk drops depends on later chunks); got model.moe_token_drop_policy: probs")
    with pytest.raises(ConfigError, match=r"^pipeline\.capacity_scope: must be one of chunk, sequence"):
        check_capacity_scope("layer", "position")
