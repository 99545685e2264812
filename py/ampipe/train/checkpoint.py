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

A write that fails (disk full, permission, I/O error) on any rank fails the save on every rank
(the ranks learn it at the gather that carries the shards' checksums, so none is left waiting):
each removes what it wrote of that step, the folder goes if nothing else is in it, and
`CheckpointError` names the file and the errno. The previous checkpoint is untouched, so a
rerun resumes from it. ``AMPIPE_FAULT_CHECKPOINT=STEP:RANK:ERRNO`` (e.g. ``8:1:ENOSPC``) makes
that rank's shard write of that step fail so, to try the path (the fault tests use it).
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import io
import json
import os
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


FAULT_ENV = "AMPIPE_FAULT_CHECKPOINT"


def _injected_fault(step: int, rank: int, path: Path) -> OSError | None:
    """The write failure ``AMPIPE_FAULT_CHECKPOINT=STEP:RANK:ERRNO`` asks for at this shard, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    try:
        s, r, name = spec.split(":")
        code = getattr(errno_codes, name)
        if int(s) != step or int(r) != rank:
            return None
    except (ValueError, AttributeError):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected STEP:RANK:ERRNO, e.g. 8:1:ENOSPC") from None
    return OSError(code, os.strerror(code), str(path))


def _why(e: OSError, path: Path) -> str:
    """'<path>: ENOSPC (No space left on device)' for the file we meant to write."""
    name = errno_codes.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    return f"{path}: {name} ({e.strerror or e})"


def _gather(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order (also a barrier)."""
    if not (_dist() and world_size > 1):
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def _undo_if_failed(failures: list[str | None], d: Path, step: int, written: list[Path]) -> None:
    """When any rank failed: remove what this rank wrote of this step (and the folder, once empty),
    then raise CheckpointError naming every failed write and the checkpoint that is kept."""
    failed = [f"rank {r}: {f}" for r, f in enumerate(failures) if f]
    if not failed:
        return
    for p in written:
        p.unlink(missing_ok=True)
    try:
        d.rmdir()  # the last rank to clean up removes it (on a shared file system)
    except OSError:
        pass
    root = d.parent
    kept = sorted((p.name for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()
                   and p.name < d.name), reverse=True) if root.is_dir() else []
    kept_text = (f"the newest checkpoint is still {root / kept[0]} (a rerun resumes from it)" if kept
                 else "there is no earlier checkpoint (a rerun starts from step 0)")
    raise CheckpointError(f"the checkpoint of step {step} could not be written: {'; '.join(failed)}. "
                          f"Its partial files were removed; {kept_text}")


def save_checkpoint(run_dir: Path, step: int, shard: dict[str, Any], *, rank: int, world_size: int,
                    layout: dict[str, Any]) -> Path:
    """Writes this rank's shard, then (once every rank's shard is on disk) the manifest.

    Collective when torch.distributed is initialised (every rank must call it for the same step).
    A failed write on any rank raises `CheckpointError` on every rank (see the module docstring).
    """
    d = checkpoint_dir(run_dir, step)
    shard_path = d / _shard_name(rank)
    entry, failure = None, None
    try:
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(shard, buf)
        data = buf.getvalue()
        fault = _injected_fault(step, rank, shard_path)
        if fault is not None:
            raise fault
        write_bytes_atomic(shard_path, data)
        entry = {"file": _shard_name(rank), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except OSError as e:
        failure = _why(e, shard_path)
    except Exception as e:  # noqa: BLE001 - the other ranks must hear of it at the gather, not hang there
        failure = f"{shard_path}: {type(e).__name__}: {e}"
    gathered = _gather({"entry": entry, "failure": failure}, world_size)
    _undo_if_failed([g["failure"] for g in gathered], d, step, [shard_path])
    # Every rank writes the (same) manifest, after every shard is on disk: ranks on machines
    # without a shared file system each find it beside their own shard.
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": world_size,
                "layout": layout, "shards": {str(r): g["entry"] for r, g in enumerate(gathered)}}
    failure = None
    try:
        write_bytes_atomic(d / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    except OSError as e:
        failure = _why(e, d / MANIFEST)
    # Nobody moves on (or is killed with a half-known state) before every manifest is written.
    _undo_if_failed(_gather(failure, world_size), d, step, [d / MANIFEST, shard_path])
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
