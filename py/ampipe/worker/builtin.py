"""Commands every rank has: ``ping`` (a torch.distributed self-test), ``echo``, and the
fault-injection helpers used by the fault tests and for trying faults by hand."""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from ampipe.worker.commands import CommandContext, command


@command("ping")
def ping(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """all_reduce and all_to_all_single with values that identify each sender; checks both."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("ping needs torch.distributed; launch the ranks with dist enabled")
    seq = int(args.get("seq", 0))
    per_peer = int(args.get("numel", 4))
    w, r = ctx.world_size, ctx.rank
    dev = ctx.device

    # all_reduce: rank r contributes (r + 1) * (seq + 1); the sum is (seq + 1) * w(w+1)/2.
    t0 = time.perf_counter()
    x = torch.full((per_peer,), float((r + 1) * (seq + 1)), device=dev)
    dist.all_reduce(x)
    ar_s = time.perf_counter() - t0
    ar_expected = float((seq + 1) * w * (w + 1) // 2)
    ar_ok = bool(torch.all(x == ar_expected).item())

    # all_to_all_single: block j of rank r's input is r*1000 + j (+ seq*1e6); after the
    # exchange, block j of rank r's output must be j*1000 + r (+ seq*1e6).
    base = float(seq) * 1e6
    inp = torch.tensor([base + r * 1000 + j for j in range(w)], device=dev, dtype=torch.float64)
    inp = inp.repeat_interleave(per_peer)
    out = torch.empty_like(inp)
    t0 = time.perf_counter()
    dist.all_to_all_single(out, inp)
    a2a_s = time.perf_counter() - t0
    expected = torch.tensor([base + j * 1000 + r for j in range(w)], device=dev, dtype=torch.float64)
    a2a_ok = bool(torch.equal(out, expected.repeat_interleave(per_peer)))
    return {
        "rank": r, "pid": os.getpid(), "host": socket.gethostname(),
        "backend": ctx.backend, "device": str(dev),
        "all_reduce": {"ok": ar_ok, "value": float(x[0].item()), "expected": ar_expected, "seconds": ar_s},
        "all_to_all": {"ok": a2a_ok, "received": out[::per_peer].tolist(),
                       "expected": expected.tolist(), "seconds": a2a_s},
    }


@command("echo")
def echo(args: dict, ctx: CommandContext) -> dict:
    """Returns its arguments: the controller's round-trip benchmark."""
    return args


@command("emit_metrics")
def emit_metrics(args: dict, ctx: CommandContext) -> dict[str, int]:
    """Streams ``count`` small metric events as fast as it can; returns how many were dropped."""
    count = int(args.get("count", 1000))
    name = str(args.get("name", "bench"))
    dropped0 = ctx.dropped_events
    t0 = time.perf_counter()
    for i in range(count):
        ctx.emit("metric", name=name, value=float(i), step=i)
    seconds = time.perf_counter() - t0
    ctx.flush_events()  # what is still batched, so that its drops are counted here too
    return {"count": count, "dropped": ctx.dropped_events - dropped0, "seconds": seconds}


# -- fault injection (tests, and `ampipe ping` faults tried by hand) ---------------------

@command("fail")
def fail(args: dict, ctx: CommandContext) -> None:
    """Raises an exception on the ranks named in ``ranks`` (all when absent)."""
    ranks = args.get("ranks")
    if ranks is None or ctx.rank in ranks:
        raise RuntimeError(str(args.get("message", "injected failure")))


@command("spin")
def spin(args: dict, ctx: CommandContext) -> dict:
    """A busy loop that never heartbeats, on the ranks named in ``ranks``: a stuck rank."""
    ranks = args.get("ranks")
    seconds = float(args.get("seconds", 3600.0))
    _say(args)
    if ranks is None or ctx.rank in ranks:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
    return {"rank": ctx.rank}


@command("sleep")
def sleep(args: dict, ctx: CommandContext) -> dict:
    """A long command that stays alive: sleeps ``seconds`` while heartbeating."""
    _say(args)
    end = time.monotonic() + float(args.get("seconds", 1.0))
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.02))
        ctx.heartbeat()
    return {"rank": ctx.rank}


def _say(args: dict) -> None:
    """Writes ``args["say"]`` to stderr: fault tests look for it in the controller's report."""
    if "say" in args:
        print(str(args["say"]), file=sys.stderr, flush=True)
