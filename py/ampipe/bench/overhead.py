"""What one island backward costs the executor beyond its kernels: ``torch.autograd.grad`` against
the autograd engine's entry point that the executor calls (`ampipe.pipeline.step._island_grad`).

``python -m ampipe.bench.overhead [--calls N] [--rows R] [--hidden H] [--json [PATH]]``

An island like the executor's (a linear layer and a norm on detached leaves, small enough that its
kernels cost little) is built fresh for every call (a graph is freed by its backward) and
differentiated for its input and its parameters either way, calls of the two interleaved; the
medians per call and their difference (``torch.autograd.grad``'s Python argument handling, which
the executor skips: it matches shapes and dtypes itself) are printed. Where docs/pipeline.md says
what a call costs, this is the command behind it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ampipe.pipeline.step import _island_grad


def _island(x: torch.Tensor, lin: torch.nn.Linear, norm: torch.nn.LayerNorm):
    leaf = x.detach().requires_grad_(True)
    out = norm(lin(leaf))
    return [out], [torch.ones_like(out)], [leaf, *lin.parameters(), *norm.parameters()]


def measure(calls: int, rows: int, hidden: int) -> dict[str, float]:
    """Median µs per call of `torch.autograd.grad` and of the engine entry point, interleaved."""
    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(hidden, hidden), torch.nn.LayerNorm(hidden)
    x = torch.randn(rows, hidden)
    ways = {
        "autograd_grad_us": lambda o, g, i: torch.autograd.grad(o, i, g, allow_unused=True),
        "engine_us": _island_grad,
    }
    samples: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(calls + 10):  # the first 10 calls warm up
        for name, fn in (list(ways.items()) if i % 2 == 0 else list(ways.items())[::-1]):
            outs, grads, inputs = _island(x, lin, norm)
            t0 = time.perf_counter()
            fn(outs, grads, inputs)
            if i >= 10:
                samples[name].append((time.perf_counter() - t0) * 1e6)
    out = {k: statistics.median(v) for k, v in samples.items()}
    out["saved_us"] = out["autograd_grad_us"] - out["engine_us"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="timed calls of each way (default 2000)")
    ap.add_argument("--rows", type=int, default=16, help="rows of the island's input (default 16)")
    ap.add_argument("--hidden", type=int, default=32, help="its width (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON to PATH (or stdout)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rows < 1 or args.hidden < 1:
        ap.error("--calls, --rows and --hidden must be positive")
    torch.set_num_threads(args.threads)
    r = {"calls": args.calls, "rows": args.rows, "hidden": args.hidden, "threads": args.threads,
         "torch": torch.__version__, **measure(args.calls, args.rows, args.hidden)}
    if args.json:
        text = json.dumps(r, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.json != "-":
        print(f"island backward, median of {args.calls} calls each (interleaved), a {args.rows}x{args.hidden} "
              f"linear + layernorm, {args.threads} thread(s), torch {torch.__version__}:")
        print(f"  torch.autograd.grad        {r['autograd_grad_us']:8.1f} us")
        print(f"  engine entry point         {r['engine_us']:8.1f} us")
        print(f"  argument handling skipped  {r['saved_us']:8.1f} us a call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
