"""A checkpoint write that fails (disk full, permission): the previous checkpoint stays usable,
the failed step's partial files are removed, the run stops with an error naming the file and
the errno, and a rerun resumes from the previous checkpoint as if nothing had happened."""

from __future__ import annotations

import errno
import os

import pytest

import ampipe.atomic as atomic
import ampipe.train.checkpoint as ckpt
from ampipe.train.checkpoint import MANIFEST, CheckpointError, checkpoint_dir
from test_train_loop import losses, trainer


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    atomic.write_bytes_atomic(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_bytes_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and _files(tmp_path) == ["a.bin"]


def test_disk_full_at_a_checkpoint_stops_the_run_naming_file_and_errno_and_a_rerun_resumes(tmp_path, monkeypatch):
    full, ef = trainer(tmp_path / "full", steps=12)
    full.run()
    run = tmp_path / "run"
    monkeypatch.setenv(ckpt.FAULT_ENV, "8:0:ENOSPC")
    t, _ = trainer(run, steps=12)
    with pytest.raises(CheckpointError) as info:
        t.run()
    msg = str(info.value)
    assert f"rank 0: {checkpoint_dir(run, 8) / 'rank-00000.pt'}: ENOSPC (No space left on device)" in msg, msg
    assert f"the newest checkpoint is still {checkpoint_dir(run, 4)}" in msg, msg
    # Left on disk: the step-4 checkpoint, whole; nothing of step 8.
    assert _files(run / "checkpoints") == ["step-00000004/manifest.json", "step-00000004/rank-00000.pt"]
    monkeypatch.delenv(ckpt.FAULT_ENV)
    again, ea = trainer(run, steps=12)
    again.run()
    assert again.resumed_from == 4
    assert losses(ea) == losses(ef)[4:]  # steps 5..12, bitwise those of the uninterrupted run


def test_a_manifest_that_cannot_be_written_removes_the_shard_too(tmp_path, monkeypatch):
    real = ckpt.write_bytes_atomic

    def denied(path, data):
        if path.name == MANIFEST and path.parent.name == "step-00000008":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_atomic", denied)
    t, _ = trainer(tmp_path, steps=12)
    with pytest.raises(CheckpointError, match=rf"step-00000008/{MANIFEST}: EACCES \(Permission denied\)"):
        t.run()
    assert not checkpoint_dir(tmp_path, 8).exists()
    assert (checkpoint_dir(tmp_path, 4) / MANIFEST).is_file()


def test_a_malformed_fault_spec_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_ENV, "eight")
    t, _ = trainer(tmp_path, steps=4)
    with pytest.raises(CheckpointError, match="ValueError: AMPIPE_FAULT_CHECKPOINT='eight': expected STEP:RANK:ERRNO"):
        t.run()
