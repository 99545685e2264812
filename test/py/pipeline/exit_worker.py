"""A short rank process that ends the moment its work is done (started by test_exit.py).

``--mode busy``: one process; a pass runs on a helper thread while the program ends, its comm
op still inside torch (the state in which an exiting interpreter used to abort the process).
``--mode ep``: one rank of a 2-rank gloo world: one forward+backward of the pipelined block at
EP 2 (the all-to-alls on the communication thread), then the program ends at once.
Prints "<mode> done" as its last act; a clean process then exits 0.
"""

from __future__ import annotations

import argparse
import sys
import threading

import torch

from ampipe.pipeline.plan import PlanOp, StreamSpec
from ampipe.pipeline.streams import StreamExecutor


def busy() -> None:
    torch.set_num_threads(1)
    streams = (StreamSpec("compute", "compute"), StreamSpec("comm", "comm"))
    # b0 does not wait for c0: not a total order, so c0 runs on the communication thread
    ops = [PlanOp("a0", "route", 0, "compute", ()), PlanOp("c0", "dispatch", 0, "comm", ("a0",)),
           PlanOp("b0", "route", 1, "compute", ())]
    inside = threading.Event()
    m = torch.randn(128, 128)

    def run_op(op: PlanOp) -> None:
        if op.stream == "comm":
            inside.set()
            for _ in range(400):  # ~0.1-1 s of torch calls, each releasing the GIL
                m @ m

    ex = StreamExecutor(streams, "cpu")

    def runner() -> None:  # the test's own thread: parked afterwards, so that only ours can end at exit
        ex.run(ops, run_op, "forward")
        threading.Event().wait()

    threading.Thread(target=runner, daemon=True).start()
    inside.wait(30)
    print("busy done", flush=True)  # the program ends with the comm thread inside torch


def ep() -> None:
    sys.argv = [sys.argv[0], *sys.argv[3:]]  # --rank/--world/--init-file for gloo_rank
    from pipeline_helpers import inputs, load, make_layer, step
    from rank_procs import gloo_rank

    from ampipe.parallel import init_parallel_groups
    from ampipe.pipeline import AMPipeBlock

    with gloo_rank() as a:
        plan = load("grouped-p3")
        layer = make_layer(plan, ep=init_parallel_groups(a.world).ep)
        block = AMPipeBlock.from_layer(layer, plan)
        x, dy = inputs(plan, seed=100 + a.rank)
        step(block, layer, x, dy)
    print("ep done", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["busy", "ep"], required=True)
    mode = ap.parse_known_args()[0].mode
    busy() if mode == "busy" else ep()
