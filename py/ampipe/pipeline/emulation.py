"""Emulated interconnect: one device standing in for an expert-parallel all-to-all.

A communication op does its real local data movement and then adds a modelled delay of
`latency + bytes / bandwidth` on its own stream: on CPU on the executor's modelled comm stream
(the baseline block sleeps it on its one thread), on CUDA as a device-side spin
(`torch.cuda._sleep`) on the communication stream, so the delay overlaps compute exactly as a
real transfer would. Every figure measured this way must be
labelled "emulated" (`EmulatedComm.label`). `EmulatedBaseline` and `add_emulated_delays` put
the same delays on the baseline block, which runs on one stream.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import spans
from ..model.block_pieces import MoELosses, wire_dtype
from ..model.layers import TransformerLayer
from ..wire import a2a_rows, wire_bytes


@dataclass(frozen=True)
class EmulatedComm:
    """Modelled all-to-all: `latency_us` per op, `bandwidth_gbps` (GB/s, 1e9 bytes/s) per
    rank, among `world_size` emulated ranks (a rank keeps 1/world_size of its tokens)."""

    latency_us: float = 10.0
    bandwidth_gbps: float = 25.0
    world_size: int = 8

    def __post_init__(self) -> None:
        if self.latency_us < 0:
            raise ValueError(f"emulated_comm.latency_us must be >= 0, got {self.latency_us}")
        if self.bandwidth_gbps <= 0:
            raise ValueError(f"emulated_comm.bandwidth_gbps must be > 0, got {self.bandwidth_gbps}")
        if self.world_size < 1:
            raise ValueError(f"emulated_comm.world_size must be >= 1, got {self.world_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EmulatedComm":
        unknown = set(d) - {"latency_us", "bandwidth_gbps", "world_size"}
        if unknown:
            raise ValueError(f"emulated_comm: unknown field(s) {sorted(unknown)}")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in d.items()})

    @property
    def label(self) -> str:
        return (f"emulated {self.world_size}-way all-to-all "
                f"({self.latency_us:g} us + bytes / {self.bandwidth_gbps:g} GB/s)")

    def wire_bytes(self, tensor_bytes: int) -> float:
        """Bytes a rank sends for a buffer of `tensor_bytes` (`ampipe.wire`: all but its own
        1/world share)."""
        return wire_bytes(tensor_bytes, self.world_size)

    def delay_s(self, tensor_bytes: int) -> float:
        return self.latency_us * 1e-6 + self.wire_bytes(tensor_bytes) / (self.bandwidth_gbps * 1e9)


class DelayInjector:
    """Applies an `EmulatedComm` delay on the current stream (CPU thread or CUDA stream)."""

    def __init__(self, model: EmulatedComm, device: torch.device) -> None:
        self.model = model
        self.device = device
        self._cycles_per_s: float | None = None
        if device.type == "cuda":
            self._cycles_per_s = _calibrate_cuda_sleep(device)

    def __call__(self, tensor_bytes: int) -> float:
        seconds = self.model.delay_s(tensor_bytes)
        if seconds <= 0:
            return 0.0
        if self.device.type == "cuda":
            # Spins the current (communication) stream; the host does not wait.
            torch.cuda._sleep(max(1, int(seconds * self._cycles_per_s)))
        else:
            with spans.span("emulated delay", "delay", modelled_ms=seconds * 1e3, bytes=tensor_bytes):
                _sleep_precise(seconds)
        return seconds


def _sleep_precise(seconds: float) -> None:
    """time.sleep overshoots by ~50-100 us on Linux: sleep most of it, then yield-wait."""
    end = time.perf_counter() + seconds
    if seconds > 2e-4:
        time.sleep(seconds - 1.5e-4)
    while time.perf_counter() < end:
        time.sleep(0)


_CYCLES_CACHE: dict[int, float] = {}

# Calibration: `_sleep(n)` spins n SM clock cycles, so its rate is the SM clock, which an
# idle GPU keeps well below its boost clock (no clock reading was taken for this project;
# nothing here has run on a GPU yet). The rate is taken after a few tens of ms of matmuls
# (clocks ramped up, as during a step) as the median of several samples, the first dropped
# (it may still catch the ramp).
CALIBRATION_CYCLES = 5_000_000
CALIBRATION_SAMPLES = 6


def sleep_rate(cycles: int, elapsed_ms: list[float]) -> float:
    """Cycles per second from timed `_sleep(cycles)` samples: the median, without the first
    sample when there are several."""
    use = elapsed_ms[1:] if len(elapsed_ms) > 2 else elapsed_ms
    if not use or min(use) <= 0:
        raise ValueError(f"sleep calibration: unusable timings {elapsed_ms}")
    return cycles / (statistics.median(use) * 1e-3)


def _warm_up_clocks(device: torch.device) -> None:
    a = torch.randn(4096, 4096, device=device)
    for _ in range(15):  # ~10-50 ms of real work
        a = a @ a
        a = a / a.norm()
    torch.cuda.synchronize(device)


def _calibrate_cuda_sleep(device: torch.device) -> float:
    """GPU clock cycles per second of `torch.cuda._sleep`, measured once per device on a
    warmed-up GPU (this synchronises, so it happens before a block's ops, never inside)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _CYCLES_CACHE:
        return _CYCLES_CACHE[idx]
    with torch.cuda.device(idx):
        dev = torch.device("cuda", idx)
        _warm_up_clocks(dev)
        elapsed = []
        for _ in range(CALIBRATION_SAMPLES):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(CALIBRATION_CYCLES)
            end.record()
            end.synchronize()
            elapsed.append(start.elapsed_time(end))
        rate = sleep_rate(CALIBRATION_CYCLES, elapsed)
    _CYCLES_CACHE[idx] = rate
    return rate


def delay_report(ops: Iterable[Any], measured_ms: Mapping[str, float],
                 modelled_ms: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per comm kind, the measured time of its ops against the delay the model put on them:
    `{kind: {"ops", "measured_ms", "modelled_ms", "ratio"}}` (sums over the chunks). A comm
    op's measured time is its local data movement plus the injected delay, so with one
    rank (no data movement) the ratio should be ~1; far from it, the emulation is off (a
    wrong sleep calibration, the delay kernel queued behind compute)."""
    out: dict[str, dict[str, float]] = {}
    for op in ops:
        if op.id not in modelled_ms or op.id not in measured_ms:
            continue
        row = out.setdefault(op.kind, {"ops": 0, "measured_ms": 0.0, "modelled_ms": 0.0})
        row["ops"] += 1
        row["measured_ms"] += measured_ms[op.id]
        row["modelled_ms"] += modelled_ms[op.id]
    for row in out.values():
        row["ratio"] = row["measured_ms"] / row["modelled_ms"] if row["modelled_ms"] > 0 else float("nan")
    return out


class _DelayFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, inj, fwd_bytes, bwd_bytes):
        ctx.inj, ctx.bwd_bytes = inj, bwd_bytes
        for b in fwd_bytes:
            inj(b)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        for b in ctx.bwd_bytes:
            ctx.inj(b)
        return g, None, None, None


class EmulatedBaseline(torch.nn.Module):
    """The baseline block with the same emulated all-to-all delays as the pipelined block.

    The baseline runs on one stream, so its communication never overlaps compute: adding
    each all-to-all's modelled delay at the end of forward (and at the start of backward)
    costs the same wall-clock time as adding it where the all-to-all happens."""

    def __init__(self, layer: TransformerLayer, emulated_comm: EmulatedComm) -> None:
        super().__init__()
        self.layer = layer
        self.emulated_comm = emulated_comm
        self._inj: DelayInjector | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoELosses | None]:
        if self._inj is None or self._inj.device != x.device:
            self._inj = DelayInjector(self.emulated_comm, x.device)
        y, losses = self.layer(x)
        return _with_delays(self.layer, x, y, self._inj), losses


def _with_delays(layer: TransformerLayer, x: torch.Tensor, y: torch.Tensor, inj: DelayInjector) -> torch.Tensor:
    """`y`, after the modelled delays of the layer's two all-to-alls (and before their backward)."""
    cfg = layer.cfg
    size = torch.empty((), dtype=wire_dtype(x)).element_size()  # as the tokens travel
    rows = a2a_rows(x.shape[0] * x.shape[1], cfg.moe_router_topk, cfg.num_experts, cfg.moe_expert_capacity_factor)
    nbytes = rows * cfg.hidden_size * size
    return _DelayFn.apply(y, inj, [nbytes, nbytes], [nbytes, nbytes])


def add_emulated_delays(model: torch.nn.Module, emulated_comm: EmulatedComm) -> list[Any]:
    """`EmulatedBaseline`'s delays on every baseline MoE layer of `model`, by forward hooks, so
    the modules (and state_dict names) stay as they are. Returns the hook handles."""
    injectors: dict[torch.device, DelayInjector] = {}

    def hook(layer: TransformerLayer, args: tuple, out: tuple) -> tuple:
        x = args[0]
        inj = injectors.get(x.device)
        if inj is None:
            inj = injectors[x.device] = DelayInjector(emulated_comm, x.device)
        return (_with_delays(layer, x, out[0], inj), out[1])

    # prepend: the delays belong to the layer (they model its all-to-alls), so they come before
    # any other forward hook sees its output (a profile's layer timer, a user's hooks)
    return [m.register_forward_hook(hook, prepend=True) for m in model.modules()
            if type(m) is TransformerLayer and m.is_moe]
