"""Where a training step's time goes: spans of a few steps per arm, and their breakdown.

`profile_arms` runs, for each arm (the baseline block and a pipelined plan), `steps` quiet
steps with only ampipe's own spans recording (`ampipe.spans`: about a microsecond each), and
then `steps` more under `torch.profiler` as well (every aten op, on every thread: its cost per
op is why the breakdown comes from the quiet steps). It returns Chrome trace events of all of
them, on this machine's monotonic clock (so the ranks' files merge into one timeline), and
`breakdown` figures per quiet step.

The MoE layers are timed the same way in both arms: a forward hook spans the layer's forward,
and two identity autograd nodes at its output and input span its backward (from the moment
its output's gradient arrives to the moment its input's gradient leaves).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import spans
from ..spans import Recorder, Span
from .arms import abba_order

__all__ = ["PHASES", "instrument_moe_layers", "breakdown", "summarize", "arm_summaries", "profile_arms"]

# The phases `Trainer.train_step` records; together they cover the step.
PHASES = ("zero_grad", "data", "forward", "backward", "loss_read", "grad_sync", "loss_scale", "clip",
          "optimizer", "metrics")


class _BackwardMark(torch.autograd.Function):
    """Identity; its backward calls `note()` (the moment a gradient passes this point)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, note):  # noqa: ANN001
        ctx.note = note
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ctx.note()
        return g, None


class _LayerTimer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fwd_start = 0
        self.bwd_start: list[int] = []

    def pre(self, module, args):  # noqa: ANN001
        if spans.active() is None or not torch.is_grad_enabled():
            return None
        self.fwd_start = spans.now_ns()
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            return None
        return (_BackwardMark.apply(x, self._bwd_end), *args[1:])

    def post(self, module, args, out):  # noqa: ANN001
        rec = spans.active()
        if rec is None or not torch.is_grad_enabled():
            return None
        rec.add(f"{self.name} forward", "layer", self.fwd_start, spans.now_ns(), layer=self.name, **{"pass": "forward"})
        y = out[0] if isinstance(out, tuple) else out
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return None
        y = _BackwardMark.apply(y, self._bwd_begin)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def _bwd_begin(self) -> None:
        self.bwd_start.append(spans.now_ns())

    def _bwd_end(self) -> None:
        rec = spans.active()
        if rec is not None and self.bwd_start:
            rec.add(f"{self.name} backward", "layer", self.bwd_start.pop(), spans.now_ns(), layer=self.name,
                    **{"pass": "backward"})


def instrument_moe_layers(model: torch.nn.Module) -> list[Any]:
    """Span every MoE layer's forward and backward (while a recorder is active). Returns the
    hook handles (remove them to stop)."""
    handles = []
    for name, m in model.named_modules():
        if getattr(m, "is_moe", False) and hasattr(m, "cfg"):
            t = _LayerTimer(name)
            handles.append(m.register_forward_pre_hook(t.pre))
            handles.append(m.register_forward_hook(t.post))
    return handles


def _within(s: Span, lo: int, hi: int) -> bool:
    return s.start_ns >= lo and s.end_ns <= hi


