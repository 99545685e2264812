"""Compiled kernels (torch.ops.ampipe, CPU and CUDA) against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import (
    DEVICES,
    REFERENCE,
    forward_backward,
    naive_row_map,
    need_device_kernels,
    num_rows,
    random_indices,
)

try:  # hypothesis is a dev dependency; GPU boxes may lack it (the seeded test still runs)
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),  # dot products summed in another order
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def make_case(T, K, E, H, dtype, device, seed, distinct=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, K, generator=gen, dtype=torch.float64)
    weight = torch.randn(1, H, generator=gen, dtype=torch.float64)
    indices = random_indices(T, K, E, gen, distinct)
    to = dict(dtype=dtype, device=device)
    return (
        x.to(**to).requires_grad_(),
        indices.to(device),
        gates.to(**to).requires_grad_(),
        weight.to(**to),
    )


def assert_same(ext, device, T, K, E, H, cap, dtype, seed, distinct=True):
    x, indices, gates, weight = make_case(T, K, E, H, dtype, device, seed, distinct)
    got = forward_backward(ext, x, indices, gates, E, cap, weight, seed)
    want = forward_backward(REFERENCE, x, indices, gates, E, cap, weight, seed)
    assert torch.equal(got[0], want[0]), "row_map"
    assert torch.equal(got[1], want[1]), "tokens_per_expert"
    assert torch.equal(got[2], want[2]), "buffer (a row copy must be exact)"
    torch.testing.assert_close(got[3], want[3], **TOL[dtype])
    assert len(got[4]) == len(want[4])
    for name, g, w in zip(("x", "gates", "buffer"), got[4], want[4]):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_seeded_random_shapes_equal_reference(compiled, device, seed):
    need_device_kernels(compiled, device)
    g = torch.Generator().manual_seed(1000 + seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    T, K, E, H = draw(0, 300), draw(1, 4), draw(1, 64), draw(1, 70)
    cap = None if seed % 3 == 0 else draw(0, max(1, 2 * T * K // E))
    dtype = torch.float64 if seed % 2 else torch.float32
    assert_same(compiled, device, T, K, E, H, cap, dtype, seed, distinct=seed % 4 != 1)


if given is not None:

    @pytest.mark.parametrize("device", DEVICES)
    @settings(max_examples=25, deadline=None)
    @given(
        T=st.integers(0, 40),
        K=st.integers(1, 4),
        E=st.integers(1, 9),
        H=st.integers(1, 33),
        cap=st.one_of(st.none(), st.integers(0, 16)),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        distinct=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_random_shapes_equal_reference(compiled, device, T, K, E, H, cap, dtype, distinct, seed):
        need_device_kernels(compiled, device)
        assert_same(compiled, device, T, K, E, H, cap, dtype, seed, distinct)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H", [8, 13])  # vectorised and scalar row paths
def test_reduced_precision_equals_reference(compiled, device, dtype, H):
    need_device_kernels(compiled, device)
    assert_same(compiled, device, 50, 2, 6, H, None, dtype, seed=7)
    assert_same(compiled, device, 50, 2, 6, H, 12, dtype, seed=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("cap", [None, 0, 3, 100], ids=["dropless", "cap0", "overflow", "roomy"])
def test_k_and_capacity(compiled, device, k, cap):
    need_device_kernels(compiled, device)
    assert_same(compiled, device, 24, k, 5, 16, cap, torch.float64, seed=k)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_without_tokens_and_all_to_one(compiled, device):
    need_device_kernels(compiled, device)
    T, H, E = 20, 8, 4
    for indices in (
        torch.zeros(T, 1, dtype=torch.long),  # all tokens to expert 0
        torch.full((T, 1), 3, dtype=torch.long),  # all to the last expert
        torch.tensor([[0, 2]] * T),  # experts 1 and 3 receive nothing
    ):
        K = indices.shape[1]
        indices = indices.to(device)
        for cap in (None, 0, 5, T):
            row_map, tpe = compiled.make_row_map(indices, E, cap)
            want_rows, want_tpe = naive_row_map(indices.cpu(), E, cap)
            assert torch.equal(row_map.cpu(), want_rows)
            assert torch.equal(tpe.cpu(), want_tpe)
            x = torch.randn(T, H, dtype=torch.float64, device=device)
            gates = torch.rand(T, K, dtype=torch.float64, device=device)
            R = num_rows(T, K, E, cap)
            buffer = compiled.permute(x, row_map, R)
            assert torch.equal(buffer, REFERENCE.permute(x, row_map, R))
            out = compiled.unpermute(buffer, row_map, gates)
            torch.testing.assert_close(out, REFERENCE.unpermute(buffer, row_map, gates))


@pytest.mark.parametrize("device", DEVICES)
def test_capacity_zero_drops_everything(compiled, device):
    need_device_kernels(compiled, device)
    x, indices, gates, _ = make_case(10, 2, 3, 4, torch.float64, device, seed=0)
    row_map, tpe = compiled.make_row_map(indices, 3, 0)
    assert (row_map == -1).all() and (tpe == 0).all()
    buffer = compiled.permute(x, row_map, 0)
    assert buffer.shape == (0, 4)
    out = compiled.unpermute(buffer, row_map, gates)
    assert torch.equal(out, torch.zeros_like(out))
    gx, gg = torch.autograd.grad(out.sum(), (x, gates))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gg, torch.zeros_like(gg))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(compiled, device):
    need_device_kernels(compiled, device)
    T, K, E, H = 16, 2, 4, 6
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(H, T, generator=gen, dtype=torch.float64).to(device).t()  # column-major
    indices = random_indices(T, K, E, gen).to(device).t().contiguous().t()  # [T, K] strided
    gates = torch.rand(K, T, generator=gen, dtype=torch.float64).to(device).t()
    assert not (x.is_contiguous() or indices.is_contiguous() or gates.is_contiguous())
    for cap in (None, 5):
        row_map, tpe = compiled.make_row_map(indices, E, cap)
        want_rows, want_tpe = REFERENCE.make_row_map(indices, E, cap)
        assert torch.equal(row_map, want_rows) and torch.equal(tpe, want_tpe)
        row_map_nc = row_map.t().contiguous().t()
        R = num_rows(T, K, E, cap)
        buffer = compiled.permute(x, row_map_nc, R)
        assert torch.equal(buffer, REFERENCE.permute(x.contiguous(), row_map, R))
        wide = torch.randn(R, 2 * H, dtype=torch.float64, device=device)
        buf_nc = wide[:, ::2]  # strided rows
        torch.testing.assert_close(
            compiled.unpermute(buf_nc, row_map_nc, gates),
            REFERENCE.unpermute(buf_nc.contiguous(), row_map, gates.contiguous()),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices(compiled, device):
    need_device_kernels(compiled, device)
    indices = random_indices(30, 2, 5, torch.Generator().manual_seed(2)).to(device)
    for cap in (None, 4):
        got = compiled.make_row_map(indices.int(), 5, cap)
        want = REFERENCE.make_row_map(indices, 5, cap)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_larger_make_row_map_spans_many_tiles(compiled, device):
    # More slots than one CUDA tile (512) and more experts than a warp: the cross-tile scan.
    need_device_kernels(compiled, device)
    indices = random_indices(3000, 2, 40, torch.Generator().manual_seed(9)).to(device)
    for cap in (None, 100):
        got = compiled.make_row_map(indices, 40, cap)
        want = REFERENCE.make_row_map(indices, 40, cap)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [None, 3])
def test_gradcheck_float64(compiled, device, cap):
    need_device_kernels(compiled, device)
    T, K, E, H = 7, 2, 3, 4
    x, indices, gates, weight = make_case(T, K, E, H, torch.float64, device, seed=11)
    row_map, _ = compiled.make_row_map(indices, E, cap)
    R = num_rows(T, K, E, cap)
    buffer = torch.randn(R, H, dtype=torch.float64, device=device, requires_grad=True)

    def chain(x, gates):
        return compiled.unpermute(compiled.permute(x, row_map, R) * weight, row_map, gates)

    assert torch.autograd.gradcheck(chain, (x, gates))
    assert torch.autograd.gradcheck(lambda b, g: compiled.unpermute(b, row_map, g), (buffer, gates))
    assert torch.autograd.gradcheck(lambda b: compiled.unpermute(b, row_map, None), (buffer,))
    assert torch.autograd.gradcheck(lambda x: compiled.permute(x, row_map, R), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(compiled, device):
    need_device_kernels(compiled, device)
    ops = torch.ops.ampipe
    for cap in (None, 2):
        x, indices, gates, _ = make_case(9, 2, 4, 5, torch.float32, device, seed=4)
        row_map, _ = ops.make_row_map(indices, 4, cap)
        R = num_rows(9, 2, 4, cap)
        buffer = torch.randn(R, 5, device=device, requires_grad=True)
        torch.library.opcheck(ops.make_row_map, (indices, 4, cap))
        torch.library.opcheck(ops.permute, (x, row_map, R))
        torch.library.opcheck(ops.unpermute, (buffer, row_map, gates))
        torch.library.opcheck(ops.unpermute, (buffer, row_map, None))
        torch.library.opcheck(
            ops.unpermute_backward, (torch.randn(9, 5, device=device), buffer.detach(), row_map, gates.detach())
        )


def test_dispatcher_uses_the_compiled_ops_and_respects_ampipe_ops(compiled, monkeypatch):
    import ampipe.ops as ops

    assert ops.implementation() in ("cpp", "cuda")
    assert ops.implementation("cpu") == "cpp"
    monkeypatch.setenv("AMPIPE_OPS", "reference")
    assert ops.implementation() == "reference"
    assert ops.extension_status()["mode"] == "reference"
    monkeypatch.setenv("AMPIPE_OPS", "bogus")
    with pytest.raises(ValueError, match="AMPIPE_OPS"):
        ops.implementation()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [None, 300])
def test_many_rows_split_across_threads(compiled, device, cap):
    # Enough rows that at::parallel_for (CPU) and the grid-stride loops (CUDA) split the work.
    need_device_kernels(compiled, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        assert_same(compiled, device, 3000, 2, 16, 48, cap, torch.float32, seed=21)
    finally:
        torch.set_num_threads(threads)


def test_torch_compile_fullgraph_through_the_dispatcher(compiled):
    # Fake kernels + registered autograd + a trace-time dispatch: no graph break.
    import ampipe.ops as ops

    def route_and_combine(x, indices, gates):
        row_map, _ = ops.make_row_map(indices, 4, None)
        buffer = ops.permute(x, row_map, x.shape[0] * indices.shape[1])
        return ops.unpermute(buffer * 2, row_map, gates)

    torch._dynamo.reset()
    compiled_fn = torch.compile(route_and_combine, backend="aot_eager", fullgraph=True)
    x, indices, gates, _ = make_case(8, 2, 4, 5, torch.float64, "cpu", seed=3)
    y = compiled_fn(x, indices, gates)
    gx, gg = torch.autograd.grad(y.sum(), (x, gates))
    y_ref = route_and_combine(x, indices, gates)
    gx_ref, gg_ref = torch.autograd.grad(y_ref.sum(), (x, gates))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gg, gg_ref)
