"""Spawning a test's ranks as processes: what the expert-parallel tests share.

Each rank runs ``python <script> --rank r --world W --init-file <tmp>/rendezvous [args]`` with one
intra-op thread; a rank that fails fails the test with its rank, exit code and stderr tail, and
no rank outlives the call (a failed rank can leave the others waiting in a collective).
The script's folder and this one are on the rank's import path; the rank side starts with
``with gloo_rank() as args:``, and the process ends with that block.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def run_ranks(script: Path, world: int, tmp_path: Path, args: Sequence[str] = (), timeout: float = 240.0) -> list[str]:
    """Runs ``world`` ranks of ``script`` to the end; returns each rank's stdout, by rank."""
    path = [str(script.parent), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in path if p)}
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


@contextmanager
def gloo_rank(add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> Iterator[argparse.Namespace]:
    """The rank side of `run_ranks`: parses ``--rank/--world/--init-file`` (and what ``add_args``
    adds), uses one intra-op thread, joins the gloo group, and leaves it on exit. A body that ends
    normally ends the process too, with status 0 and without Python's finalization, as real ranks
    do (`ampipe.process_exit.exit_rank`); an exception propagates as usual."""
    import torch
    import torch.distributed as dist

    from ampipe.process_exit import exit_rank

    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init-file", required=True)
    if add_args is not None:
        add_args(ap)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.init_file}", rank=a.rank, world_size=a.world)
    try:
        yield a
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    exit_rank(0)
