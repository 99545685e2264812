"""Emulated interconnect: one device standing in for an expert-parallel all-to-all.

A communication op does its real local data movement and then adds a modelled delay of
`latency + bytes / bandwidth` on its own stream: a sleep on the CPU communication thread,
a device-side spin (`torch.cuda._sleep`) on the CUDA communication stream, so the delay
overlaps compute exactly as a real transfer would. Every figure measured this way must be
labelled "emulated" (`EmulatedComm.label`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


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
        """Bytes a rank sends for a buffer of `tensor_bytes`: all but its own 1/world share."""
        return tensor_bytes * (self.world_size - 1) / self.world_size

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


def _calibrate_cuda_sleep(device: torch.device) -> float:
    """GPU clock cycles per second of `torch.cuda._sleep`, measured once per device (this
    synchronises, so it happens when the executor is built, never inside a block)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _CYCLES_CACHE:
        return _CYCLES_CACHE[idx]
    with torch.cuda.device(idx):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        torch.cuda._sleep(cycles // 10)  # warm-up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rate = cycles / (start.elapsed_time(end) * 1e-3)
    _CYCLES_CACHE[idx] = rate
    return rate
