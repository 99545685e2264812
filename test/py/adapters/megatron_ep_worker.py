"""One rank of the Megatron-Core test double at expert-parallel size 2, swapped for the
pipelined block, against the EP=1 double (run by every rank on every rank's batch).

Rank r's pipelined layers hold global experts [r·E/2, (r+1)·E/2) and exchange tokens with
the other rank; its loss, layer output, tracked aux losses and dense gradients equal the EP=1
double's on its own batch, and its expert gradients the sum over both ranks' batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # megatron_double
from rank_procs import gloo_rank  # noqa: E402

import megatron_double as md  # noqa: E402
import test_megatron_features as f  # noqa: E402
import test_megatron_swap as t  # noqa: E402
from ampipe.pipeline import swap_blocks  # noqa: E402

CASES = {"sequential": dict(grouped=False), "grouped": dict(grouped=True, groups=1, pre_softmax=True, glu=False),
         # every feature of test_megatron_features.py: the shared expert is replicated, the
         # expert bias's counts and update (local, from this rank's batch) compared too
         "features": f.FEATURES["all"]}


def shard(model: nn.Module, rank: int, size: int, group) -> nn.Module:
    """Rank `rank`'s model (a fresh copy of the EP=1 one): every layer keeps its share of the experts."""
    for layer in model.decoder.layers:
        cfg = dataclasses.replace(layer.config, expert_model_parallel_size=size)
        layer.config = cfg
        mlp = layer.mlp
        E = cfg.num_moe_experts
        El = E // size
        lo, hi = rank * El, (rank + 1) * El
        mlp.ep_group, mlp.num_local_experts, mlp.local_expert_indices = group, El, list(range(lo, hi))
        ex = mlp.experts
        if isinstance(ex, md.SequentialMLP):
            ex.local_experts = nn.ModuleList(list(ex.local_experts)[lo:hi])
            ex.num_local_experts = El
        else:
            H = cfg.hidden_size
            ex.weight1 = nn.Parameter(ex.weight1.detach().view(E, H, -1)[lo:hi].reshape(H, -1).clone())
            ex.weight2 = nn.Parameter(ex.weight2.detach().view(E, -1, H)[lo:hi].reshape(-1, H).clone())
            ex.num_local_experts = El
    return model


def local_name(name: str, rank: int, El: int) -> str | None:
    """The EP model's name for an EP=1 expert parameter on this rank (None: not local)."""
    parts = name.split(".")
    if "local_experts" in parts:
        i = parts.index("local_experts") + 1
        e = int(parts[i])
        if not rank * El <= e < (rank + 1) * El:
            return None
        parts[i] = str(e - rank * El)
    return ".".join(parts)


def main() -> None:
    with gloo_rank() as a:
        rank, size = a.rank, a.world
        group = dist.group.WORLD
        for case, kw in CASES.items():
            full = f.bias_model(t.make_model(**kw))
            El = 4 // size
            refs = [f.run_counted(full, *t.batch(seed=10 + j)) for j in range(size)]
            want = dict(refs[rank])
            for k in list(want):
                if not k.startswith("grad.") or ".mlp.experts." not in k:
                    continue
                total = sum(r[k] for r in refs)
                del want[k]
                if "local_experts" in k:
                    name = local_name(k[len("grad."):], rank, El)
                    if name is not None:
                        want["grad." + name] = total
                else:  # GroupedMLP: the rank's slice of the global tensor
                    H = 32
                    view = total.view(4, H, -1) if k.endswith("weight1") else total.view(4, -1, H)
                    want[k] = view[rank * El:(rank + 1) * El].reshape(
                        (H, -1) if k.endswith("weight1") else (-1, H))
            model = shard(f.bias_model(t.make_model(**kw)), rank, size, group)  # same seed: same weights
            report = swap_blocks(model, f.plan_for(model, "interleaved-p2"))
            assert report.swapped == ["decoder.layers.0", "decoder.layers.1"], report
            got = f.run_counted(model, *t.batch(seed=10 + rank))
            t.assert_close(want, got)
            print(f"megatron double EP={size} {case} ok", flush=True)


if __name__ == "__main__":
    main()
