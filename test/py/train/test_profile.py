"""Training steps of several blocks on one trainer (ampipe.train.arms) and the step profile
(ampipe.train.profile): ABBA order, in-place block switches, spans, breakdown."""

from __future__ import annotations

import json

import pytest

from ampipe.pipeline import AMPipeBlock
from ampipe.pipeline.emulation import EmulatedComm
from ampipe.spans import Recorder, Span
from ampipe.train.arms import abba_order, time_arms
from ampipe.train.profile import PHASES, breakdown, profile_arms
from synthetic import fixture_plan, model_dict
from test_train_loop import losses, trainer

EMU = {"latency_us": 50, "bandwidth_gbps": 0.5, "world_size": 8}


def test_abba_order_alternates_the_arms_each_round():
    assert abba_order(["a", "b", "c"], 3) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                                              (2, "a"), (2, "b"), (2, "c")]


def test_switching_blocks_in_place_changes_no_loss(tmp_path):
    # One trainer alternating the pipelined and the baseline block step by step trains like the
    # baseline (dropless, fp32: the same function), and ends on the block it was last given.
    plan = fixture_plan("grouped-p2")
    base, eb = trainer(tmp_path / "b", steps=6)
    mixed, em = trainer(tmp_path / "m", steps=6, plan=plan)
    base.begin(resume=False), mixed.begin(resume=False)
    for i in range(6):
        base.advance()
        mixed.set_block(None if i % 2 else plan)
        assert isinstance(mixed.model.decoder.layers[0], AMPipeBlock) == (i % 2 == 0)
        mixed.advance()
    lb, lm = losses(eb), losses(em)
    assert max(abs(x - y) for x, y in zip(lb, lm)) <= 1e-5, (lb, lm)


def test_time_arms_runs_every_arm_in_abba_rounds(tmp_path):
    t, _ = trainer(tmp_path, steps=100)
    seen = []
    times = time_arms(t, {"baseline": None, "p2": fixture_plan("grouped-p2")}, steps=3, warmup=1,
                      on_step=lambda arm, r, ms: seen.append((arm, r)))
    assert seen == [("baseline", 0), ("p2", 0), ("p2", 1), ("baseline", 1), ("baseline", 2), ("p2", 2),
                    ("p2", 3), ("baseline", 3)]
    assert {k: len(v) for k, v in times.items()} == {"baseline": 3, "p2": 3}
    assert all(ms > 0 for v in times.values() for ms in v)
    ran = []
    stopped = time_arms(t, {"baseline": None, "p2": fixture_plan("grouped-p2")}, steps=3, warmup=0,
                        should_stop=lambda: len(ran) >= 2, on_step=lambda arm, r, ms: ran.append(arm))
    assert len(ran) == 2 and {k: len(v) for k, v in stopped.items()} == {"baseline": 1, "p2": 1}


def _span(name, cat, tid, a, b, **args):
    return Span(name, cat, tid, int(a * 1e6), int(b * 1e6), args)  # a, b in ms


def test_breakdown_adds_up_the_spans_of_each_step():
    T, C = 1, 2  # the training thread, a modelled comm stream track
    spans = [
        _span("step 1", "step", T, 0, 100, step=1),
        _span("forward", "phase", T, 0, 40), _span("backward", "phase", T, 40, 90),
        _span("optimizer", "phase", T, 90, 99),
        _span("decoder.layers.0 forward", "layer", T, 5, 35), _span("decoder.layers.0 backward", "layer", T, 45, 85),
        _span("pipelined pass", "block", T, 6, 34), _span("pipelined pass", "block", T, 46, 84),
        _span("f.attn.0", "op", T, 6, 16), _span("island forward", "island", T, 7, 15),
        _span("start f.dispatch.0", "issue", T, 16, 18), _span("island backward", "island", T, 47, 79),
        _span("wait f.dispatch.0", "wait", T, 18, 24, on="f.dispatch.0", on_kind="dispatch"),
        _span("f.experts.0", "op", T, 24, 33),
        _span("b.experts.0", "op", T, 46, 80),
        _span("wait b.combine.0", "wait", T, 80, 83, on="b.combine.0", on_kind="combine_bwd"),
        _span("f.dispatch.0", "op", C, 16, 24), _span("emulated delay", "delay", C, 18, 24),
        _span("all_reduce", "comm", T, 92, 95),
        _span("python gc", "gc", T, 10, 12), _span("python gc", "gc", T, 99, 100),  # in a phase; between
        _span("step 2", "step", T, 100, 150, step=2),  # a second step: counted apart
        _span("forward", "phase", T, 100, 150),
    ]
    rows = breakdown(spans, T)
    assert [r["step"] for r in rows] == [1, 2]
    r = rows[0]
    assert r["step_ms"] == 100 and r["phases_sum"] == 99
    assert r["python_gc"] == 3 and r["python_gc_between_phases"] == 1 and r["coverage"] == 1.0
    assert r["phases"] == {"forward": 40, "backward": 50, "optimizer": 9}
    assert r["moe_layers"] == 70 and r["outside_moe_layers"] == 30
    assert r["block_passes"] == 66
    assert r["compute_ops"] == 10 + 2 + 9 + 34  # a comm op's local part (its issue) counts
    assert r["island_compute"] == 8 + 32 and r["op_bookkeeping"] == 55 - 40
    assert r["compute_waits"] == 9 and r["waits_on"] == {"dispatch": 6, "combine_bwd": 3}
    assert r["executor_overhead"] == 66 - 55 - 9
    assert r["comm_stream_ops"] == 8 and r["emulated_delay"] == 6
    assert r["collectives"] == {"all_reduce": 3}
    assert rows[1]["phases"] == {"forward": 50} and rows[1]["moe_layers"] == 0


