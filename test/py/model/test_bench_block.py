"""The block benchmark's API and CLI work (behaviour only: no timing thresholds)."""

import json

import torch

from ampipe.bench.block import bench_blocks, load_model_config, main, make_baseline_block
from ampipe.model import ModelConfig

torch.set_num_threads(1)

CFG = dict(hidden_size=32, num_attention_heads=4, seq_length=16, micro_batch_size=2, num_experts=4,
           moe_ffn_hidden_size=16)


def test_bench_blocks_times_several_blocks_side_by_side_and_counts_saved_activations():
    short = ModelConfig(**CFG)
    a = make_baseline_block(short, seed=1)
    b = make_baseline_block(short, seed=2)
    res = bench_blocks({"a": a, "b": b}, short, warmup=1, iters=3)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert len(r.samples_ms) == 3 and r.fwd_bwd_ms_median > 0 and r.fwd_ms_median <= r.fwd_bwd_ms_p90
        assert r.saved_activation_bytes > 0 and r.peak_memory_bytes is None and r.rss_peak_bytes > 0
    # grads were produced by the timed steps
    assert a.self_attention.linear_qkv.weight.grad is not None
    longer = ModelConfig(**{**CFG, "seq_length": 64})
    r_long = bench_blocks({"x": make_baseline_block(longer)}, longer, warmup=0, iters=1)["x"]
    assert r_long.saved_activation_bytes > res["a"].saved_activation_bytes


def test_cli_reads_a_config_with_overrides_and_writes_json(tmp_path, capsys):
    cfg_file = tmp_path / "exp.json"
    cfg_file.write_text(json.dumps({"model": CFG, "run": {"steps": 1}}))
    assert load_model_config(str(cfg_file), ["moe_router_topk=1", "model.dtype=bf16"]).moe_router_topk == 1
    out = tmp_path / "r.json"
    assert main(["--config", str(cfg_file), "--set", "moe_expert_capacity_factor=1.5", "--iters", "2",
                 "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["moe_expert_capacity_factor"] == 1.5 and r["iters"] == 2
    assert "fwd+bwd" in capsys.readouterr().out
