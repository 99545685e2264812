"""Block benchmark: forward+backward time per block and peak memory, for a config.

    python -m ampipe.bench.block --config configs/default.yaml --iters 20
    python -m ampipe.bench.block --set hidden_size=256 --set seq_length=1024 --ep 2 --json out.json

A step is: forward of one block on ``x [s, b, H]``, ``(y * dy).sum() + aux + z`` losses,
backward to the input and every parameter. Several blocks (baseline, pipelined, ...) are
timed side by side in one process with their repetitions interleaved, and medians quoted
(`bench_blocks`), which is what later benchmarks reuse: pass any callable
``block(x) -> (y, MoELosses | None)``.

Memory: on CUDA, the peak of `torch.cuda.max_memory_allocated` during a step minus what was
allocated before it. On every device, the bytes of tensors autograd saved for backward
(activation memory, deduplicated by storage). On CPU also the process's peak RSS, which
includes everything the process ever held (a coarse upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..model.block_pieces import MoELosses
from ..model.config import ModelConfig
from ..model.gpt import autocast_context, init_parameters
from ..model.layers import TransformerLayer
from ..parallel.groups import ExpertParallel, ParallelGroups, init_parallel_groups
from ..process_exit import exit_rank
from .timing import quantile, sync

__all__ = ["BlockBenchResult", "make_baseline_block", "block_inputs", "bench_blocks", "bench_block", "main"]

BlockFn = Callable[[torch.Tensor], "tuple[torch.Tensor, MoELosses | None]"]


@dataclass
class BlockBenchResult:
    label: str
    device: str
    dtype: str
    ep_size: int
    iters: int
    fwd_bwd_ms_median: float
    fwd_bwd_ms_p10: float
    fwd_bwd_ms_p90: float
    fwd_ms_median: float
    tokens_per_s: float
    saved_activation_bytes: int
    peak_memory_bytes: int | None  # CUDA: peak allocated during a step above what was live before
    rss_peak_bytes: int | None  # CPU: process peak RSS
    samples_ms: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mem = (
            f"peak {self.peak_memory_bytes / 2**20:.1f} MiB" if self.peak_memory_bytes is not None
            else f"rss peak {self.rss_peak_bytes / 2**20:.0f} MiB" if self.rss_peak_bytes is not None else ""
        )
        return (
            f"{self.label}: fwd+bwd {self.fwd_bwd_ms_median:.2f} ms median "
            f"(p10 {self.fwd_bwd_ms_p10:.2f}, p90 {self.fwd_bwd_ms_p90:.2f}; fwd {self.fwd_ms_median:.2f}) "
            f"over {self.iters} iters, {self.tokens_per_s:,.0f} tokens/s, "
            f"saved activations {self.saved_activation_bytes / 2**20:.1f} MiB, {mem} "
            f"[{self.device}, {self.dtype}, EP={self.ep_size}]"
        )


def make_baseline_block(
    cfg: ModelConfig,
    *,
    ep: ExpertParallel | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    layer_number: int = 0,
) -> TransformerLayer:
    """One baseline `TransformerLayer` (an MoE layer for layer 0), initialised like the GPT's."""
    layer = TransformerLayer(cfg, layer_number, ep)
    init_parameters(layer, cfg, seed, prefix=f"decoder.layers.{layer_number}.")
    return layer.to(device)


def block_inputs(cfg: ModelConfig, device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (requires grad) and ``dy``, both ``[s, b, H]`` fp32, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.seq_length, cfg.micro_batch_size, cfg.hidden_size)
    x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    dy = (torch.randn(shape, generator=g) * cfg.hidden_size ** -0.5).to(device)
    return x, dy


def _saved_bytes(block: BlockFn, x: torch.Tensor, cfg: ModelConfig) -> int:
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device.index or 0)] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(cfg, x.device):
        y, losses = block(x)
    del y, losses
    return sum(seen.values())


def _step(block: BlockFn, x: torch.Tensor, dy: torch.Tensor, cfg: ModelConfig, params: list[torch.Tensor]) -> tuple[float, float]:
    device = x.device
    x.grad = None
    for p in params:
        p.grad = None
    sync(device)
    t0 = time.perf_counter()
    with autocast_context(cfg, device):
        y, losses = block(x)
        obj = (y.float() * dy).sum()
        if losses is not None:
            obj = obj + losses.total
    sync(device)
    t1 = time.perf_counter()
    obj.backward()
    sync(device)
    t2 = time.perf_counter()
    return (t2 - t0) * 1e3, (t1 - t0) * 1e3


