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
    t = threading.Thread(target=lambda: ctx.emit("metric", name="from_thread", value=3))
    t.start()
    t.join()
    logging.getLogger("ampipe.test").warning("careful: %d", 7)
    ctx.flush_events()
    return {"dropped": ctx.dropped_events}
