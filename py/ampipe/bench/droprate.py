"""How many token slots a capacity factor drops: the whole-sequence capacity (the baseline) and
the per-chunk capacity of a plan's chunks (the pipelined block's ``chunk`` scope), measured.

    python -m ampipe.bench.droprate runs/compare-capacity/seed-1234/pipelined           # initial weights
    python -m ampipe.bench.droprate RUN_DIR --checkpoint RUN_DIR/checkpoints/step-00000200

Reads the run directory's resolved ``config.json`` and ``plan.json``; builds the model on one
process from ``run.seed`` (the initial weights), or loads ``--checkpoint``'s ``rank-00000.pt`` (the
whole model only for a run with expert-parallel size 1); reads ``--batches`` training
micro-batches; and at every MoE layer routes the layer's real input with the model's own pieces
(`block_pieces.route`, `permute`), counting the slots (token, top-k choice) marked dropped. Prints
the drop rate per layer and overall, both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..model import block_pieces as pieces


def measure(run_dir: Path, batches: int, checkpoint: Path | None = None) -> dict[str, Any]:
    from ..parallel.groups import ParallelGroups
    from ..train.worker_commands import build_trainer

    config = json.loads((run_dir / "config.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").is_file() else None
    if config["model"].get("moe_expert_capacity_factor") is None:
        raise SystemExit(f"{run_dir}/config.json: model.moe_expert_capacity_factor is null (dropless): nothing is dropped")
    config = json.loads(json.dumps(config))
    config["parallelism"] = {**config["parallelism"], "world_size": 1, "expert_model_parallel_size": 1}
    config["pipeline"] = {**config["pipeline"], "emulated_comm": None}
    t = build_trainer(config, None, str(run_dir / ".droprate"), groups=ParallelGroups.single(), device="cpu",
                      say=lambda s: None)
    if checkpoint is not None:
        shard = torch.load(checkpoint / "rank-00000.pt", map_location="cpu", weights_only=False)
        t.model.load_state_dict(shard["model"])
    bounds = plan["boundaries"] if plan else [0, t.cfg.seq_length]
    inputs: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in t.model.named_modules() if getattr(m, "is_moe", False) and hasattr(m, "mlp")}
    hooks = [m.register_forward_pre_hook(lambda mod, a, _n=n: inputs.setdefault(_n, []).append(a[0].detach()))
             for n, m in layers.items()]
    t.model.eval()
    with torch.no_grad():
        for i in range(batches):
            ids = t._batch(t.train_data, i, 0)
            t.model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    for h in hooks:
        h.remove()
    out: dict[str, Any] = {"boundaries": bounds, "capacity_factor": t.cfg.moe_expert_capacity_factor,
                           "drop_policy": t.cfg.moe_token_drop_policy, "batches": batches, "layers": {}}
    tot = {"slots": 0, "sequence": 0, "chunk": 0}
    with torch.no_grad():
        for name, layer in layers.items():
            seq_drop = chunk_drop = slots = 0
            for x in inputs[name]:
                q = pieces.qkv(layer, x)
                h, normed = pieces.proj(layer, pieces.attention(layer, q.q, q.k, q.v), x)
                r = pieces.route(layer, normed)
                seq_drop += int((pieces.permute(layer, normed, r).row_map < 0).sum())
                slots += r.indices.numel()
                for a, b in zip(bounds[:-1], bounds[1:]):
                    rc = pieces.route(layer, normed[a:b])
                    chunk_drop += int((pieces.permute(layer, normed[a:b], rc).row_map < 0).sum())
            out["layers"][name] = {"slots": slots, "sequence_scope": seq_drop / slots, "chunk_scope": chunk_drop / slots}
            tot["slots"] += slots
            tot["sequence"] += seq_drop
            tot["chunk"] += chunk_drop
    out["sequence_scope"] = tot["sequence"] / tot["slots"]
    out["chunk_scope"] = tot["chunk"] / tot["slots"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.bench.droprate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--batches", type=int, default=8, help="training micro-batches to route (default 8)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder of an EP-1 run (default: initial weights)")
    a = ap.parse_args(argv)
    r = measure(a.run_dir, a.batches, a.checkpoint)
    print(f"capacity factor {r['capacity_factor']}, drop policy {r['drop_policy']}, {r['batches']} micro-batches, "
          f"chunks {r['boundaries']}")
    for name, v in r["layers"].items():
        print(f"  {name}: dropped {100 * v['sequence_scope']:.1f}% of slots with the whole-sequence capacity, "
              f"{100 * v['chunk_scope']:.1f}% per chunk")
    print(f"  all MoE layers: {100 * r['sequence_scope']:.1f}% (sequence), {100 * r['chunk_scope']:.1f}% (chunk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
