"""Expert parallelism over gloo: EP=2 and EP=4 (and EP=2 x DP=2) equal EP=1 with the same global weights.

One spawn per world size runs every check (ep_worker.py), since starting ranks is the
expensive part. EP=1 issues no collective at all: the single-process tests run the same
block without torch.distributed initialised.
"""

from pathlib import Path

import pytest
from rank_procs import run_ranks

WORKER = Path(__file__).with_name("ep_worker.py")


@pytest.mark.slow
def test_ep2_equals_ep1(tmp_path):
    out = run_ranks(WORKER, 2, tmp_path, ["--ep-sizes", "2"])[0]
    assert "dispatch EP=2 ok" in out
    assert "dropless-swiglu-gqa-rope EP=2 DP=2 ok" in out
    assert "capacity-drops-gelu-rmsnorm-bias EP=2 DP=2 ok" in out


@pytest.mark.slow
def test_ep4_and_ep2_times_dp2_equal_ep1(tmp_path):
    out = run_ranks(WORKER, 4, tmp_path, ["--ep-sizes", "4,2"])[0]
    for ep in (4, 2):
        assert f"dispatch EP={ep} ok" in out
        assert f"dropless-swiglu-gqa-rope EP={ep} DP=4 ok" in out
        assert f"capacity-drops-gelu-rmsnorm-bias EP={ep} DP=4 ok" in out
