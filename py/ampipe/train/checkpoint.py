"""Training checkpoints: one shard per rank, a manifest written last, exact resume.

Layout under ``<run_dir>/checkpoints/``::

    step-00000050/rank-00000.pt   every rank's shard: model (its experts + the dense weights),
    step-00000050/rank-00001.pt   optimiser, loss scale, step, data position, RNG states
    step-00000050/manifest.json   written once every shard is on disk (by every rank, the same
                                  file): step, layout, and each shard's size and sha256

Every file is written atomically (`ampipe.atomic`). A checkpoint folder without its manifest
(a run killed while saving) or with a shard whose size or checksum does not match is refused,
named, and the previous one is tried; every rank must accept the same checkpoint (decided
collectively), so ranks on machines without a shared file system still agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..atomic import write_bytes_atomic

__all__ = ["CheckpointError", "save_checkpoint", "find_resumable", "load_shard", "MANIFEST", "checkpoint_dir"]

FORMAT = "ampipe.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_backend_is_nccl() -> bool:
    """NCCL reduces device tensors only; gloo CPU ones."""
    return _dist() and dist.get_backend() == "nccl"


def save_checkpoint(run_dir: Path, step: int, shard: dict[str, Any], *, rank: int, world_size: int,
                    layout: dict[str, Any]) -> Path:
    """Writes this rank's shard, then (once every rank's shard is on disk) the manifest.

    Collective when torch.distributed is initialised (every rank must call it for the same step).
    """
    d = checkpoint_dir(run_dir, step)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(shard, buf)
    data = buf.getvalue()
    write_bytes_atomic(d / _shard_name(rank), data)
    entry = {"file": _shard_name(rank), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    entries: list[Any] = [None] * world_size
    if _dist() and world_size > 1:
        dist.all_gather_object(entries, entry)
    else:
        entries = [entry]
    # Every rank writes the (same) manifest, after every shard is on disk: ranks on machines
    # without a shared file system each find it beside their own shard.
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "layout": layout, "shards": {str(r): e for r, e in enumerate(entries)}}
    write_bytes_atomic(d / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    if _dist() and world_size > 1:
        dist.barrier()  # nobody moves on (or is killed with a half-known state) before the manifest
    return d


@dataclass
class Resumable:
    step: int
    path: Path
    manifest: dict[str, Any]


def _check_manifest(d: Path, rank: int, world_size: int, layout: dict[str, Any]) -> dict[str, Any]:
    """This rank's view of checkpoint folder `d`: its manifest, or a CheckpointError saying why not."""
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{d}: no {MANIFEST} (the run stopped while saving it); skipped")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable ({e}); skipped") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: not an {FORMAT} v{VERSION} manifest; skipped")
    if manifest.get("world_size") != world_size or manifest.get("layout") != layout:
        # Not a damaged checkpoint: a different run. Resuming it would be wrong, skipping it too.
        raise ValueError(f"{mpath}: written by a run with world_size={manifest.get('world_size')} and layout "
                         f"{manifest.get('layout')}, this run has world_size={world_size} and layout {layout}; "
                         "use the same parallel layout, or start over (ampipe train --fresh)")
    entry = manifest.get("shards", {}).get(str(rank))
    if not entry:
        raise CheckpointError(f"{mpath}: lists no shard for rank {rank}; skipped")
    spath = d / entry["file"]
    if not spath.is_file():
        raise CheckpointError(f"{spath}: missing; skipped")
    data = spath.read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{spath}: size or sha256 does not match {MANIFEST} (corrupt); skipped")
    return manifest


def find_resumable(run_dir: Path, *, rank: int, world_size: int, layout: dict[str, Any],
                   say: Callable[[str], None] = print) -> Resumable | None:
    """The newest checkpoint every rank can load, or None. Collective with torch.distributed.

    Each refused checkpoint is reported through `say` (by the rank that refused it)."""
    root = Path(run_dir) / "checkpoints"
    steps = sorted((int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
                    if (m := _STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
    if _dist() and world_size > 1:  # rank 0's listing decides the candidates
        box = [steps]
        dist.broadcast_object_list(box, src=0)
        steps = box[0]
    device = torch.device("cuda", torch.cuda.current_device()) if dist_backend_is_nccl() else torch.device("cpu")
    for step in steps:
        d = checkpoint_dir(run_dir, step)
        manifest, code, fatal = None, 0, None  # code: 0 usable, 1 refused (try the previous), 2 fatal
        try:
            manifest = _check_manifest(d, rank, world_size, layout)
        except CheckpointError as e:
            say(f"checkpoint refused: {e}")
            code = 1
        except Exception as e:  # noqa: BLE001 - every rank must still reach the collective below
            code, fatal = 2, e
        if _dist() and world_size > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code == 2:
            if fatal is not None:
                raise fatal
            raise RuntimeError(f"{d}: another rank could not read this checkpoint (its error is in its output)")
        if code == 0:
            return Resumable(step, d, manifest)
    return None


def load_shard(found: Resumable, rank: int) -> dict[str, Any]:
    entry = found.manifest["shards"][str(rank)]
    return torch.load(found.path / entry["file"], map_location="cpu", weights_only=False)
