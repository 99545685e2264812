"""Rank processes end cleanly, also under load.

A rank that ended right after its last collective once died at exit under load (exit -6,
"terminate called without an active exception"): gloo's worker thread dropped the finished work a
moment late, when the interpreter was already finalizing; dropping it takes the GIL, and CPython
ends a thread that asks for the GIL then with `pthread_exit`, which aborts through a `noexcept`
destructor (see `ampipe.process_exit`). Ranks therefore end with `exit_rank`: their own clean-up,
then `os._exit`. The stress test ends many real expert-parallel ranks the moment their pass is done,
while a busy loop competes for the cores; the race it guards against is rare (1 in 80 two-rank runs
under one busy loop, before the fix), so it detects a regression only sometimes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


def test_exit_rank_flushes_output_and_skips_finalization():
    """`exit_rank(code)`: the status is `code`; buffered stdout and logging reach their streams;
    no atexit handler or finalizer runs (they are what could meet a gloo thread mid-release)."""
    program = textwrap.dedent("""
        import atexit, logging, sys
        from ampipe.process_exit import exit_rank

        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        class Finalized:
            def __del__(self):
                print("finalizer ran", flush=True)
        kept = Finalized()
        atexit.register(lambda: print("atexit ran", flush=True))
        sys.stdout.write("buffered, no newline")  # a pipe: block-buffered, not yet written
        logging.getLogger("rank").info("logged")
        exit_rank(7)
        print("after exit_rank")
    """)
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "buffered, no newline"
    assert r.stderr == "logged\n"
