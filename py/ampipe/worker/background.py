"""Long commands: the work runs on a helper thread while the rank's main thread keeps the
bridge alive (heartbeats, forwarding the helper's events, reading a `cancel`).

The bridge's socket belongs to the main thread, and a long command (a block comparison, a
training run) can outlast the controller's heartbeat deadline.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from .commands import CommandContext

__all__ = ["COMMAND_THREAD_NAME", "POLL_S", "run_beside_heartbeats"]

COMMAND_THREAD_NAME = "ampipe-command"

# How often the main thread wakes to heartbeat and forward events while the work runs.
POLL_S = 0.1


def run_beside_heartbeats(ctx: CommandContext, timeout_s: float, fn: Callable[[], Any], *,
                          what: str = "the command") -> Any:
    """Runs `fn` on a helper thread; the calling (main) thread heartbeats until it ends.

    The helper's exception is re-raised here unchanged. After `timeout_s` this raises
    TimeoutError and stops heartbeating, so the controller's fault handling takes over.
    """
    box: queue.Queue = queue.Queue(maxsize=1)

    def target() -> None:
        try:
            box.put(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as is
            box.put(("error", e))

    worker = threading.Thread(target=target, name=COMMAND_THREAD_NAME, daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status, value = box.get(timeout=POLL_S)
            break
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish in {timeout_s:g} s (rank {ctx.rank})") from None
            ctx.heartbeat()
    worker.join()
    if status == "error":
        raise value
    return value
