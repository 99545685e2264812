"""The pipeline benchmark runs end to end on tiny dims and reports every figure (not a timing test)."""

from __future__ import annotations

import json
import statistics

import pytest

from ampipe.bench.pipeline import DEFAULT_PLANS, SCHEDULES, _in_turn, main, paired, paired_figures
from ampipe.pipeline.analysis import ideal_bound_ms
from ampipe.pipeline.plan import load_plan


def test_bench_pipeline_cli_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--set", "seq_length=48", "--set", "hidden_size=32", "--set", "num_attention_heads=4",
               "--set", "moe_ffn_hidden_size=64", "--plan", "sequential-p1", "--plan", "interleaved-p3",
               "--ratios", "0.5", "--iters", "2", "--overhead-iters", "3", "--warmup", "0",
               "--latency-us", "5",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "P=1 overhead (sequential-p1" in printed and "emulated 8-way" in printed
    assert "comm op time / modelled delay: dispatch" in printed
    d = json.loads(out.read_text())
    assert {(r["ratio"], r["plan"]) for r in d["results"]} == {(0.5, "sequential-p1"), (0.5, "interleaved-p3")}
    for r in d["results"]:
        assert r["speedup"] > 0 and r["ideal_bound_ms"] > 0 and "emulated" in r["emulated"]
        assert set(r["op_times_ms"]) == {"forward", "backward"}
        delay = r["emulated_delay"]  # per comm kind: measured op time vs modelled delay
        assert set(delay) == {"dispatch", "combine", "dispatch_bwd", "combine_bwd"}
        assert all(v["ops"] == r["degree"] and v["modelled_ms"] > 0 for v in delay.values())
    assert set(d["memory_ratio"]) == {"sequential-p1", "interleaved-p3"}
    assert d["p1_overhead_paired"]["sequential-p1"]["n"] == 3
    assert all(r["paired"]["speedup"]["n"] == 2 for r in d["results"])
    # the multi-chunk plan's cost split into the chunking itself and the executor on top of it
    assert "P=3 cost (interleaved-p3, no communication" in printed and "the executor" in printed
    assert set(d["chunking_cost"]) == {"interleaved-p3"}
    cost = d["chunking_cost"]["interleaved-p3"]
    assert {k: cost[k]["n"] for k in ("chunked_reference", "pipelined", "executor")} == \
        {"chunked_reference": 3, "pipelined": 3, "executor": 3}
    assert cost["max_abs_diff_y"] < 1e-4  # the reference computes what the pipelined block does