def breakdown(recorded: Sequence[Span], step_tid: int) -> list[dict[str, Any]]:
    """Per step (a "step" span on `step_tid`, the training thread), in ms:

    - ``step``; ``phases`` (each phase's total; ``phases_sum``); ``python_gc`` (garbage-collector
      pauses of the training thread, "gc" spans: `ampipe.spans.gc_pauses`) and
      ``python_gc_between_phases``; ``coverage`` = (phases + the pauses between them) / step;
    - ``moe_layers`` (forward + backward spans of the MoE layers) and ``outside_moe_layers``;
    - inside the pipelined passes: ``block_passes``, ``compute_ops`` (op spans on the training
      thread), ``compute_waits`` (its waits, total and ``waits_on`` per awaited op kind),
      ``island_compute`` (the part of those ops inside their autograd islands: the model's step
      functions forward, the autograd engine backward; "island" spans) and ``op_bookkeeping`` (the
      rest of the ops' time: inputs detached, islands kept, values handed on, gradients routed),
      ``executor_overhead`` (pass time not in an op or a wait), ``comm_stream_ops`` (the comm
      ops' time on their stream: on CPU the modelled interval from start to end, which includes
      the collective and any emulated delay);
    - ``collectives`` per name (gloo calls on any thread) and ``emulated_delay``.
    """
    by_cat: dict[str, list[Span]] = defaultdict(list)
    for s in recorded:
        by_cat[s.cat].append(s)
    out = []
    for st in sorted(by_cat["step"], key=lambda s: s.start_ns):
        if st.tid != step_tid:
            continue
        lo, hi = st.start_ns, st.end_ns

        def total(cat: str, tid: int | None = None, pred=None) -> float:  # noqa: ANN001
            return sum(s.ms for s in by_cat[cat] if _within(s, lo, hi) and (tid is None or s.tid == tid)
                       and (pred is None or pred(s)))

        own_phases = [s for s in by_cat["phase"] if s.tid == step_tid and _within(s, lo, hi)]
        phases: dict[str, float] = defaultdict(float)
        for s in own_phases:
            phases[s.name] += s.ms
        waits_on: dict[str, float] = defaultdict(float)
        for s in by_cat["wait"]:
            if s.tid == step_tid and _within(s, lo, hi):
                waits_on[str(s.args.get("on_kind"))] += s.ms
        collectives: dict[str, float] = defaultdict(float)
        for s in by_cat["comm"]:
            if _within(s, lo, hi):
                collectives[s.name] += s.ms
        step_ms = st.ms
        layers = total("layer", step_tid)
        passes = total("block", step_tid)
        compute_ops = total("op", step_tid) + total("issue", step_tid)  # a comm op's local part counts
        island = total("island", step_tid)
        waits = sum(waits_on.values())
        phases_sum = sum(phases.values())
        gc_pauses = [s for s in by_cat["gc"] if s.tid == step_tid and _within(s, lo, hi)]
        gc_between = sum(g.ms for g in gc_pauses if not any(_within(g, p.start_ns, p.end_ns) for p in own_phases))
        out.append({
            "step": st.args.get("step"), "step_ms": step_ms,
            "phases": dict(phases), "phases_sum": phases_sum,
            # the step's time accounted for: its phases, and garbage collection that paused it between two
            "coverage": (phases_sum + gc_between) / step_ms if step_ms else 0.0,
            "python_gc": sum(g.ms for g in gc_pauses), "python_gc_between_phases": gc_between,
            "moe_layers": layers, "outside_moe_layers": step_ms - layers,
            "block_passes": passes, "compute_ops": compute_ops, "island_compute": island,
            "op_bookkeeping": max(0.0, compute_ops - island), "compute_waits": waits, "waits_on": dict(waits_on),
            "executor_overhead": max(0.0, passes - compute_ops - waits) if passes else 0.0,
            "comm_stream_ops": total("op", pred=lambda s: s.tid != step_tid),
            "collectives": dict(collectives), "emulated_delay": total("delay"),
        })
    return out


def _median_of(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    vals = [r[key] for r in rows]
    if not vals:
        return None
    if isinstance(vals[0], Mapping):
        keys = sorted({k for v in vals for k in v})
        return {k: statistics.median(v.get(k, 0.0) for v in vals) for k in keys}
    return statistics.median(vals)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The median over steps of every figure of `breakdown` (per key; dict figures per entry)."""
    if not rows:
        return {}
    return {k: _median_of(rows, k) for k in rows[0] if k != "step"} | {"steps": len(rows)}


def arm_summaries(recorded: Sequence[Span], step_tid: int) -> dict[str, dict[str, Any]]:
    """What the planner's calibration needs of the measured steps of each arm ("arm" spans with
    ``measured`` true, `ampipe.train.arms.time_arms`): per arm, the medians over its steps of
    ``step_ms`` and ``moe_layers_ms``, ``blocks_per_step`` (MoE layer forwards in a step), and for
    a pipelined arm the median time of each op id per pass (``op_ms``: compute ops on the
    training thread, each with the comm ops' local parts that ran there just before it, so the
    schedule's compute stream carries them as the thread did; comm ops by their time on their
    modelled stream) and of each pass (``pass_ms``)."""
    by_arm: dict[str, list[Span]] = defaultdict(list)
    arms = [s for s in recorded if s.cat == "arm" and s.args.get("measured")]
    ordered = sorted(recorded, key=lambda s: s.start_ns)
    for a in arms:
        by_arm[a.args["arm"]].extend(s for s in ordered if a.start_ns <= s.start_ns and s.end_ns <= a.end_ns)
    out: dict[str, dict[str, Any]] = {}
    for name, ss in by_arm.items():
        rows = breakdown(ss, step_tid)
        op: dict[str, dict[str, list[float]]] = {"forward": defaultdict(list), "backward": defaultdict(list)}
        passes: dict[str, list[float]] = {"forward": [], "backward": []}
        layer_fwd = 0
        local = 0.0  # comm ops' local parts (start, remainder) run on this thread before the next compute op
        for s in ss:
            p = s.args.get("pass")
            if s.cat == "issue" and s.tid == step_tid:
                local += s.ms
            elif s.cat == "op" and p in op:
                if s.tid == step_tid:  # a compute op: it carries the local parts that ran just before it
                    op[p][s.name].append(s.ms + local)
                    local = 0.0
                else:  # a comm op: its time on its (modelled) stream
                    op[p][s.name].append(s.ms)
            elif s.cat == "block" and p in passes and s.tid == step_tid:
                passes[p].append(s.ms)
                local = 0.0
            elif s.cat == "layer" and p == "forward" and s.tid == step_tid:
                layer_fwd += 1
        out[name] = {
            "steps": len(rows),
            "step_ms": statistics.median(r["step_ms"] for r in rows) if rows else None,
            "moe_layers_ms": statistics.median(r["moe_layers"] for r in rows) if rows else None,
            "blocks_per_step": layer_fwd // len(rows) if rows else 0,
            "op_ms": {p: {k: statistics.median(v) for k, v in d.items()} for p, d in op.items()},
            "pass_ms": {p: statistics.median(v) for p, v in passes.items() if v},
        }
    return out


def _torch_profiler():
    """A CPU (and CUDA) torch.profiler that sees every thread (the rank's command thread and gloo's predate it);
    None where this torch cannot."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        cfg = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        return None
    return profile(activities=acts, experimental_config=cfg)


