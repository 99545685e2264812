"""Ending a rank process without Python's finalization.

Why: gloo runs collectives on a small pool of worker threads per process group, and the thread
drops its reference to a finished work a moment after the caller's `wait()` returns. When the work
holds tensors Python has seen (every `all_gather_object`, every collective on a Python tensor),
dropping it takes the GIL. If the main thread has reached interpreter finalization by then,
CPython (3.11 here) ends the thread with `pthread_exit`, whose unwinding crosses a `noexcept`
destructor: `std::terminate`, "terminate called without an active exception", SIGABRT. A core dump
showed that stack; two-rank training runs that exit right after their last checkpoint's
`all_gather_object` hit it once in 80 runs under one busy loop (torch 2.13 gloo; pytorch/pytorch#190489
is the same abort). `destroy_process_group()` does not prevent it: a group still referenced (by a
model's layers, by `ParallelGroups`) keeps its threads until finalization destroys it.

So a rank does its own clean-up (destroy the process groups, close its sockets and files) and then
leaves with `os._exit`, after flushing what Python would have flushed: logging and stdio. Torch-free,
so a rank that fails before importing torch can use it too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

__all__ = ["exit_rank"]


def exit_rank(code: int) -> NoReturn:
    """Flushes logging, stdout and stderr, then ends the process with `code` at once (no atexit
    handlers, no finalization). Call it last, after the rank's own clean-up."""
    try:
        logging.shutdown()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not change the exit status
            pass
    os._exit(code)