def bench_blocks(
    blocks: Mapping[str, BlockFn],
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    iters: int = 10,
    seed: int = 0,
    ep_size: int = 1,
    params: Mapping[str, list[torch.Tensor]] | None = None,
) -> dict[str, BlockBenchResult]:
    """Time several blocks on the same input, repetitions interleaved (A B A B ...), medians quoted.

    ``blocks`` maps a label to ``block(x) -> (y, MoELosses | None)``; an `nn.Module` works as is.
    ``params`` (label → parameters) lets non-module blocks have their grads reset each step.
    """
    device = torch.device(device)
    x, dy = block_inputs(cfg, device, seed)
    plist = {
        k: list(params[k]) if params and k in params else list(b.parameters()) if isinstance(b, torch.nn.Module) else []
        for k, b in blocks.items()
    }
    for _ in range(warmup):
        for k, b in blocks.items():
            _step(b, x, dy, cfg, plist[k])
    total: dict[str, list[float]] = {k: [] for k in blocks}
    fwd: dict[str, list[float]] = {k: [] for k in blocks}
    for _ in range(iters):
        for k, b in blocks.items():
            t, f = _step(b, x, dy, cfg, plist[k])
            total[k].append(t)
            fwd[k].append(f)
    out = {}
    tokens = cfg.seq_length * cfg.micro_batch_size
    for k, b in blocks.items():
        peak = None
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _step(b, x, dy, cfg, plist[k])
            peak = torch.cuda.max_memory_allocated(device) - before
        med = statistics.median(total[k])
        out[k] = BlockBenchResult(
            label=k, device=str(device), dtype=cfg.dtype, ep_size=ep_size, iters=iters,
            fwd_bwd_ms_median=med, fwd_bwd_ms_p10=quantile(total[k], 0.1), fwd_bwd_ms_p90=quantile(total[k], 0.9),
            fwd_ms_median=statistics.median(fwd[k]), tokens_per_s=tokens / (med / 1e3),
            saved_activation_bytes=_saved_bytes(b, x, cfg),
            peak_memory_bytes=peak,
            rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu" else None,
            samples_ms=total[k], config=cfg.to_dict(),
        )
    return out


def bench_block(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    ep: ExpertParallel | None = None,
    warmup: int = 2,
    iters: int = 10,
    seed: int = 0,
) -> BlockBenchResult:
    """The baseline block alone (see `bench_blocks` to compare it with others)."""
    ep = ep if ep is not None else ExpertParallel.single()
    block = make_baseline_block(cfg, ep=ep, device=device, seed=seed)
    return bench_blocks({"baseline": block}, cfg, device=device, warmup=warmup, iters=iters, seed=seed,
                        ep_size=ep.size)["baseline"]


# ------------------------------------------------------------------------------------------ CLI


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def load_model_config(path: str | None, sets: list[str]) -> ModelConfig:
    """The `model` section of a YAML/JSON experiment config (or defaults), with ``field=value`` overrides."""
    d: dict[str, Any] = {}
    if path:
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        d = dict(d.get("model", d))
    for s in sets:
        if "=" not in s:
            raise SystemExit(f"--set expects field=value, got {s!r}")
        k, v = s.split("=", 1)
        d[k.strip().removeprefix("model.")] = _parse_value(v.strip())
    return ModelConfig.from_dict(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_rank(rank: int, world: int, port: int, device: str, threads: int) -> torch.device:
    """A benchmark's spawned rank: its torch threads, its device (CUDA: one GPU per rank) and the
    process group on loopback (NCCL on CUDA, else gloo). Returns the device."""
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    import torch.distributed as dist

    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return dev


def _rank_main(rank: int, world: int, port: int, cfg: ModelConfig, args: dict, queue) -> None:
    import torch.distributed as dist

    device = _init_rank(rank, world, port, args["device"], args["threads"])
    try:
        groups = init_parallel_groups(world)
        r = bench_block(cfg, device=device, ep=groups.ep, warmup=args["warmup"], iters=args["iters"], seed=args["seed"])
        queue.put((rank, r.to_dict()))  # a SimpleQueue: written before put returns
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # see ampipe.process_exit


def _run_ep(cfg: ModelConfig, args: argparse.Namespace) -> BlockBenchResult:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    a = {"device": args.device, "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "threads": args.threads}
    mp.spawn(_rank_main, args=(args.ep, port, cfg, a, queue), nprocs=args.ep, join=True)
    results = dict(queue.get() for _ in range(args.ep))
    # A step is as slow as its slowest rank (the all-to-all waits for it): report per-iteration maxima.
    per_iter = [max(results[r]["samples_ms"][i] for r in results) for i in range(args.iters)]
    r0 = results[0]
    r0.update(
        samples_ms=per_iter, fwd_bwd_ms_median=statistics.median(per_iter),
        fwd_bwd_ms_p10=quantile(per_iter, 0.1), fwd_bwd_ms_p90=quantile(per_iter, 0.9),
        tokens_per_s=cfg.seq_length * cfg.micro_batch_size / (statistics.median(per_iter) / 1e3),
        label=f"baseline (max over {args.ep} ranks)",
    )
    return BlockBenchResult(**r0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ampipe.bench.block",
        description="Forward+backward time and memory of one baseline GPT-MoE block.",
    )
    ap.add_argument("--config", help="YAML/JSON experiment config (its model section is used)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a model field, e.g. --set seq_length=1024 (repeatable)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel ranks to spawn (gloo on cpu, nccl on cuda)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads per rank")
    ap.add_argument("--json", metavar="FILE", help="write the result as JSON")
    args = ap.parse_args(argv)
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # as a rank does (docs/pipeline.md); AMPIPE_MALLOC=default to compare
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.iters < 1 or args.warmup < 0 or args.ep < 1:
        ap.error("--iters must be >= 1, --warmup >= 0, --ep >= 1")
    cfg = load_model_config(args.config, args.set)
    cfg.check_parallel(args.ep)
    if args.ep > 1:
        if args.device == "cpu":
            args.threads = max(1, args.threads // args.ep)
        result = _run_ep(cfg, args)
    else:
        torch.set_num_threads(args.threads)
        result = bench_block(cfg, device=args.device, warmup=args.warmup, iters=args.iters, seed=args.seed)
    print(result.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
