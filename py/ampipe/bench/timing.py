"""What every benchmark times with: a device barrier around host timers, and quantiles."""

from __future__ import annotations

import torch


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); CPU work is already done when a call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(xs: list[float], q: float) -> float:
    """The sample at rank round(q·(n−1)) of the sorted samples (nearest rank, no interpolation)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
