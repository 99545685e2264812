"""The `run_block` rank command, called directly with a fake context (no zmq, no controller)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ampipe.pipeline import worker_commands
from ampipe.pipeline.plan import PlanError
from ampipe.pipeline.dims import dims_from_config as expected_dims
from ampipe.pipeline.worker_commands import TOLERANCE_BY_DTYPE, default_tolerance, run_block
from ampipe.worker import commands
from rank_procs import run_ranks

PLANS = Path(__file__).resolve().parents[2] / "fixtures" / "plans"
EP_WORKER = Path(__file__).with_name("run_block_ep_worker.py")
MODEL_DIMS = ("seq_length", "micro_batch_size", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "dtype")


class FakeContext:
    """What the rank loop hands a command: records events and heartbeats."""

    def __init__(self, rank: int = 0, world_size: int = 1, backend: str | None = None) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, rank
        self.device, self.backend = None, backend
        self.events: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.threads: set[int] = set()

    def emit(self, kind: str, **fields: Any) -> bool:
        self.threads.add(threading.get_ident())
        self.events.append({"kind": kind, **fields})
        return True

    def heartbeat(self) -> None:
        self.threads.add(threading.get_ident())
        self.heartbeats += 1

    def subgroup(self, size: int) -> Any:
        raise AssertionError("an EP=1 run must not ask for a process group")


def fixture_plan(name: str) -> dict[str, Any]:
    return json.loads((PLANS / f"{name}.json").read_text())


def experiment_config(plan: dict[str, Any], steps: int = 2, **model: Any) -> dict[str, Any]:
    """An experiment config (the four sections) whose block matches the plan's dims."""
    dims = plan["dims"]
    ep = dims["expert_model_parallel_size"]
    return {
        "model": {**{k: dims[k] for k in MODEL_DIMS}, "num_layers": 1, **model},
        "parallelism": {"world_size": ep, "expert_model_parallel_size": ep, "device": "cpu", "backend": "gloo"},
        "pipeline": {"degree": "auto", "variant": "auto", "boundaries": None, "chunk_qkv": True, "emulated_comm": None},
        "run": {"steps": steps, "warmup": 0, "seed": 7, "output_dir": "runs/test"},
    }


def test_registered_under_its_name():
    assert commands.get("run_block") is run_block


def test_default_tolerance_by_dtype_and_device():
    assert default_tolerance("fp32", "cpu") == 1e-5
    assert default_tolerance("fp32", "cuda") == 1e-4
    assert default_tolerance("bf16", "cuda") == 3e-2
    assert set(TOLERANCE_BY_DTYPE) == {"fp32", "bf16", "fp16"}


def test_expected_dims_resolve_query_groups_and_head_dim():
    plan = fixture_plan("grouped-p2")
    cfg = experiment_config(plan)
    cfg["model"].update(num_query_groups=None, kv_channels=None)
    assert expected_dims(cfg) == plan["dims"]


def test_run_block_equivalence_steps_and_events():
    plan = fixture_plan("grouped-p2-nonuniform")
    ctx = FakeContext()
    r = run_block({"config": experiment_config(plan, steps=3), "plan": plan}, ctx)
    assert r["equivalence"]["ok"], r["equivalence"]
    assert r["equivalence"]["tolerance"] == TOLERANCE_BY_DTYPE["fp32"] == 1e-5
    diffs = r["equivalence"]["largest_relative_differences"]
    assert {"y", "dx", "aux_loss", "z_loss"} <= diffs.keys()
    assert any(k.startswith("grad.") for k in diffs)
    assert r["steps"] == 3 and len(r["baseline_samples_ms"]) == len(r["pipelined_samples_ms"]) == 3
    assert r["plan"]["boundaries"] == plan["boundaries"]
    assert r["rank"] == 0 and r["dims"] == plan["dims"] and r["emulated"] is None
    # Per-op times keyed by the plan's op ids, split by pass (the calibration input's shape).
    assert set(r["op_times_ms"]["forward"]) == {op["id"] for op in plan["forward"]}
    assert set(r["op_times_ms"]["backward"]) == {op["id"] for op in plan["backward"]}
    steps = [e for e in ctx.events if e["kind"] == "metric"]
    assert [e["step"] for e in steps] == [0, 1, 2]
    assert [e["pipelined_ms"] for e in steps] == r["pipelined_samples_ms"]
    stages = [e["stage"] for e in ctx.events if e["kind"] == "progress"]
    assert stages == ["start", "done"]
    # Heartbeats from the calling (the rank's main) thread; the step metrics from the helper
    # thread as each step ends (CommandContext.emit may be called from any thread).
    assert threading.get_ident() in ctx.threads


