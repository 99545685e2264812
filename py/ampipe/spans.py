"""Timed spans for the training profile (`ampipe train --profile`, docs/train.md#profile).

The step's phases, the executor's ops and waits, the collectives and the emulated delays each
record a span (name, category, thread, start, end) into the active `Recorder`, when one is
active; otherwise recording costs one global read. Times are `time.perf_counter_ns()`, which
on Linux reads CLOCK_MONOTONIC, one clock for every process of the machine: the spans of
several ranks line up in one trace without any clock exchange.

    with spans.recording() as rec:
        ...                                  # run steps
    events = rec.chrome_events(pid=rank)     # Chrome trace "X" events, microseconds

Threads are named by what they do (`thread_role`), and identified by their native id (what
`torch.profiler` writes as `tid`, so both kinds of event land on the same track).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recorder", "Span", "active", "recording", "span", "gc_pauses", "now_ns", "thread_role"]

now_ns = time.perf_counter_ns


@dataclass(frozen=True)
class Span:
    name: str
    cat: str  # phase | layer | block | op | issue | wait | comm | delay | gc | step | arm
    tid: int
    start_ns: int
    end_ns: int
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class Recorder:
    """Collects spans from every thread (list.append is atomic under the GIL)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.thread_names: dict[int, str] = {}

    def add(self, name: str, cat: str, start_ns: int, end_ns: int, *, tid: int | None = None,
            thread_name: str | None = None, **args: Any) -> None:
        """A span on the calling thread's track, or on track `tid` (a modelled stream) named
        `thread_name`."""
        if tid is None:
            tid = threading.get_native_id()
            if tid not in self.thread_names:
                self.thread_names[tid] = thread_role()
        elif tid not in self.thread_names:
            self.thread_names[tid] = thread_name or f"track {tid}"
        self.spans.append(Span(name, cat, tid, start_ns, end_ns, args))

    def chrome_events(self, pid: int, process_name: str | None = None) -> list[dict[str, Any]]:
        """Chrome trace events ("X" spans and thread/process names), times in microseconds."""
        out: list[dict[str, Any]] = []
        if process_name is not None:
            out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process_name}})
        for tid, name in self.thread_names.items():
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        for s in self.spans:
            ev: dict[str, Any] = {"ph": "X", "name": s.name, "cat": s.cat, "pid": pid, "tid": s.tid,
                                  "ts": s.start_ns / 1e3, "dur": (s.end_ns - s.start_ns) / 1e3}
            if s.args:
                ev["args"] = dict(s.args)
            out.append(ev)
        return out


_active: Recorder | None = None


def active() -> Recorder | None:
    """The recorder spans go to now, or None (then record nothing)."""
    return _active


@contextmanager
def recording(rec: Recorder | None = None) -> Iterator[Recorder]:
    """Make `rec` (or a new recorder) the active one for the duration."""
    global _active
    prev, _active = _active, rec if rec is not None else Recorder()
    try:
        yield _active
    finally:
        _active = prev


@contextmanager
def span(name: str, cat: str, **args: Any) -> Iterator[None]:
    """Record the enclosed code as one span (nothing when no recorder is active)."""
    rec = _active
    if rec is None:
        yield
        return
    t0 = now_ns()
    try:
        yield
    finally:
        rec.add(name, cat, t0, now_ns(), **args)


@contextmanager
def gc_pauses(rec: Recorder) -> Iterator[None]:
    """Record each pause of Python's garbage collector as a "python gc" span (category "gc") on
    the thread it stopped, for the duration. A full collection in a process holding millions of
    objects takes tens of milliseconds and lands wherever an allocation triggers it, also between
    a step's phases."""
    started: dict[int, int] = {}

    def note(phase: str, info: Mapping[str, Any]) -> None:
        tid = threading.get_native_id()
        if phase == "start":
            started[tid] = now_ns()
        elif tid in started:
            rec.add("python gc", "gc", started.pop(tid), now_ns(), generation=info.get("generation"))

    gc.callbacks.append(note)
    try:
        yield
    finally:
        gc.callbacks.remove(note)


def thread_role(thread: threading.Thread | None = None) -> str:
    """A track name for a thread: the rank's command thread (where training runs), the main
    thread, else the thread's own name."""
    t = thread or threading.current_thread()
    if t.name == "ampipe-command":
        return "compute thread (ampipe-command)"
    if t is threading.main_thread():
        return "main thread"
    return t.name
