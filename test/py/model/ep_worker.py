"""One rank of the expert-parallel equivalence check (started by test_expert_parallel.py).

Every rank builds the EP=1 reference model from the same seed, computes what each rank's
batch gives there (outputs, losses, gradients), then runs the expert-parallel model on its
own batch and checks: outputs and losses equal the reference for its batch; after
`sync_gradients`, dense gradients equal the mean over all ranks' batches and expert gradients
the matching slice of it; the EP model's weights are the shard of the global ones, and
gathering them gives the global state dict back. Exits non-zero with the failing check.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from ampipe.model import ModelConfig
from ampipe.model.checkpoint import gather_experts, shard_experts
from ampipe.model.gpt import GPTModel
from ampipe.parallel import init_parallel_groups, sync_gradients
from rank_procs import gloo_rank

BASE = dict(num_layers=2, hidden_size=16, num_attention_heads=4, seq_length=8, micro_batch_size=2,
            vocab_size=32, ffn_hidden_size=24, num_experts=4, moe_ffn_hidden_size=12)

CONFIGS = {
    "dropless-swiglu-gqa-rope": dict(num_query_groups=2, moe_router_topk=2),
    "capacity-drops-gelu-rmsnorm-bias": dict(
        moe_expert_capacity_factor=0.5, moe_expert_activation="gelu", normalization="RMSNorm",
        add_bias_linear=True, moe_router_score_order="topk_then_softmax", moe_layer_freq=2,
        position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=True,
        moe_router_topk=1),
}


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    try:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    except AssertionError as e:
        raise AssertionError(f"rank {dist.get_rank()}: {what}: {e}") from None


def batch(r: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + r)
    ids = torch.randint(0, cfg.vocab_size, (cfg.micro_batch_size, cfg.seq_length), generator=g)
    return ids, torch.randint(0, cfg.vocab_size, ids.shape, generator=g)


def check(name: str, cfg: ModelConfig, ep_size: int) -> str:
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = init_parallel_groups(ep_size)
    ref = GPTModel(cfg, seed=7).double()
    params = dict(ref.named_parameters())
    ref_out, mean_grad = [], {k: torch.zeros_like(p) for k, p in params.items()}
    for r in range(world):
        out = ref(*batch(r, cfg))
        for k, g in zip(params, torch.autograd.grad(out.loss, list(params.values()))):
            mean_grad[k] += g / world
        ref_out.append(out)

    model = GPTModel(cfg, ep=groups.ep, seed=7).double()
    shard = shard_experts(ref.state_dict(), cfg, groups.ep.rank, ep_size)
    for k, v in model.state_dict().items():
        close(v, shard[k], f"{name} EP={ep_size}: initial weight {k}")
    out = model(*batch(rank, cfg))
    mine = ref_out[rank]
    close(out.logits, mine.logits, f"{name} EP={ep_size}: logits")
    for what in ("lm_loss", "aux_loss", "z_loss"):
        close(getattr(out, what), getattr(mine, what), f"{name} EP={ep_size}: {what}")
    out.loss.backward()
    sync_gradients(model, groups)
    want = shard_experts(mean_grad, cfg, groups.ep.rank, ep_size)
    for k, p in model.named_parameters():
        close(p.grad, want[k], f"{name} EP={ep_size}: grad of {k}")
    gathered = gather_experts(model.state_dict(), cfg, groups.ep)
    for k, v in ref.state_dict().items():
        close(gathered[k], v, f"{name} EP={ep_size}: gathered {k}")
    dropped = name.startswith("capacity")
    return f"{name} EP={ep_size} DP={world} ok (lm_loss {out.lm_loss.item():.6f}{', drops' if dropped else ''})"


def check_dispatch(ep_size: int) -> str:
    """Dropless dispatch/combine with uneven and empty splits: the rows arrive expert-major, in
    source-rank order, and combine(dispatch(x)) is x, in value and in gradient."""
    from ampipe.parallel import combine, dispatch, dispatch_layout

    groups = init_parallel_groups(ep_size)
    ep, E = groups.ep, 2 * ep_size
    El = E // ep_size
    count = lambda src, e: (src + 2 * e) % 3  # some experts get nothing from some ranks
    counts = torch.tensor([count(ep.rank, e) for e in range(E)])
    # row = (source rank, global expert, index within the run)
    rows = [(ep.rank, e, i) for e in range(E) for i in range(count(ep.rank, e))]
    x = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3).requires_grad_(True)
    layout = dispatch_layout(counts, ep, E, None)
    got = dispatch(x, layout, ep)
    want = [(src, e, i) for j in range(El) for e in [ep.rank * El + j]
            for src in range(ep_size) for i in range(count(src, e))]
    if got.tolist() != [list(map(float, w)) for w in want]:
        raise AssertionError(f"rank {dist.get_rank()}: dispatch EP={ep_size} delivered {got.tolist()}, want {want}")
    if layout.expert_counts != [sum(count(s, ep.rank * El + j) for s in range(ep_size)) for j in range(El)]:
        raise AssertionError(f"rank {dist.get_rank()}: expert_counts {layout.expert_counts}")
    back = combine(got * 2.0, layout, ep)
    close(back, 2.0 * x, f"combine(dispatch(x)) EP={ep_size}")
    dy = torch.randn_like(back)
    (back * dy).sum().backward()
    close(x.grad, 2.0 * dy, f"gradient through dispatch+combine EP={ep_size}")
    return f"dispatch EP={ep_size} ok"


def main() -> int:
    with gloo_rank(lambda ap: ap.add_argument("--ep-sizes", required=True,
                                              help="comma-separated EP sizes to check")) as a:
        for ep in (int(s) for s in a.ep_sizes.split(",")):
            msg = check_dispatch(ep)
            if a.rank == 0:
                print(msg, flush=True)
            for name, extra in CONFIGS.items():
                msg = check(name, ModelConfig(**{**BASE, **extra}), ep)
                if a.rank == 0:
                    print(msg, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
