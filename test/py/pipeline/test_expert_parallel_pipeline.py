"""EP=2 over gloo (two spawned ranks, one spawn for every check): pipelined == baseline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ep_pipeline_worker.py")


@pytest.mark.slow
def test_ep2_pipelined_block_equals_baseline(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world", "2",
                               "--init-file", str(tmp_path / "rendezvous")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:  # a failed rank can leave the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (rc, out, err) in enumerate(outs):
        assert rc == 0, f"rank {r} exited {rc}:\n{err[-4000:]}"
        for name in ("interleaved-p2", "interleaved-p2-nonuniform", "grouped-p3", "grouped-p3-nonuniform"):
            assert f"{name} ok" in out, f"rank {r}: {out}"
