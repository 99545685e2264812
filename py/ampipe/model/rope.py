"""Rotary position embeddings, Megatron-Core's convention (non-interleaved, `rotate_half`).

Angles are a function of absolute positions, so a sequence chunk starting at row `offset`
gets exactly the rows of the full-sequence table: `rope_cos_sin(..., offset=o, length=n)`
equals rows `[o, o+n)` of the table for the whole sequence.
"""

from __future__ import annotations

import torch

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(
    head_dim: int, base: float, offset: int, length: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``[length, 1, 1, head_dim]`` (fp32) for positions ``offset..offset+length-1``.

    Megatron-Core: ``inv_freq = base ** -(arange(0, d, 2) / d)``, ``emb = cat(freqs, freqs)``.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t [s, b, heads, d]`` in fp32 and return it in ``t``'s dtype."""
    tf = t.float()
    return (tf * cos + _rotate_half(tf) * sin).to(t.dtype)
