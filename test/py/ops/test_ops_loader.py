"""Loading, fallback and the build's no-change path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ampipe.ops import paths

PROBE = """
import warnings, torch
warnings.simplefilter("always")
import ampipe.ops as ops
idx = torch.tensor([[0, 1], [1, 0]])
for _ in range(3):
    rm, _ = ops.make_row_map(idx, 2)
    ops.unpermute(ops.permute(torch.ones(2, 3), rm, 4), rm, torch.ones(2, 2))
print("IMPL", ops.implementation())
"""


def run_probe(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )


def test_missing_build_falls_back_with_one_warning(tmp_path):
    r = run_probe({"AMPIPE_EXT_DIR": str(tmp_path / "nothing-here"), "AMPIPE_OPS": "auto"})
    assert r.returncode == 0, r.stderr
    assert "IMPL reference" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if "compiled dispatch/combine ops not loaded" in ln]
    assert len(warnings) == 1, r.stderr
    assert "python -m ampipe.ops.build" in warnings[0]


def test_stale_build_is_not_loaded(tmp_path):
    (tmp_path / "stamp.json").write_text(
        json.dumps({"ok": True, "library": "missing.so", "torch": "0.0"})
    )
    r = run_probe({"AMPIPE_EXT_DIR": str(tmp_path), "AMPIPE_OPS": "auto"})
    assert r.returncode == 0, r.stderr
    assert "IMPL reference" in r.stdout
    assert "missing" in r.stderr


def test_compiled_mode_makes_a_missing_build_an_error(tmp_path):
    r = run_probe({"AMPIPE_EXT_DIR": str(tmp_path), "AMPIPE_OPS": "compiled"})
    assert r.returncode != 0
    assert "AMPIPE_OPS=compiled but the extension is not loaded" in r.stderr


def test_up_to_date_build_is_a_no_op_without_torch(compiled):
    stamp_before = paths.read_stamp()
    script = (
        "import sys; from ampipe.ops.build import main; rc = main([]); "
        "print('RC', rc, 'TORCH', 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
    # The no-change path neither imports torch (seconds) nor compiles.
    assert "RC 0 TORCH False" in r.stdout
    assert paths.read_stamp() == stamp_before
