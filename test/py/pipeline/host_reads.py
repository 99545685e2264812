"""Counting the host's reads of device values inside a block step, by op.

`torch.cuda.set_sync_debug_mode` does not flag `Event.synchronize()`, nor a `.cpu()` or
`.tolist()` that it considers legitimate, although each makes the thread that issues every
stream wait. This wraps those calls (and `.item()`, the stream and device synchronizes) and
records the kind of the plan op running when each happens (None: outside any op), on any
thread. On CPU the same calls are counted, so the rule is checked without a GPU.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from ampipe.pipeline import step as step_mod

_local = threading.local()


@contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Yields a Counter of ``(pass, op kind or None, what)``: one entry per host read."""
    reads: Counter = Counter()

    def spy(owner, name: str):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            reads[(getattr(_local, "op", (None, None)) + (name,))] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("tolist", "cpu", "item"):
        spy(torch.Tensor, name)
    spy(torch.cuda.Event, "synchronize")
    spy(torch.cuda.Stream, "synchronize")
    spy(torch.cuda, "synchronize")

    def track(pass_name: str, method: str):
        real = getattr(step_mod.Step, method)

        def wrapper(self, op):
            prev = getattr(_local, "op", (None, None))
            _local.op = (pass_name, op.kind)
            try:
                return real(self, op)
            finally:
                _local.op = prev

        monkeypatch.setattr(step_mod.Step, method, wrapper)

    track("forward", "forward_op")
    track("backward", "backward_op")
    try:
        yield reads
    finally:
        monkeypatch.undo()