def test_profile_of_both_blocks_covers_every_step(tmp_path):
    t, _ = trainer(tmp_path, steps=100, plan=None)
    t.emulated_comm = EmulatedComm.from_dict(EMU)  # both arms get it at their set_block
    plan = fixture_plan("grouped-p2")
    r = profile_arms(t, {"baseline": None, "pipelined": plan}, steps=2, rank=0, torch_profiler=True)
    assert set(r["breakdown"]) == {"baseline", "pipelined"}
    for arm, b in r["breakdown"].items():
        assert b["steps"] == 2
        assert 0.95 <= b["coverage"] <= 1.0, (arm, r["steps"][arm])  # the phases (and gc between) cover the step
        assert set(b["phases"]) <= set(PHASES) and {"forward", "backward", "optimizer", "grad_sync"} <= set(b["phases"])
        assert b["moe_layers"] > 0 and b["emulated_delay"] > 0
    p, base = r["breakdown"]["pipelined"], r["breakdown"]["baseline"]
    assert p["block_passes"] > 0 and p["compute_ops"] > 0 and p["comm_stream_ops"] > 0
    # every forward and backward op of the plan runs its island inside its op span
    assert 0 < p["island_compute"] < p["compute_ops"]
    assert p["op_bookkeeping"] == pytest.approx(p["compute_ops"] - p["island_compute"])
    assert base["block_passes"] == 0 and base["island_compute"] == 0
    ev = r["events"]
    json.dumps(ev)  # Chrome trace events, serialisable
    ours = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("step", "phase", "op", "layer")]
    assert {e["args"]["arm"] for e in ev if e.get("cat") == "arm"} == {"baseline", "pipelined"}
    names = {e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
    assert "main thread" in names and "comm stream (modelled)" in names
    # torch.profiler's events are merged onto the same clock: inside the profiled steps
    assert r["torch_profiler"]
    aten = [e for e in ev if e.get("ph") == "X" and str(e.get("name", "")).startswith("aten::")]
    traced = [e for e in ev if e.get("cat") == "arm" and not e["args"]["quiet"]]
    lo, hi = min(e["ts"] for e in traced), max(e["ts"] + e["dur"] for e in traced)
    assert aten and all(lo - 1e3 <= e["ts"] <= hi + 1e3 for e in aten)
    assert all(e["pid"] == 0 for e in ours)


def test_recorder_names_threads_and_modelled_tracks():
    rec = Recorder()
    rec.add("a", "op", 0, 1000)
    rec.add("b", "op", 0, 2000, tid=7, thread_name="comm stream (modelled)")
    ev = rec.chrome_events(pid=3, process_name="rank 3")
    meta = {(e["name"], e["tid"]): e["args"]["name"] for e in ev if e["ph"] == "M"}
    assert meta[("process_name", 0)] == "rank 3" and meta[("thread_name", 7)] == "comm stream (modelled)"
    xs = [e for e in ev if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"], e["pid"]) for e in xs] == [("a", 0.0, 1.0, 3), ("b", 0.0, 2.0, 3)]


def test_gc_pauses_are_recorded_as_spans_on_the_collecting_thread():
    import gc
    import threading

    from ampipe import spans

    rec = Recorder()
    with spans.gc_pauses(rec):
        gc.collect()
    gc.collect()  # after the block: not recorded
    got = [s for s in rec.spans if s.cat == "gc"]
    assert len(got) == 1 and got[0].name == "python gc" and got[0].args["generation"] == 2
    assert got[0].tid == threading.get_native_id() and got[0].end_ns >= got[0].start_ns
