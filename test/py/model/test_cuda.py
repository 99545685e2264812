"""GPU paths (skipped without CUDA): SDPA lower-right / FlashAttention chunks, the block on CUDA."""

import pytest
import torch

from ampipe.bench.block import bench_block, make_baseline_block
from ampipe.model import ModelConfig
from ampipe.model.attention import attention_chunk, flash_attn_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=64, micro_batch_size=2,
           num_experts=4, moe_ffn_hidden_size=32)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_chunks_equal_full_attention_on_cuda(backend, dtype, tol):
    if backend == "flash" and (dtype == torch.float32 or not flash_attn_available()):
        pytest.skip("FlashAttention >= 2.1 needs fp16/bf16 and an installed flash_attn")
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, h, grp, d = 64, 2, 8, 2, 64
    q = torch.randn(s, b, h, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(s, b, grp, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(s, b, grp, d, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    dout = torch.randn(s, b, h * d, device="cuda", dtype=dtype, generator=g)
    full = attention_chunk(q, k, v, backend=backend)
    gf = torch.autograd.grad(full, (q, k, v), dout)
    bounds = [0, 7, 8, 40, 64]
    chunked = torch.cat([attention_chunk(q[a:e], k[:e], v[:e], backend=backend) for a, e in zip(bounds, bounds[1:])])
    gc = torch.autograd.grad(chunked, (q, k, v), dout)
    torch.testing.assert_close(chunked, full, atol=tol, rtol=tol)
    for a, c in zip(gc, gf):
        torch.testing.assert_close(a, c, atol=tol, rtol=tol)


def test_block_on_cuda_matches_cpu_and_reports_peak_memory():
    cfg = ModelConfig(**CFG)
    cpu = make_baseline_block(cfg, seed=3)
    gpu = make_baseline_block(cfg, seed=3, device="cuda")
    x = torch.randn(64, 2, 64)
    y_cpu, l_cpu = cpu(x)
    y_gpu, l_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l_gpu.aux_loss.cpu(), l_cpu.aux_loss, atol=1e-6, rtol=1e-5)
    r = bench_block(cfg.replace(dtype="bf16"), device="cuda", warmup=1, iters=2)
    assert r.peak_memory_bytes is not None and r.peak_memory_bytes > 0
