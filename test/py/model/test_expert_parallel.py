"""Expert parallelism over gloo: EP=2 and EP=4 (and EP=2 x DP=2) equal EP=1 with the same global weights.

One spawn per world size runs every check (ep_worker.py), since starting ranks is the
expensive part. EP=1 issues no collective at all: the single-process tests run the same
block without torch.distributed initialised.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ep_worker.py")


def run_ranks(world: int, ep_sizes: str, tmp_path: Path, timeout: float = 240.0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    init = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(r), "--world", str(world),
             "--init-file", str(init), "--ep-sizes", ep_sizes],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for r in range(world)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:  # a failed rank can leave the others waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, rc, err) for r, (rc, _, err) in enumerate(outputs) if rc != 0]
    if failed:
        r, rc, err = failed[0]
        pytest.fail(f"rank {r} exited {rc}:\n{err[-4000:]}")
    return outputs[0][1]


@pytest.mark.slow
def test_ep2_equals_ep1(tmp_path):
    out = run_ranks(2, "2", tmp_path)
    assert "dispatch EP=2 ok" in out
    assert "dropless-swiglu-gqa-rope EP=2 DP=2 ok" in out
    assert "capacity-drops-gelu-rmsnorm-bias EP=2 DP=2 ok" in out


@pytest.mark.slow
def test_ep4_and_ep2_times_dp2_equal_ep1(tmp_path):
    out = run_ranks(4, "4,2", tmp_path)
    for ep in (4, 2):
        assert f"dispatch EP={ep} ok" in out
        assert f"dropless-swiglu-gqa-rope EP={ep} DP=4 ok" in out
        assert f"capacity-drops-gelu-rmsnorm-bias EP={ep} DP=4 ok" in out
