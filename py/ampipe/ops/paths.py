"""Where the extension's sources and build live, and the fingerprint that says it is current.

Kept free of torch imports so that ``python -m ampipe.ops.build`` can decide "nothing to
do" in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"
LIB_NAME = "ampipe_ops"


def build_dir() -> Path:
    """``build/ext`` under the repository, or ``$AMPIPE_EXT_DIR``."""
    env = os.environ.get("AMPIPE_EXT_DIR")
    return Path(env).resolve() if env else ROOT / "build" / "ext"


def stamp_path() -> Path:
    return build_dir() / "stamp.json"


def source_files() -> list[Path]:
    if not CSRC.is_dir():
        return []
    return sorted(
        p for p in CSRC.rglob("*") if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh")
    )


def sources_hash() -> str:
    """Hash of the csrc tree (paths and contents) and of the build recipe."""
    h = hashlib.sha256()
    for p in source_files() + [Path(__file__).with_name("build.py")]:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0")
        h.update(p.read_bytes() if p.exists() else b"")
        h.update(b"\0")
    return h.hexdigest()


def read_stamp() -> dict | None:
    try:
        return json.loads(stamp_path().read_text())
    except (OSError, ValueError):
        return None
