"""Metadata checks shared by the reference and the dispatcher (shapes, dtypes, devices).

The compiled ops repeat the same checks in C++ (TORCH_CHECK_*) with the same wording and
the same exception types: ValueError for shapes and sizes, TypeError for dtypes, and
IndexError for index values (those are checked by the implementations, on the data).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_make_row_map(indices: torch.Tensor, num_experts: int, capacity: int | None) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(
            f"ampipe.make_row_map: indices must be a 2-D [T, K] tensor, got "
            f"{_shape(indices) if isinstance(indices, torch.Tensor) else type(indices).__name__}"
        )
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"ampipe.make_row_map: indices must be int64 or int32, got {indices.dtype}")
    if int(num_experts) < 1:
        raise ValueError(f"ampipe.make_row_map: num_experts must be >= 1, got {num_experts}")
    if capacity is not None and int(capacity) < 0:
        raise ValueError(f"ampipe.make_row_map: capacity must be >= 0 or None, got {capacity}")


def _check_row_map(op: str, row_map: torch.Tensor, device: torch.device) -> None:
    if row_map.dim() != 2:
        raise ValueError(f"ampipe.{op}: row_map must be a 2-D [T, K] tensor, got {_shape(row_map)}")
    if row_map.dtype != torch.int64:
        raise TypeError(f"ampipe.{op}: row_map must be int64, got {row_map.dtype}")
    if row_map.device != device:
        raise ValueError(f"ampipe.{op}: row_map is on {row_map.device} but the data is on {device}")


def check_permute(x: torch.Tensor, row_map: torch.Tensor, num_rows: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"ampipe.permute: x must be a 2-D [T, H] tensor, got {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"ampipe.permute: x must be float32/float64/float16/bfloat16, got {x.dtype}")
    _check_row_map("permute", row_map, x.device)
    if row_map.shape[0] != x.shape[0]:
        raise ValueError(
            f"ampipe.permute: row_map has {row_map.shape[0]} rows but x has {x.shape[0]} tokens"
        )
    if int(num_rows) < 0:
        raise ValueError(f"ampipe.permute: num_rows must be >= 0, got {num_rows}")


def check_unpermute(
    buffer: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None
) -> None:
    if buffer.dim() != 2:
        raise ValueError(f"ampipe.unpermute: buffer must be a 2-D [R, H] tensor, got {_shape(buffer)}")
    if buffer.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"ampipe.unpermute: buffer must be float32/float64/float16/bfloat16, got {buffer.dtype}"
        )
    _check_row_map("unpermute", row_map, buffer.device)
    if gates is not None:
        if gates.shape != row_map.shape:
            raise ValueError(
                f"ampipe.unpermute: gates has shape {_shape(gates)} but row_map has {_shape(row_map)}"
            )
        if gates.dtype != buffer.dtype:
            raise TypeError(
                f"ampipe.unpermute: gates dtype {gates.dtype} must match buffer dtype {buffer.dtype} "
                "(cast the gates with .to(buffer.dtype))"
            )
        if gates.device != buffer.device:
            raise ValueError(
                f"ampipe.unpermute: gates is on {gates.device} but buffer is on {buffer.device}"
            )