def _profiler_events(prof, clock_marker_ns: int, rank: int) -> list[dict[str, Any]]:
    """torch.profiler's Chrome events moved onto the monotonic clock of `ampipe.spans` (the
    profiler's span `ampipe clock marker` started at `clock_marker_ns`), this process's events
    under pid `rank`, a device's under pid ``1000 + 100 * rank + device``."""
    import json
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            doc = json.load(f)
    finally:
        os.unlink(path)
    events = [e for e in doc.get("traceEvents", []) if isinstance(e, dict)]
    marker = next((e for e in events if e.get("name") == "ampipe clock marker"), None)
    if marker is None:
        return []
    shift = clock_marker_ns / 1e3 - float(marker["ts"])
    me = os.getpid()
    out = []
    for e in events:
        e = dict(e)
        if "ts" in e:
            e["ts"] = float(e["ts"]) + shift
        pid = e.get("pid")
        if pid == me:
            if e.get("ph") == "M" and e.get("name") in ("process_name", "process_labels", "process_sort_index"):
                continue  # ampipe names the rank's process
            e["pid"] = rank
        elif isinstance(pid, int):
            e["pid"] = 1000 + 100 * rank + pid
            if e.get("ph") == "M" and e.get("name") == "process_name":
                e["args"] = {"name": f"rank {rank} {e.get('args', {}).get('name', 'device')}"}
        else:
            continue
        e.setdefault("cat", "torch")
        out.append(e)
    return out


def profile_arms(trainer: Any, arms: Mapping[str, Any], *, steps: int, rank: int,
                 torch_profiler: bool = True) -> dict[str, Any]:
    """Profile each arm (`name -> plan or None`): one warm-up step, `steps` quiet steps (the
    breakdown), then `steps` steps under torch.profiler (when `torch_profiler` and this torch
    can see every thread). Arms alternate in ABBA order per round. Returns ``{"events": Chrome
    events (pid = rank), "breakdown": {arm: summary}, "steps": {arm: per-step rows},
    "torch_profiler": bool}``."""
    import threading

    names = list(arms)
    handles = instrument_moe_layers(trainer.model)
    rec = Recorder()
    events: list[dict[str, Any]] = []
    per_step: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    tid = threading.get_native_id()
    used_profiler = False
    try:
        for _, name in abba_order(names, 1):  # warm-up, not recorded
            trainer.set_block(arms[name])
            trainer.train_step()
        with spans.recording(rec), spans.gc_pauses(rec):
            for r, name in abba_order(names, steps):
                trainer.set_block(arms[name])
                t0 = spans.now_ns()
                trainer.train_step()
                rec.add(f"arm {name}", "arm", t0, spans.now_ns(), arm=name, round=r, quiet=True)
            quiet = list(rec.spans)
            prof = _torch_profiler() if torch_profiler else None
            if prof is not None:
                used_profiler = True
                with prof:
                    with torch.profiler.record_function("ampipe clock marker"):
                        marker_ns = spans.now_ns()
                    for r, name in abba_order(names, steps):
                        trainer.set_block(arms[name])
                        t0 = spans.now_ns()
                        trainer.train_step()
                        rec.add(f"arm {name}", "arm", t0, spans.now_ns(), arm=name, round=r, quiet=False)
                events.extend(_profiler_events(prof, marker_ns, rank))
    finally:
        for h in handles:
            h.remove()
    arm_spans = [s for s in quiet if s.cat == "arm"]
    for a in arm_spans:
        rows = breakdown([s for s in quiet if a.start_ns <= s.start_ns and s.end_ns <= a.end_ns], tid)
        per_step[a.args["arm"]].extend(rows)
    # ampipe names the threads it recorded on (torch.profiler calls them "thread N (python)")
    events = [e for e in events if not (e.get("ph") == "M" and e.get("name") == "thread_name"
                                         and e.get("pid") == rank and e.get("tid") in rec.thread_names)]
    events.extend(rec.chrome_events(pid=rank, process_name=f"rank {rank}"))
    return {"events": events, "breakdown": {n: summarize(per_step[n]) for n in names}, "steps": per_step,
            "torch_profiler": used_profiler}