def test_emulated_comm_from_the_config_is_labelled():
    plan = fixture_plan("interleaved-p3")
    cfg = experiment_config(plan, steps=1)
    cfg["pipeline"]["emulated_comm"] = {"latency_us": 100.0, "bandwidth_gbps": 1.0, "world_size": 8}
    r = run_block({"config": cfg, "plan": plan}, FakeContext())
    assert r["emulated"] and "emulated 8-way" in r["emulated"]
    assert r["equivalence"]["ok"]
    # Arguments win over the config: null means real communication.
    r = run_block({"config": cfg, "plan": plan, "emulated_comm": None}, FakeContext())
    assert r["emulated"] is None


def test_step_metrics_are_sent_as_each_step_ends_not_after_the_run():
    plan = fixture_plan("grouped-p2")
    ctx = FakeContext()
    live: list[bool] = []  # was the comparison still running when each metric went out?
    emit = ctx.emit

    def recording_emit(kind, **fields):
        if kind == "metric":
            live.append(any(t.name == "ampipe-command" and t.is_alive() for t in threading.enumerate()))
        return emit(kind, **fields)

    ctx.emit = recording_emit
    run_block({"config": experiment_config(plan, steps=4), "plan": plan}, ctx)
    assert len(live) == 4 and live[0] and live[1], live  # steps 1..3 (2..3) still to run


def test_capacity_scope_of_plan_and_config_must_agree_and_fit_the_drop_policy():
    plan = fixture_plan("grouped-p2")
    cfg = experiment_config(plan, steps=1, moe_expert_capacity_factor=0.5)
    cfg["pipeline"]["capacity_scope"] = "sequence"
    with pytest.raises(PlanError, match=r"capacity_scope = 'chunk' but the config's pipeline\.capacity_scope is 'sequence'"):
        run_block({"config": cfg, "plan": plan}, FakeContext())
    plan["capacity_scope"] = "sequence"
    with pytest.raises(ValueError, match=r"^pipeline\.capacity_scope: sequence needs model\.moe_token_drop_policy: position"):
        run_block({"config": cfg, "plan": plan}, FakeContext())
    cfg["model"]["moe_token_drop_policy"] = "position"
    r = run_block({"config": cfg, "plan": plan}, FakeContext())
    assert r["equivalence"]["ok"] and r["equivalence"]["worst"][1] <= 1e-5  # exact, drops included
    assert r["capacity"] == ("capacity factor 0.5, drop policy position, capacity of the whole sequence (exact)")
    plan["capacity_scope"] = cfg["pipeline"]["capacity_scope"] = "chunk"
    r = run_block({"config": cfg, "plan": plan}, FakeContext())
    assert "capacity per chunk (another function" in r["capacity"] and not r["equivalence"]["ok"]


def test_heartbeats_while_the_comparison_runs(monkeypatch):
    monkeypatch.setattr("ampipe.worker.background.POLL_S", 0.001)
    plan = fixture_plan("grouped-p2")
    ctx = FakeContext()
    run_block({"config": experiment_config(plan, steps=2), "plan": plan}, ctx)
    assert ctx.heartbeats > 0


def test_tolerance_argument_decides_pass_or_fail():
    plan = fixture_plan("interleaved-p4")
    r = run_block({"config": experiment_config(plan, steps=1), "plan": plan, "tolerance": 0.0}, FakeContext())
    worst = r["equivalence"]["worst"]
    assert r["equivalence"]["ok"] == (worst[1] == 0.0)
    assert r["equivalence"]["tolerance"] == 0.0


@pytest.mark.parametrize("field,value", [("hidden_size", 64), ("moe_router_topk", 2), ("seq_length", 96)])
def test_plan_dims_that_disagree_with_the_config_name_the_field(field, value):
    plan = fixture_plan("grouped-p2")  # top-1, hidden 32, seq 48
    cfg = experiment_config(plan)
    cfg["model"][field] = value
    ctx = FakeContext()
    with pytest.raises(PlanError, match=f"dims.{field}"):
        run_block({"config": cfg, "plan": plan}, ctx)
    assert ctx.events == []  # rejected before anything ran


