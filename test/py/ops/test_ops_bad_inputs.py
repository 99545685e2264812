"""Bad inputs raise clear errors, from the compiled ops and the reference alike.

Types: ValueError (shapes, sizes, devices), TypeError (dtypes), IndexError (index values).
On CUDA, index values are checked on the host only with sync checks on (set here).
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEVICES, REFERENCE, need_device_kernels

import ampipe.ops as ops


@pytest.fixture(params=["compiled", "reference"])
def impl(request, compiled):
    return compiled if request.param == "compiled" else REFERENCE


@pytest.fixture
def sync_checks(compiled):
    previous = ops.set_sync_checks(True)
    yield
    ops.set_sync_checks(previous)


def inputs(device, T=6, K=2, E=3, H=4):
    indices = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]], device=device)
    row_map, _ = REFERENCE.make_row_map(indices, E)
    x = torch.randn(T, H, device=device)
    gates = torch.rand(T, K, device=device)
    buffer = torch.randn(T * K, H, device=device)
    return indices, row_map, x, gates, buffer


@pytest.mark.parametrize("device", DEVICES)
def test_index_out_of_range(impl, device, sync_checks, compiled):
    need_device_kernels(compiled, device)
    if impl is REFERENCE and device == "cuda":
        pytest.skip("the reference asserts on the device instead (no synchronize)")
    indices, row_map, x, gates, buffer = inputs(device)
    bad = indices.clone()
    bad[4, 1] = 3
    with pytest.raises(IndexError, match=r"indices\[4, 1\] = 3 is out of range"):
        impl.make_row_map(bad, 3)
    neg = indices.clone()
    neg[0, 0] = -1
    with pytest.raises(IndexError, match="out of range"):
        impl.make_row_map(neg, 3)
    bad_rows = row_map.clone()
    bad_rows[2, 0] = 12  # == num_rows
    with pytest.raises(IndexError, match="out of range"):
        impl.permute(x, bad_rows, 12)
    with pytest.raises(IndexError, match="out of range"):
        impl.unpermute(buffer, bad_rows, gates)
    bad_rows[2, 0] = -2
    with pytest.raises(IndexError, match="out of range"):
        impl.permute(x, bad_rows, 12)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_slot_and_reject_shared_rows(impl, compiled, device, sync_checks):
    need_device_kernels(compiled, device)
    if impl is REFERENCE and device == "cuda":
        pytest.skip("the reference asserts on the device instead (no synchronize)")
    indices, row_map, x, gates, buffer = inputs(device)
    bad = indices.clone()
    bad[4, 1] = 7
    with pytest.raises(IndexError, match=r"indices\[4, 1\] = 7 is out of range \[0, num_experts=3\)"):
        impl.make_row_map(bad, 3)
    dup = row_map.clone()
    dup[5, 1] = dup[0, 0]
    with pytest.raises(IndexError, match=r"row_map\[5, 1\] and row_map\[0, 0\] both map to row"):
        impl.permute(x, dup, 12)
    with pytest.raises(IndexError, match="both map to row"):
        impl.unpermute(buffer, dup, gates)
    with pytest.raises(IndexError, match="both map to row"):
        torch.ops.ampipe.unpermute_backward(torch.randn_like(x), buffer, dup, gates)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_dtypes(impl, device, compiled):
    need_device_kernels(compiled, device)
    indices, row_map, x, gates, buffer = inputs(device)
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        impl.make_row_map(indices.float(), 3)
    with pytest.raises(TypeError, match="row_map must be int64"):
        impl.permute(x, row_map.int(), 12)
    with pytest.raises(TypeError, match="x must be float32/float64/float16/bfloat16"):
        impl.permute(x.long(), row_map, 12)
    with pytest.raises(TypeError, match="buffer must be float"):
        impl.unpermute(buffer.int(), row_map, None)
    with pytest.raises(TypeError, match="gates dtype torch.float64 must match buffer dtype torch.float32|"
                       "gates dtype Double must match buffer dtype Float"):
        impl.unpermute(buffer, row_map, gates.double())


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_shapes(impl, device, compiled):
    need_device_kernels(compiled, device)
    indices, row_map, x, gates, buffer = inputs(device)
    with pytest.raises(ValueError, match=r"indices must be a 2-D \[T, K\] tensor"):
        impl.make_row_map(indices.flatten(), 3)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        impl.make_row_map(indices, 0)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        impl.make_row_map(indices, 3, -1)
    with pytest.raises(ValueError, match="row_map has 6 rows but x has 5 tokens"):
        impl.permute(x[:5], row_map, 12)
    with pytest.raises(ValueError, match=r"x must be a 2-D \[T, H\] tensor"):
        impl.permute(x.flatten(), row_map, 12)
    with pytest.raises(ValueError, match="num_rows must be >= 0"):
        impl.permute(x, row_map, -1)
    with pytest.raises(ValueError, match="gates has shape"):
        impl.unpermute(buffer, row_map, gates[:, :1])
    with pytest.raises(ValueError, match=r"row_map must be a 2-D \[T, K\] tensor"):
        impl.unpermute(buffer, row_map.flatten(), None)


def test_mismatched_devices(impl):
    # A meta tensor stands in for "another device" on a CPU-only machine.
    indices, row_map, x, gates, buffer = inputs("cpu")
    with pytest.raises(ValueError, match="row_map is on meta but the data is on cpu"):
        impl.permute(x, row_map.to("meta"), 12)
    with pytest.raises(ValueError, match="is on"):
        impl.unpermute(buffer, row_map, gates.to("meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_row_map_with_cuda_data_is_rejected(compiled):
    need_device_kernels(compiled, "cuda")
    indices, row_map, x, gates, buffer = inputs("cuda")
    with pytest.raises(ValueError, match="row_map is on cpu but the data is on cuda"):
        compiled.permute(x, row_map.cpu(), 12)
    with pytest.raises(ValueError, match="is on"):
        compiled.unpermute(buffer, row_map, gates.cpu())
