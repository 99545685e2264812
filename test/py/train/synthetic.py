"""A learnable synthetic token source for training tests: arithmetic progressions mod V.

Sample i starts at a random token and steps by 1..3, both drawn from a generator seeded by i,
so any process can read any sample (the loop's contract: `sample(i)` for any i >= 0)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "plans"


class Progressions:
    def __init__(self, seq_length: int, vocab: int, offset: int = 0):
        self.seq_length, self.vocab, self.offset = seq_length, vocab, offset

    def sample(self, i: int) -> np.ndarray:
        r = np.random.default_rng(self.offset + i)
        start, step = int(r.integers(0, self.vocab)), int(r.integers(1, 4))
        return (start + step * np.arange(self.seq_length + 1)) % self.vocab


def fixture_plan(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def model_dict(plan_name: str = "grouped-p2", **over) -> dict:
    """A tiny GPT-MoE whose MoE block has the fixture plan's dims."""
    d = fixture_plan(plan_name)["dims"]
    out = dict(num_layers=2, hidden_size=d["hidden_size"], num_attention_heads=d["num_attention_heads"],
               seq_length=d["seq_length"], micro_batch_size=d["micro_batch_size"], vocab_size=64,
               ffn_hidden_size=64, num_experts=d["num_experts"], moe_router_topk=d["moe_router_topk"],
               moe_ffn_hidden_size=d["moe_ffn_hidden_size"])
    out.update(over)
    return out
