"""The dispatcher behind :mod:`ampipe.ops`: compiled ``torch.ops.ampipe`` or the reference."""

from __future__ import annotations

import os

import torch

from . import reference
from .loader import load_extension

__all__ = [
    "make_row_map",
    "permute",
    "unpermute",
    "implementation",
    "extension_status",
    "set_sync_checks",
]


def _mode() -> str:
    mode = os.environ.get("AMPIPE_OPS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "reference", "compiled"):
        raise ValueError(f"AMPIPE_OPS must be auto, reference or compiled, got {mode!r}")
    return mode


@torch.compiler.assume_constant_result
def _compiled_for(device_type: str) -> bool:
    """Whether the compiled op serves tensors on ``device_type`` (else the reference does).

    Under torch.compile this runs once at trace time and its answer is baked into the
    graph, so the dispatch costs nothing there (and the loader's lock is never traced).
    """
    if _mode() == "reference":
        return False
    ext = load_extension(required=_mode() == "compiled")
    if not ext.loaded:
        return False
    return device_type == "cpu" or (device_type == "cuda" and ext.cuda)


def implementation(device: str | torch.device | None = None) -> str:
    """Which implementation serves ``device``: "cuda", "cpp" or "reference".

    Without a device: "cuda" when the extension is loaded with CUDA kernels, "cpp" when it
    is loaded with CPU kernels only, "reference" when it is not loaded (or is forced off).
    """
    if _mode() == "reference":
        return "reference"
    ext = load_extension(required=_mode() == "compiled")
    if not ext.loaded:
        return "reference"
    if device is None:
        return "cuda" if ext.cuda else "cpp"
    dev = torch.device(device)
    if dev.type == "cuda":
        return "cuda" if ext.cuda else "reference"
    return "cpp" if dev.type == "cpu" else "reference"


def extension_status() -> dict:
    """What the loader found: loaded or not, why not, the library path, CUDA kernels."""
    if _mode() == "reference":
        return {"mode": "reference", "loaded": False, "reason": "AMPIPE_OPS=reference"}
    ext = load_extension(required=False)
    return {"mode": _mode(), **ext.as_dict()}


def set_sync_checks(enabled: bool) -> bool:
    """Validate index values on the host in the CUDA kernels too (a synchronising debug mode).

    The CPU kernels and the reference always validate. On CUDA the kernels otherwise only
    assert on the device (never touching memory out of range); with checks on, a bad index
    raises the same IndexError as on CPU. Also set by ``AMPIPE_OPS_CHECK=1``. Returns the
    previous setting (False when the extension is not loaded).
    """
    if _mode() == "reference":
        return False
    if not load_extension().loaded:
        return False
    return bool(torch.ops.ampipe._set_sync_checks(bool(enabled)))


def make_row_map(
    indices: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer row of every (token, choice) slot and the kept rows per expert.

    See :func:`ampipe.ops.reference.make_row_map` for the exact layout.
    """
    if isinstance(indices, torch.Tensor) and _compiled_for(indices.device.type):
        return torch.ops.ampipe.make_row_map(indices, int(num_experts), capacity)
    return reference.make_row_map(indices, num_experts, capacity)


def permute(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Tokens ``x [T, H]`` into an expert-contiguous ``[num_rows, H]`` buffer (unused rows zero).

    ``num_rows`` is ``T*K`` dropless or ``E*C`` with capacity ``C``. Differentiable in ``x``.
    """
    if isinstance(x, torch.Tensor) and _compiled_for(x.device.type):
        return torch.ops.ampipe.permute(x, row_map, num_rows)
    return reference.permute(x, row_map, num_rows)


def unpermute(
    buffer: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_k gates[t,k] * buffer[row_map[t,k]]``; dropped slots add zero.

    Differentiable in ``buffer`` and ``gates``; ``gates`` must have ``buffer``'s dtype.
    """
    if isinstance(buffer, torch.Tensor) and _compiled_for(buffer.device.type):
        return torch.ops.ampipe.unpermute(buffer, row_map, gates)
    return reference.unpermute(buffer, row_map, gates)
