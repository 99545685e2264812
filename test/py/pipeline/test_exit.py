"""Rank processes end cleanly, also under load.

A daemon thread that is inside a torch call when Python finalizes is stopped as it returns,
which aborts the process ("terminate called without an active exception", exit -6); that is
how a rank once died at exit under load, when the executor ran comm ops on a communication
thread of its own. The executor now runs on the caller's thread only (collectives are gloo's
asynchronous works, see `ampipe.pipeline.streams`), so no thread of ampipe's is left to race
the interpreter's exit; this test ends many real expert-parallel ranks the moment their pass
is done, while a busy loop competes for the cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("exit_worker.py")
HERE = Path(__file__).parent


def _env() -> dict[str, str]:
    path = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1",
            "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@pytest.mark.slow
def test_many_short_rank_processes_under_load_all_exit_cleanly(tmp_path):
    """Two 2-rank gloo worlds at once (each: one pipelined EP=2 forward+backward, then exit) while
    a busy loop competes for the cores; every rank exits 0 with no abort."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    procs = []
    try:
        for world in range(2):
            init = tmp_path / f"rendezvous-{world}"
            for r in range(2):
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--rank", str(r), "--world", "2",
                     "--init-file", str(init)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
        results = [(p.communicate(timeout=240), p.returncode) for p in procs]
    finally:
        burner.kill()
        burner.wait()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, ((out, err), rc) in enumerate(results):
        assert (rc, out.strip()) == (0, "ep done"), f"world {i // 2} rank {i % 2} exited {rc}:\n{err[-3000:]}"
        assert "terminate called" not in err