@pytest.mark.parametrize("scope", ["chunk", "sequence"])
def test_chunked_reference_with_a_capacity_that_drops(tmp_path, capsys, scope):
    """Per-chunk capacity (the paper's scope) is what the reference computes, drops included;
    a capacity of the whole sequence applied chunk by chunk is another function: no reference."""
    out = tmp_path / "bench.json"
    rc = main(["--set", "seq_length=48", "--set", "hidden_size=32", "--set", "num_attention_heads=4",
               "--set", "moe_ffn_hidden_size=64", "--set", "moe_expert_capacity_factor=0.5",
               "--set", "moe_token_drop_policy=position", "--capacity-scope", scope,
               "--plan", "grouped-p3-nonuniform", "--ratios", "0.5", "--iters", "1", "--overhead-iters", "2",
               "--warmup", "0", "--latency-us", "5", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    if scope == "chunk":
        assert d["chunking_cost"]["grouped-p3-nonuniform"]["max_abs_diff_y"] < 1e-4
    else:
        assert d["chunking_cost"] == {}
        assert "grouped-p3-nonuniform: no chunked reference" in capsys.readouterr().out

def test_shared_expert_flag_compares_both_blocks_at_one_interconnect(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--set", "seq_length=48", "--set", "hidden_size=32", "--set", "num_attention_heads=4",
               "--set", "moe_ffn_hidden_size=64", "--plan", "grouped-p2", "--ratios", "0.5,1",
               "--iters", "2", "--overhead-iters", "1", "--warmup", "0", "--latency-us", "5",
               "--shared-expert", "96", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "without -> with a shared expert (FFN 96), same emulated interconnect" in printed
    d = json.loads(out.read_text())
    assert d["without"]["config"]["moe_shared_expert_intermediate_size"] is None
    assert d["with"]["config"]["moe_shared_expert_intermediate_size"] == 96
    # the run with the shared expert ran the shared-expert schedule, at the first run's bandwidths
    with_rows = d["with"]["results"]
    assert all(any(op.startswith("f.shared.") for op in r["op_times_ms"]["forward"]) for r in with_rows)
    for a, b in zip(d["without"]["results"], with_rows):
        assert (a["ratio"], a["plan"], a["bandwidth_gbps"]) == (b["ratio"], b["plan"], b["bandwidth_gbps"])
    assert [(r["ratio"], r["plan"]) for r in d["comparison"]] == [(0.5, "grouped-p2"), (1.0, "grouped-p2")]
    assert all(r["speedup_with"] > 0 and r["speedup_without"] > 0 for r in d["comparison"])


def test_paired_figures_form_ratios_per_repetition():
    plan = load_plan(SCHEDULES / "interleaved-p2.json")
    times = [{"forward": {op.id: 1.0 for op in plan.forward},
              "backward": {op.id: 2.0 for op in plan.backward}}] * 3
    bound = ideal_bound_ms(plan, times[0])["bound_ms"]
    # Repetitions drift (x1, x2): each pairs its own baseline and pipelined time. The third
    # has a baseline at the bound: no efficiency from it.
    base = [bound + 10, bound + 20, bound]
    pipe = [bound + 1, bound + 4, bound + 2]
    fig = paired_figures(plan, base, pipe, times)
    eff = fig["overlap_efficiency"]
    # median(T_base - T_pipe) / median(T_base - T_bound) = 9 / 10; per repetition 0.9 and 0.8
    assert eff["value"] == pytest.approx(0.9)
    assert eff["n"] == 2 and eff["median"] == pytest.approx((0.9 + 0.8) / 2)
    assert fig["speedup"]["median"] == pytest.approx(statistics.median(b / p for b, p in zip(base, pipe)))
    assert fig["ideal_bound_ms"] == pytest.approx(bound)
    assert paired_figures(plan, [bound], [bound + 1], times[:1])["overlap_efficiency"] is None


def test_in_turn_alternates_order_from_the_first_measured_repetition():
    blocks = {"a": 1, "b": 2, "c": 3}
    assert [k for k, _ in _in_turn(blocks, 0)] == ["a", "b", "c"]
    assert [k for k, _ in _in_turn(blocks, 1)] == ["c", "b", "a"]
    assert [k for k, _ in _in_turn(blocks, -1)] == ["c", "b", "a"]  # a warm-up repetition


def test_repetition_counts_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--iters", "0"])
    assert "--iters: must be an integer >= 1" in capsys.readouterr().err


def test_paired_quartiles():
    assert paired([3.0, 1.0, 2.0, 4.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "n": 5}
    assert paired([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "n": 1}
    with pytest.raises(ValueError, match="no repetitions"):
        paired([])


def test_named_schedules_ship_with_the_package(tmp_path, capsys):
    # an installed ampipe has no test/fixtures: the schedules are package data
    from pathlib import Path

    import ampipe

    pkg = Path(ampipe.__file__).resolve().parent
    assert SCHEDULES.is_relative_to(pkg) and "fixtures" not in SCHEDULES.parts
    for name in DEFAULT_PLANS:
        load_plan(SCHEDULES / f"{name}.json")
    pyproject = (pkg.parent / "pyproject.toml").read_text()
    assert '"ampipe.bench" = ["schedules/*.json"]' in pyproject
    with pytest.raises(SystemExit, match="--plan grouped-p5: no schedule of that name .*known: .*grouped-p2"):
        main(["--plan", "grouped-p5", "--iters", "1"])


def test_bench_states_the_routing_and_runs_the_exact_capacity_scope(capsys, tmp_path):
    out = tmp_path / "b.json"
    assert main(["--set", "seq_length=32", "--set", "hidden_size=32", "--set", "num_attention_heads=4",
                 "--set", "moe_ffn_hidden_size=32", "--set", "moe_expert_capacity_factor=0.5",
                 "--set", "moe_token_drop_policy=position", "--capacity-scope", "sequence",
                 "--plan", "interleaved-p2", "--ratios", "0.5", "--iters", "1", "--overhead-iters", "1",
                 "--warmup", "0", "--json", str(out)]) == 0
    assert "routing: capacity factor 0.5, drop policy position, capacity of the whole sequence (exact)" \
        in capsys.readouterr().out
    assert json.loads(out.read_text())["capacity"]["interleaved-p2"].endswith("(exact)")
