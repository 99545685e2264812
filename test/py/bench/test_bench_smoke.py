"""Every `python -m ampipe.bench.*` whose figures the docs quote runs end to end on tiny inputs
and writes the fields they quote (bench.block and bench.pipeline have their own tests in
test/py/model and test/py/pipeline). No figure is asserted: these are benchmarks."""

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
    from ampipe.bench import train

    out = tmp_path / "t.json"
    assert train.main([str(train_run_dir), "--steps", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["emulated"].startswith("emulated 8-way all-to-all")
    for arm in ("baseline", "pipelined"):
        assert r[arm]["median_tokens_per_s"] > 0 and len(r[arm]["tokens_per_s_quartiles"]) == 2
    assert r["speedup"] > 0 and r["plan"]["boundaries"] == fixture_plan("grouped-p2")["boundaries"]
