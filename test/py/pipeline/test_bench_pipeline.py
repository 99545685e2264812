"""The pipeline benchmark runs end to end on tiny dims and reports every figure (not a timing test)."""

from __future__ import annotations

import json

from ampipe.bench.pipeline import main


def test_bench_pipeline_cli_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--set", "seq_length=48", "--set", "hidden_size=32", "--set", "num_attention_heads=4",
               "--set", "moe_ffn_hidden_size=64", "--plan", "sequential-p1", "--plan", "interleaved-p3",
               "--ratios", "0.5", "--iters", "1", "--warmup", "0", "--latency-us", "5",
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
