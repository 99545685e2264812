"""Spawning a test's ranks as processes: what the expert-parallel tests share.

Each rank runs ``python <script> --rank r --world W --init-file <tmp>/rendezvous [args]`` with one
intra-op thread; a rank that fails fails the test with its rank, exit code and stderr tail, and
no rank outlives the call (a failed rank can leave the others waiting in a collective).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest


def run_ranks(script: Path, world: int, tmp_path: Path, args: Sequence[str] = (), timeout: float = 240.0) -> list[str]:
    """Runs ``world`` ranks of ``script`` to the end; returns each rank's stdout, by rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    init = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "--rank", str(r), "--world", str(world), "--init-file", str(init), *args],
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
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (rc, _, err) in enumerate(outputs):
        if rc != 0:
            pytest.fail(f"{script.name} rank {r} exited {rc}:\n{err[-4000:]}")
    return [out for _, out, _ in outputs]
