"""EP=2 over gloo (two spawned ranks, one spawn for every check): pipelined == baseline,
dropless, with capacity_scope sequence dropping tokens, and with every MoE feature of
test_moe_features.py (the expert bias's counts and all-reduced update included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rank_procs import run_ranks

WORKER = Path(__file__).with_name("ep_pipeline_worker.py")


@pytest.mark.slow
def test_ep2_pipelined_block_equals_baseline(tmp_path):
    for r, out in enumerate(run_ranks(WORKER, 2, tmp_path, timeout=180)):
        for name in ("interleaved-p2", "interleaved-p2-nonuniform", "grouped-p3", "grouped-p3-nonuniform",
                     "moe-overlap-p2"):
            assert f"{name} ok" in out, f"rank {r}: {out}"
        for name in ("interleaved-p2", "grouped-p3-nonuniform", "grouped-p4", "interleaved-p8-nonuniform"):
            assert f"{name} sequence-capacity ok" in out, f"rank {r}: {out}"
        for name in ("grouped-p3-nonuniform-shared", "interleaved-p3-nonuniform-shared"):
            assert f"{name} features ok" in out, f"rank {r}: {out}"
