"""Benchmark of the dispatch/combine kernels against the pure-torch reference.

``python -m ampipe.bench.kernels [--device cpu|cuda|auto] [--full] [--json [PATH]]``

For each size (tokens T, hidden H, experts E, top-k K) and each op it times the compiled
op (``torch.ops.ampipe``) and the reference side by side, repetitions interleaved, and
quotes medians: the speed-up over the reference, and the achieved memory bandwidth (bytes
an ideal kernel must read and write, over the time). On CUDA the bandwidth is also given
as a fraction of the device's peak (the spec sheet's where known, else measured by a
large device-to-device copy). Routing is random top-k (distinct experts per token).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ampipe.bench.timing import sync
from ampipe.ops import reference
from ampipe.ops.loader import load_extension

QUICK = [(4096, 1024, 8, 2), (8192, 2048, 64, 1), (16384, 512, 32, 2)]
FULL = [
    (T, H, E, K)
    for T in (4096, 8192, 16384, 32768)
    for H in (512, 1024, 2048)
    for E in (8, 64)
    for K in (1, 2)
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Peak DRAM bandwidth (GB/s) from vendors' spec sheets, matched on the device name.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 SXM", 3350.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("V100", 900.0),
]


@dataclass
class Row:
    op: str
    T: int
    H: int
    E: int
    K: int
    dtype: str
    device: str
    compiled_ms: float
    reference_ms: float
    speedup: float
    bytes: int
    compiled_gbps: float
    pct_of_peak: float | None


def _time(fn, device: torch.device) -> float:
    """Seconds of one call (CUDA: events around it; CPU: wall clock)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _compare(fns: dict, device: torch.device, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict = {name: [] for name in fns}
    for _ in range(reps):  # interleaved, so drift hits both sides alike
        for name, fn in fns.items():
            samples[name].append(_time(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


def device_peak_gbps(device: torch.device) -> tuple[float | None, str]:
    """Peak DRAM bandwidth of a CUDA device: the spec sheet's, else a measured big copy."""
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps, f"spec sheet ({key})"
    return measured_copy_gbps(device), "measured device-to-device copy"


def measured_copy_gbps(device: torch.device) -> float:
    """Read+write GB/s of a plain copy: CUDA, 1 GiB device-to-device into a preallocated
    tensor; CPU, 128 MiB ``clone()`` (a fresh output, as the ops allocate theirs)."""
    if device.type == "cuda":
        src = torch.empty((1 << 30) // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = _compare({"copy": lambda: dst.copy_(src)}, device, reps=10, warmup=3)["copy"]
        return 2 * src.numel() * 4 / t / 1e9
    src = torch.ones((1 << 27) // 4, dtype=torch.float32)
    t = _compare({"clone": lambda: src.clone()}, device, reps=5, warmup=1)["clone"]
    return 2 * src.numel() * 4 / t / 1e9


def bench_size(T, H, E, K, dtype, device, reps, warmup, capacity_factor, peak) -> list[Row]:
    ops = torch.ops.ampipe
    gen = torch.Generator(device="cpu").manual_seed(T * 31 + H * 7 + E + K)
    indices = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(device)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    gates = torch.rand(T, K, generator=gen).to(device=device, dtype=dtype)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * T * K / E)
    row_map, tpe = ops.make_row_map(indices, E, capacity)
    R = T * K if capacity is None else E * capacity
    buffer = ops.permute(x, row_map, R)
    grad_out = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    kept = int(tpe.sum())
    es = x.element_size()
    idx_bytes = T * K * 8
    cases = {
        "make_row_map": (
            lambda: ops.make_row_map(indices, E, capacity),
            lambda: reference.make_row_map(indices, E, capacity),
            2 * idx_bytes,
        ),
        "permute": (
            lambda: ops.permute(x, row_map, R),
            lambda: reference.permute(x, row_map, R),
            (kept + R) * H * es + idx_bytes,
        ),
        "unpermute": (
            lambda: ops.unpermute(buffer, row_map, gates),
            lambda: reference.unpermute(buffer, row_map, gates),
            (kept + T) * H * es + idx_bytes + T * K * es,
        ),
        # The backward kernels, called directly (what autograd runs).
        "permute_bwd": (
            lambda: ops.unpermute(buffer, row_map, None),
            lambda: reference.unpermute(buffer, row_map, None),
            (kept + T) * H * es + idx_bytes,
        ),
        "unpermute_bwd": (
            lambda: ops.unpermute_backward(grad_out, buffer, row_map, gates),
            lambda: _reference_unpermute_backward(grad_out, buffer, row_map, gates),
            (2 * kept + R) * H * es + idx_bytes + 2 * T * K * es,
        ),
    }
    rows = []
    for op, (fc, fr, nbytes) in cases.items():
        med = _compare({"compiled": fc, "reference": fr}, device, reps, warmup)
        gbps = nbytes / med["compiled"] / 1e9
        rows.append(
            Row(
                op=op, T=T, H=H, E=E, K=K, dtype=str(dtype).removeprefix("torch."),
                device=device.type, compiled_ms=med["compiled"] * 1e3,
                reference_ms=med["reference"] * 1e3, speedup=med["reference"] / med["compiled"],
                bytes=nbytes, compiled_gbps=gbps,
                pct_of_peak=None if peak is None else 100 * gbps / peak,
            )
        )
    return rows


def _reference_unpermute_backward(grad_out, buffer, row_map, gates):
    b = buffer.detach().requires_grad_()
    g = gates.detach().requires_grad_()
    out = reference.unpermute(b, row_map, g)
    return torch.autograd.grad(out, (b, g), grad_out)


def parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    sizes = []
    for part in text.split(";"):
        fields = [int(v) for v in part.replace("x", ",").split(",") if v.strip()]
        if len(fields) != 4:
            raise argparse.ArgumentTypeError(f"--sizes wants T,H,E,K[;T,H,E,K...], got {part!r}")
        sizes.append(tuple(fields))
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--full", action="store_true", help="the full sweep: T 4k-32k, H 512-2048, E 8/64, K 1/2")
    ap.add_argument("--sizes", type=parse_sizes, help="explicit sizes 'T,H,E,K;...'")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--capacity-factor", type=float, default=None, help="capacity C = ceil(f*T*K/E); default dropless")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per op (default 7 CPU, 30 CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON to PATH (or stdout)")
    args = ap.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    ext = load_extension()
    if not ext.loaded or (device.type == "cuda" and not ext.cuda):
        print(f"ampipe.bench.kernels: no compiled kernels for {device.type} ({ext.reason or 'built without CUDA'}); "
              "build them with `python -m ampipe.ops.build`", file=sys.stderr)
        return 1
    sizes = args.sizes or (FULL if args.full else QUICK)
    reps = args.reps or (30 if device.type == "cuda" else 7)
    peak, peak_source = device_peak_gbps(device)
    copy_gbps = measured_copy_gbps(device)
    dtype = DTYPES[args.dtype]
    rows: list[Row] = []
    table = args.json != "-"
    if table:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"ampipe kernels vs pure-torch reference on {where}, {args.dtype}, "
              f"{'dropless' if args.capacity_factor is None else f'capacity factor {args.capacity_factor}'}, "
              f"median of {reps}")
        if peak is not None:
            print(f"peak bandwidth {peak:.0f} GB/s ({peak_source}); measured copy {copy_gbps:.0f} GB/s")
        else:
            print(f"for scale: clone() of 128 MiB (fresh output) moves {copy_gbps:.1f} GB/s here")
        print(f"{'op':<14}{'T':>7}{'H':>6}{'E':>4}{'K':>3}{'compiled ms':>13}{'reference ms':>14}"
              f"{'speed-up':>10}{'GB/s':>9}" + ("{:>9}".format("% peak") if peak else ""))
    for T, H, E, K in sizes:
        for row in bench_size(T, H, E, K, dtype, device, reps, args.warmup, args.capacity_factor, peak):
            rows.append(row)
            if table:
                print(f"{row.op:<14}{T:>7}{H:>6}{E:>4}{K:>3}{row.compiled_ms:>13.3f}{row.reference_ms:>14.3f}"
                      f"{row.speedup:>9.2f}x{row.compiled_gbps:>9.1f}"
                      + (f"{row.pct_of_peak:>8.1f}%" if peak else ""))
    movers = [r for r in rows if r.op != "make_row_map"]
    summary = {
        "geomean_speedup": math.exp(statistics.fmean(math.log(r.speedup) for r in rows)),
        "min_speedup_row_ops": min(r.speedup for r in movers),
        "cpu_goal_2x_met": all(r.speedup >= 2 for r in movers) if device.type == "cpu" else None,
        "median_pct_of_peak_row_ops": (statistics.median(r.pct_of_peak for r in movers) if peak else None),
        "gpu_goal_70pct_met": (all(r.pct_of_peak >= 70 for r in movers) if peak else None),
    }
    if table:
        print("summary: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if args.json:
        doc = {
            "benchmark": "ampipe.bench.kernels",
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "capacity_factor": args.capacity_factor,
            "reps": reps,
            "peak_gbps": peak,
            "peak_source": peak_source,
            "measured_copy_gbps": copy_gbps,
            "rows": [asdict(r) for r in rows],
            "summary": summary,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
