"""Every `python -m ampipe.bench.*` runs end to end on tiny inputs and writes the fields the docs
quote (bench.block and bench.pipeline have their own tests in test/py/model and test/py/pipeline;
`test_every_benchmark_has_a_smoke_test` keeps the list whole). No figure is asserted: these are
benchmarks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

for _d in ("data", "train"):  # the Megatron-format writer and the fixture plans' tiny models
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / _d))
from megatron_writer import write_megatron  # noqa: E402
from synthetic import fixture_plan, model_dict  # noqa: E402


def test_kernels_benchmark_reports_each_op(tmp_path):
    from ampipe.bench import kernels

    out = tmp_path / "k.json"
    assert kernels.main(["--device", "cpu", "--sizes", "64,16,4,2", "--reps", "2", "--warmup", "0",
                         "--threads", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    ops = {r["op"] for r in doc["rows"]}
    assert {"make_row_map", "permute", "unpermute"} <= ops, ops
    assert all(r["compiled_ms"] > 0 and r["reference_ms"] > 0 and r["speedup"] > 0 for r in doc["rows"])
    assert doc["device"] == "cpu" and "summary" in doc


@pytest.fixture
def train_run_dir(tmp_path: Path) -> Path:
    """A run directory as `ampipe train` leaves it: the resolved config and the plan."""
    rng = np.random.default_rng(0)
    prefix = tmp_path / "data"
    write_megatron(prefix, [[list(rng.integers(0, 60, 90))] for _ in range(40)], "uint16")
    plan = fixture_plan("grouped-p2")
    model = model_dict("grouped-p2")
    config = {
        "model": model,
        "parallelism": {"world_size": 1, "expert_model_parallel_size": 1, "device": "cpu", "backend": "gloo"},
        "pipeline": {"degree": 2, "variant": "grouped", "emulated_comm": {"latency_us": 20, "bandwidth_gbps": 1, "world_size": 8}},
        "run": {"seed": 1},
        "data": {"path": str(prefix), "tokenizer": "byte", "split": "90,10"},
        "train": {"steps": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "global_batch_size": model["micro_batch_size"],
                  "eval_interval": 100, "eval_iters": 1, "checkpoint_interval": 100},
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    (run / "plan.json").write_text(json.dumps(plan))
    return run


def test_train_benchmark_times_both_blocks(train_run_dir, tmp_path):
    from ampipe.bench import train_one_process as train

    out = tmp_path / "t.json"
    assert train.main([str(train_run_dir), "--steps", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["emulated"].startswith("emulated 8-way all-to-all")
    for arm in ("baseline", "pipelined"):
        assert r[arm]["median_tokens_per_s"] > 0 and len(r[arm]["tokens_per_s_quartiles"]) == 2
    assert r["speedup"] > 0 and r["plan"]["boundaries"] == fixture_plan("grouped-p2")["boundaries"]


def test_train_ranks_benchmark_times_both_blocks_on_two_ranks(train_run_dir, tmp_path):
    from ampipe.bench import train_ranks

    config = json.loads((train_run_dir / "config.json").read_text())
    config["parallelism"].update(world_size=2, expert_model_parallel_size=2)
    config["train"]["global_batch_size"] = 2 * config["model"]["micro_batch_size"]
    plan = json.loads((train_run_dir / "plan.json").read_text())
    plan["dims"]["expert_model_parallel_size"] = 2
    (train_run_dir / "config.json").write_text(json.dumps(config))
    (train_run_dir / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "r.json"
    assert train_ranks.main([str(train_run_dir), "--steps", "2", "--warmup", "0", "--threads", "1",
                             "--no-emulation", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ranks"] == 2 and r["expert_model_parallel_size"] == 2 and r["interconnect"] == "real communication only"
    for arm in ("baseline", "pipelined"):
        assert r[arm]["median_step_ms"] > 0 and len(r[arm]["tokens_per_s_quartiles"]) == 2
    assert r["speedup"] > 0 and r["plan"]["boundaries"] == plan["boundaries"]


def test_droprate_benchmark_counts_drops_both_ways(train_run_dir, capsys):
    from ampipe.bench import droprate

    cfg = json.loads((train_run_dir / "config.json").read_text())
    cfg["model"]["moe_expert_capacity_factor"] = 0.5  # half the slots of an even split: some drop
    (train_run_dir / "config.json").write_text(json.dumps(cfg))
    r = droprate.measure(train_run_dir, batches=2)
    assert r["boundaries"] == fixture_plan("grouped-p2")["boundaries"] and r["capacity_factor"] == 0.5
    assert r["layers"] and 0 < r["sequence_scope"] <= 1 and 0 < r["chunk_scope"] <= 1
    assert droprate.main([str(train_run_dir), "--batches", "1"]) == 0
    assert "all MoE layers" in capsys.readouterr().out


def test_overhead_benchmark_times_both_calls(tmp_path):
    from ampipe.bench import overhead

    out = tmp_path / "o.json"
    assert overhead.main(["--calls", "20", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["autograd_grad_us"] > 0 and r["engine_us"] > 0 and r["calls"] == 20
    assert r["saved_us"] == r["autograd_grad_us"] - r["engine_us"]


# Each module with a `main` and the test that runs it end to end.
SMOKE_TESTS = {
    "block": "test/py/model/test_bench_block.py", "pipeline": "test/py/pipeline/test_bench_pipeline.py",
    "kernels": __file__, "train_one_process": __file__, "train_ranks": __file__, "droprate": __file__,
    "overhead": __file__,
}


def test_every_benchmark_has_a_smoke_test():
    import ampipe.bench

    root = Path(ampipe.bench.__file__).parent
    mains = {f.stem for f in root.glob("*.py") if "\ndef main(" in f.read_text()}
    assert mains == set(SMOKE_TESTS), "a benchmark without a smoke test (or a stale entry)"
    repo = Path(__file__).resolve().parents[3]
    for name, test in SMOKE_TESTS.items():
        assert f"bench import {name}" in (repo / test).read_text() or f"bench.{name}" in (repo / test).read_text(), name
