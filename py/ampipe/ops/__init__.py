"""Expert dispatch/combine ops: ``make_row_map``, ``permute``, ``unpermute``.

One API, two implementations (docs/contracts.md section 3, docs/kernels.md):

- the compiled extension (``torch.ops.ampipe.*``, C++ on CPU and CUDA on GPU), built by
  ``python -m ampipe.ops.build`` into ``build/ext/`` and loaded here when it is present and
  matches the sources and the installed torch;
- the pure-torch reference (:mod:`ampipe.ops.reference`) otherwise, with one warning that
  says how to build.

Importing this module never compiles anything. ``AMPIPE_OPS=reference`` forces the
reference (the tests use it to compare); ``AMPIPE_OPS=compiled`` makes a missing or stale
extension an error instead of a warning.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use, so `python -m ampipe.ops.build` stays light
    import torch

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


def _compiled_for(device: torch.device) -> bool:
    """Whether the compiled op serves tensors on ``device`` (else the reference does)."""
    if _mode() == "reference":
        return False
    from .loader import load_extension

    ext = load_extension(required=_mode() == "compiled")
    if not ext.loaded:
        return False
    return device.type == "cpu" or (device.type == "cuda" and ext.cuda)


def implementation(device: str | torch.device | None = None) -> str:
    """Which implementation serves ``device``: "cuda", "cpp" or "reference".

    Without a device: "cuda" when the extension is loaded with CUDA kernels, "cpp" when it
    is loaded with CPU kernels only, "reference" when it is not loaded (or is forced off).
    """
    import torch

    from .loader import load_extension

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
    from .loader import load_extension

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
    from .loader import load_extension

    if not load_extension().loaded:
        return False
    import torch

    return bool(torch.ops.ampipe._set_sync_checks(bool(enabled)))


def make_row_map(
    indices: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer row of every (token, choice) slot and the kept rows per expert.

    See :func:`ampipe.ops.reference.make_row_map` for the exact layout.
    """
    import torch

    from . import reference

    if isinstance(indices, torch.Tensor) and _compiled_for(indices.device):
        return torch.ops.ampipe.make_row_map(indices, int(num_experts), capacity)
    return reference.make_row_map(indices, num_experts, capacity)


def permute(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Tokens ``x [T, H]`` into an expert-contiguous ``[num_rows, H]`` buffer (unused rows zero).

    ``num_rows`` is ``T*K`` dropless or ``E*C`` with capacity ``C``. Differentiable in ``x``.
    """
    import torch

    from . import reference

    if isinstance(x, torch.Tensor) and _compiled_for(x.device):
        return torch.ops.ampipe.permute(x, row_map, num_rows)
    return reference.permute(x, row_map, num_rows)


def unpermute(
    buffer: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_k gates[t,k] * buffer[row_map[t,k]]``; dropped slots add zero.

    Differentiable in ``buffer`` and ``gates``; ``gates`` must have ``buffer``'s dtype.
    """
    import torch

    from . import reference

    if isinstance(buffer, torch.Tensor) and _compiled_for(buffer.device):
        return torch.ops.ampipe.unpermute(buffer, row_map, gates)
    return reference.unpermute(buffer, row_map, gates)
