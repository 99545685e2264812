"""Swap ampipe's pipelined block into a Megatron-Core GPT-MoE and train a few steps.

    node bin/ampipe.js plan --from-megatron --out plan.json --no-trace -- \
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention \
        --num-query-groups 2 --seq-length 128 --micro-batch-size 2 --num-experts 4 \
        --moe-router-topk 2 --moe-ffn-hidden-size 128 --swiglu --disable-bias-linear \
        --normalization RMSNorm --position-embedding-type rope --moe-aux-loss-coeff 0.01
    PYTHONPATH=py .venv/bin/python examples/megatron_swap.py --plan plan.json

The model is built from the same settings as the flags above (`DIMS`), so the plan fits;
change one on one side only and `swap_blocks` refuses the plan, naming the field and the
`ampipe plan` command that makes a fitting one.

`--model`:
- ``megatron``: Megatron-Core's `GPTModel` with `get_gpt_layer_local_spec` (needs
  megatron-core and a CUDA device; written against megatron-core 0.20's API — ampipe's CI
  has no Megatron, so this path is not run there);
- ``double``: the Megatron-Core test double from ampipe's tests (`test/py/megatron_double.py`:
  the same attribute paths, call signature and aux-loss path, on CPU);
- ``ampipe``: ampipe's own GPT (`ampipe.model.gpt.GPTModel`);
- ``auto`` (default): megatron when it can be imported and CUDA is there, else double.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ampipe

DIMS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, seq_length=128,
            micro_batch_size=2, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=128)
VOCAB = 256


def megatron_config_kwargs() -> dict:
    d = DIMS
    return dict(num_layers=d["num_layers"], hidden_size=d["hidden_size"],
                num_attention_heads=d["num_attention_heads"], num_query_groups=d["num_query_groups"],
                num_moe_experts=d["num_experts"], moe_router_topk=d["moe_router_topk"],
                moe_ffn_hidden_size=d["moe_ffn_hidden_size"], ffn_hidden_size=4 * d["hidden_size"],
                gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
                add_bias_linear=False, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=None,
                hidden_dropout=0.0, attention_dropout=0.0)


def build_megatron():
    """Megatron-Core's GPT-MoE, local spec, one rank."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(**megatron_config_kwargs(), moe_token_dispatcher_type="alltoall")
    spec = get_gpt_layer_local_spec(num_experts=DIMS["num_experts"], moe_grouped_gemm=False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                     max_sequence_length=DIMS["seq_length"], position_embedding_type="rope")
    return model.cuda(), "cuda"


def build_double():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "py"))
    import megatron_double as md

    config = md.TransformerConfig(**megatron_config_kwargs())
    return md.GPTModel(config, vocab_size=VOCAB, max_sequence_length=DIMS["seq_length"], seed=1234), "cpu"


def build_ampipe():
    from ampipe.model.config import ModelConfig
    from ampipe.model.gpt import GPTModel

    cfg = ModelConfig(**DIMS, vocab_size=VOCAB, ffn_hidden_size=4 * DIMS["hidden_size"],
                      normalization="RMSNorm", moe_router_score_order="topk_then_softmax",
                      moe_expert_activation="swiglu", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.0)
    return GPTModel(cfg, seed=1234), "cpu"


def pick(kind: str):
    if kind == "auto":
        try:
            import megatron.core  # noqa: F401
            kind = "megatron" if torch.cuda.is_available() else "double"
        except ImportError:
            kind = "double"
    return kind, {"megatron": build_megatron, "double": build_double, "ampipe": build_ampipe}[kind]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", required=True, help="a plan from `ampipe plan` (see the module docstring)")
    ap.add_argument("--model", choices=["auto", "megatron", "double", "ampipe"], default="auto")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    kind, (model, device) = pick(args.model)
    plan = ampipe.load_plan(args.plan)
    report = ampipe.swap_blocks(model, plan)  # same parameters, no copy; refuses a plan that does not fit
    print(f"model: {kind}; {report}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    S, B = DIMS["seq_length"], DIMS["micro_batch_size"]
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        # Counting sequences from a random start: the next token is learnable.
        start = torch.randint(0, VOCAB, (B, 1), generator=g)
        ids = ((start + torch.arange(S + 1)) % VOCAB).to(device)
        tokens, labels = ids[:, :-1], ids[:, 1:]
        opt.zero_grad(set_to_none=True)
        if kind == "ampipe":
            loss = model(tokens, labels=labels).loss  # LM loss + aux + z
        else:  # Megatron's GPT returns the per-token loss; the aux losses ride on the activations
            position_ids = torch.arange(S, device=device)[None].expand(B, S)
            loss = model(tokens, position_ids, None, labels=labels).float().mean()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")
    restored = ampipe.unswap_blocks(model)
    print(f"unswapped {len(restored)} layer(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
