"""Fake (meta) kernels and autograd of ``torch.ops.ampipe.*``; imported once, after the
library is loaded (see :mod:`ampipe.ops.loader`).

Backward formulas are themselves ampipe ops, so the compiled path stays compiled in the
backward too:

- ``permute``: ``grad_x = unpermute(grad_buffer, row_map)`` (sum over the token's slots);
- ``unpermute`` without gates: ``grad_buffer = permute(grad_out, row_map, R)``;
- ``unpermute`` with gates: the fused ``unpermute_backward`` gives both
  ``grad_buffer[row_map[t,k]] = gates[t,k] * grad_out[t]`` and
  ``grad_gates[t,k] = <grad_out[t], buffer[row_map[t,k]]>``.
"""

from __future__ import annotations

import torch

from .validate import check_make_row_map, check_permute, check_unpermute

_ops = torch.ops.ampipe


@torch.library.register_fake("ampipe::make_row_map")
def _make_row_map_fake(indices, num_experts, capacity=None):
    check_make_row_map(indices, num_experts, capacity)
    return (
        indices.new_empty(indices.shape, dtype=torch.int64),
        indices.new_empty((num_experts,), dtype=torch.int64),
    )


@torch.library.register_fake("ampipe::permute")
def _permute_fake(x, row_map, num_rows):
    check_permute(x, row_map, num_rows)
    return x.new_empty((num_rows, x.shape[1]))


@torch.library.register_fake("ampipe::unpermute")
def _unpermute_fake(buffer, row_map, gates=None):
    check_unpermute(buffer, row_map, gates)
    return buffer.new_empty((row_map.shape[0], buffer.shape[1]))


@torch.library.register_fake("ampipe::unpermute_backward")
def _unpermute_backward_fake(grad_out, buffer, row_map, gates):
    check_unpermute(buffer, row_map, gates)
    return buffer.new_empty(buffer.shape), gates.new_empty(gates.shape)


def _permute_setup(ctx, inputs, output):
    _, row_map, _ = inputs
    ctx.save_for_backward(row_map)


def _permute_backward(ctx, grad_buffer):
    (row_map,) = ctx.saved_tensors
    return _ops.unpermute(grad_buffer, row_map, None), None, None


torch.library.register_autograd(
    "ampipe::permute", _permute_backward, setup_context=_permute_setup
)


def _unpermute_setup(ctx, inputs, output):
    buffer, row_map, gates = inputs
    ctx.num_rows = buffer.shape[0]
    ctx.has_gates = gates is not None
    if gates is None:
        ctx.save_for_backward(row_map)
    else:
        ctx.save_for_backward(row_map, buffer, gates)


def _unpermute_backward(ctx, grad_out):
    if not ctx.has_gates:
        (row_map,) = ctx.saved_tensors
        return _ops.permute(grad_out, row_map, ctx.num_rows), None, None
    row_map, buffer, gates = ctx.saved_tensors
    grad_buffer, grad_gates = _ops.unpermute_backward(grad_out, buffer, row_map, gates)
    return (
        grad_buffer if ctx.needs_input_grad[0] else None,
        None,
        grad_gates if ctx.needs_input_grad[2] else None,
    )


torch.library.register_autograd(
    "ampipe::unpermute", _unpermute_backward, setup_context=_unpermute_setup
)
