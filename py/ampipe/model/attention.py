"""Causal attention of a query chunk over a key/value prefix (lower-right aligned).

`attention_chunk(q_c, k[:end_c], v[:end_c])` returns exactly the rows of full causal
attention that belong to the chunk: query row i of an `s_q`-row chunk sits at absolute
position `s_kv - s_q + i` and sees keys `0 .. s_kv - s_q + i`. With `s_q == s_kv` it is
ordinary causal attention. This is what makes AMPipe's chunking exact.

Layout is sequence-major, like the rest of the block: q ``[s_q, b, heads, d]``, k and v
``[s_kv, b, groups, d]`` (GQA: `groups` divides `heads`), output ``[s_q, b, heads * d]``.
A prefix ``k[:end]`` of a sequence-major tensor is contiguous, so chunks can slice a
shared K/V buffer without copies.

Backends: FlashAttention (>= 2.1, whose causal mask is lower-right aligned) when it is
installed, the tensors are on CUDA in fp16/bf16 and `backend` allows it; PyTorch SDPA
otherwise (lower-right `CausalBias` on CUDA, an explicit boolean mask elsewhere).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["attention_chunk", "flash_attn_available", "attention_backend"]


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    """flash_attn.flash_attn_func when FlashAttention >= 2.1 is importable, else None."""
    try:
        import flash_attn  # type: ignore
        from flash_attn import flash_attn_func  # type: ignore
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    try:
        major, minor = (int(p) for p in flash_attn.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return None
    # Before 2.1 the causal mask was top-left aligned, which is wrong for a chunk.
    return flash_attn_func if (major, minor) >= (2, 1) else None


def flash_attn_available() -> bool:
    return _flash_attn_func() is not None


def attention_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `attention_chunk` uses for these tensors: "flash" or "sdpa"."""
    if backend not in ("auto", "sdpa", "flash"):
        raise ValueError(f"attention backend must be auto, sdpa or flash; got {backend!r}")
    usable = (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and flash_attn_available()
    )
    if backend == "flash" and not usable:
        raise RuntimeError(
            "attention backend 'flash' needs FlashAttention >= 2.1 installed and CUDA fp16/bf16 "
            f"tensors with head dim <= 256; got device={q.device}, dtype={q.dtype}, head dim={q.shape[-1]}, "
            f"flash_attn available={flash_attn_available()}"
        )
    return "flash" if usable and backend != "sdpa" else "sdpa"


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention_chunk: q, k, v must be [s, b, heads, d]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attention_chunk: k {list(k.shape)} and v {list(v.shape)} differ")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_chunk: q {list(q.shape)} and k {list(k.shape)} differ in batch or head dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"attention_chunk: {k.shape[2]} key/value groups do not divide {q.shape[2]} query heads")
    if q.shape[0] > k.shape[0]:
        raise ValueError(
            f"attention_chunk: the query chunk ({q.shape[0]} rows) is longer than the key/value prefix ({k.shape[0]} rows)"
        )


@functools.lru_cache(maxsize=64)
def _lower_right_mask(s_q: int, s_kv: int, device: torch.device) -> torch.Tensor:
    # True = may attend. Query i (absolute position s_kv - s_q + i) sees keys <= that position.
    return torch.ones(s_q, s_kv, dtype=torch.bool, device=device).tril(diagonal=s_kv - s_q)


def attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Lower-right-aligned causal attention of ``q [s_q,b,h,d]`` over ``k, v [s_kv,b,g,d]`` → ``[s_q,b,h*d]``."""
    _check_shapes(q, k, v)
    s_q, b, heads, d = q.shape
    s_kv, groups = k.shape[0], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)

    if attention_backend(q, backend) == "flash":
        # flash_attn wants [b, s, heads, d] with a contiguous last dim; a transposed view is fine.
        out = _flash_attn_func()(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            dropout_p=dropout_p, softmax_scale=scale, causal=True,
        )  # [b, s_q, heads, d]
        return out.transpose(0, 1).reshape(s_q, b, heads * d)

    qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d] views
    gqa = groups != heads
    if s_q == s_kv:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa
        )
    elif q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        if gqa:  # the fused lower-right kernels take equal head counts
            kb = kb.repeat_interleave(heads // groups, dim=1)
            vb = vb.repeat_interleave(heads // groups, dim=1)
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=causal_lower_right(s_q, s_kv), dropout_p=dropout_p, scale=scale
        )
    else:
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=_lower_right_mask(s_q, s_kv, q.device),
            dropout_p=dropout_p, scale=scale, enable_gqa=gqa,
        )
    return out.permute(2, 0, 1, 3).reshape(s_q, b, heads * d)
