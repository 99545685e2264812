"""Commands a test rank imports (through the welcome's `imports`)."""

import logging
import threading

import numpy as np
import torch

from ampipe.worker import command


@command("test_emit_values")
def emit_values(args, ctx):
    ctx.emit("metric", name="np", value=np.float32(1.5))
    ctx.emit("metric", name="tensor", value=torch.tensor(2.5))
    ctx.emit("metric", name="bad", value=object())
    heartbeat_error: list[str] = []

    def from_thread():
        ctx.emit("metric", name="from_thread", value=3)
        ctx.flush_events()  # not this thread's socket: left to the main thread
        try:
            ctx.heartbeat()
        except RuntimeError as e:
            heartbeat_error.append(str(e))

    t = threading.Thread(target=from_thread, name="helper")
    t.start()
    t.join()
    logging.getLogger("ampipe.test").warning("careful: %d", 7)
    ctx.flush_events()
    return {"dropped": ctx.dropped_events, "heartbeat_error": heartbeat_error}


@command("test_emit_then_mark_done")
def emit_then_mark_done(args, ctx):
    """Streams ``count`` metrics, then creates ``done_file``: the test reads nothing until
    then, so every event is emitted against a controller that is not reading."""
    dropped0 = ctx.dropped_events
    for i in range(int(args["count"])):
        ctx.emit("metric", name="m", value=float(i), step=i)
    ctx.flush_events()
    open(args["done_file"], "w").close()
    return {"count": int(args["count"]), "dropped": ctx.dropped_events - dropped0}


@command("test_until_cancelled")
def until_cancelled(args, ctx):
    """Works in the background (as long commands do) until the controller sends `cancel`."""
    import time

    from ampipe.worker.background import run_beside_heartbeats

    def work():
        steps = 0
        ctx.emit("progress", stage="start")
        while not ctx.cancel_requested:
            steps += 1
            time.sleep(0.01)
        return {"steps": steps}

    return run_beside_heartbeats(ctx, 30.0, work)


@command("test_collectives")
def collectives(args, ctx):
    """all_reduce after all_reduce on a helper thread (as training does) for ``seconds``, by the
    ranks in ``ranks`` (default: all; a rank left out leaves the others waiting in theirs).
    Emits ``progress`` once the first one is done."""
    import time

    import torch.distributed as dist

    from ampipe.worker.background import run_beside_heartbeats

    def work():
        n, end = 0, time.monotonic() + float(args.get("seconds", 30))
        if ctx.rank not in args.get("ranks", range(ctx.world_size)):
            return {"collectives": 0}
        while time.monotonic() < end and not ctx.cancel_requested:
            t = torch.ones(1)
            dist.all_reduce(t)
            n += 1
            if n == 1:
                ctx.emit("progress", stage="collectives")
        return {"collectives": n}

    return run_beside_heartbeats(ctx, 600.0, work)