def test_expert_parallel_size_mismatch_is_rejected():
    plan = fixture_plan("grouped-p2")
    cfg = experiment_config(plan)
    cfg["parallelism"]["expert_model_parallel_size"] = 2
    with pytest.raises(PlanError, match="dims.expert_model_parallel_size"):
        run_block({"config": cfg, "plan": plan}, FakeContext(world_size=2))


def test_ep2_without_torch_distributed_is_an_error_naming_the_field():
    plan = fixture_plan("interleaved-p2")  # EP 2
    with pytest.raises(RuntimeError, match="expert_model_parallel_size = 2 needs torch.distributed"):
        run_block({"config": experiment_config(plan), "plan": plan}, FakeContext(world_size=2))


@pytest.mark.parametrize("args,match", [
    ({}, "argument 'config' is required"),
    ({"config": {}}, "argument 'plan' is required"),
    ({"config": {}, "plan": {}, "stepz": 3}, r"unknown argument\(s\) \['stepz'\]"),
])
def test_bad_arguments_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        run_block(args, FakeContext())


def test_bad_steps_name_the_argument():
    plan = fixture_plan("grouped-p2")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        run_block({"config": experiment_config(plan), "plan": plan, "steps": 0}, FakeContext())


def test_invalid_plan_is_rejected_naming_the_op():
    plan = fixture_plan("grouped-p2")
    for op in plan["forward"]:
        if op["id"] == "f.experts.1":
            op["deps"] = []  # experts[1] no longer waits for its dispatch
    with pytest.raises(PlanError, match="f.experts.1"):
        run_block({"config": experiment_config(plan), "plan": plan}, FakeContext())


def test_an_error_in_the_comparison_reaches_the_caller_and_leaves_no_thread(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("op f.attn.1 failed: injected")

    monkeypatch.setattr("ampipe.pipeline.side_by_side.run_block_comparison", boom)
    plan = fixture_plan("grouped-p2")
    with pytest.raises(RuntimeError, match="op f.attn.1 failed: injected"):
        run_block({"config": experiment_config(plan), "plan": plan}, FakeContext())
    assert not [t for t in threading.enumerate() if t.name == "ampipe-run-block"]


def test_timeout_fails_the_command_and_stops_heartbeating(monkeypatch):
    release, returned = threading.Event(), threading.Event()

    def stuck(*a, **k):
        release.wait(60)
        returned.set()
        return {}

    monkeypatch.setattr("ampipe.pipeline.side_by_side.run_block_comparison", stuck)
    monkeypatch.setattr("ampipe.worker.background.POLL_S", 0.01)
    plan = fixture_plan("grouped-p2")
    ctx = FakeContext()
    try:
        with pytest.raises(TimeoutError, match="did not finish in 0.2 s"):
            run_block({"config": experiment_config(plan), "plan": plan, "timeout_s": 0.2}, ctx)
        assert not returned.is_set()  # it gave up on the stuck work, did not wait it out
    finally:
        release.set()


@pytest.mark.slow
def test_ep2_over_gloo(tmp_path):
    results = [json.loads(out.strip().splitlines()[-1]) for out in run_ranks(EP_WORKER, 2, tmp_path, timeout=120)]
    for r, got in enumerate(results):
        res = got["result"]
        assert res["rank"] == r and res["ep_rank"] == r and res["ep_size"] == 2
        assert res["equivalence"]["ok"], res["equivalence"]
        # Each rank holds 2 of the 4 experts: its expert gradients are its shard's.
        grads = [k for k in res["equivalence"]["largest_relative_differences"] if "experts" in k]
        assert grads
        assert [e["step"] for e in got["events"] if e["kind"] == "metric"] == [0, 1]


def test_run_block_takes_its_defaults_from_the_config_schema():
    # run.seed defaulted to 0 here and to 1234 in ampipe train and the schema: now the schema's
    plan = fixture_plan("grouped-p2")
    plan["dims"]["expert_model_parallel_size"] = 1
    cfg = experiment_config(plan, steps=1)
    del cfg["run"]["seed"], cfg["run"]["warmup"]
    r = run_block({"config": cfg, "plan": plan}, FakeContext())
    assert r["seed"] == 1234 and r["warmup"] == 1 and r["steps"] == 1
