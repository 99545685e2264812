"""`ampipe data prepare` (TypeScript) → IndexedDataset / TokenWindows (Python), through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ampipe.data import IndexedDataset, TokenWindows, split_documents

ROOT = Path(__file__).resolve().parents[3]
NODE = shutil.which("node")

pytestmark = [pytest.mark.slow]


def test_has_the_typescript_side_to_compare_with():
    # A cross-language test fails, never skips, when the other side is missing (npm test has node).
    assert NODE is not None, "node is not on PATH: the TypeScript side of this test is missing"


def _prepare(*args: str) -> dict:
    assert NODE is not None, "node is not on PATH: the TypeScript side of this test is missing"
    r = subprocess.run([NODE, str(ROOT / "bin" / "ampipe.js"), "data", "prepare", *args, "--json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_byte_round_trip_and_split_agree_across_languages(tmp_path):
    texts = [f"document {i}: " + "é✓ " * i for i in range(24)]
    inputs = []
    for i, t in enumerate(texts):
        p = tmp_path / f"d{i:02d}.txt"
        p.write_text(t, encoding="utf-8")
        inputs += ["--input", str(p)]
    jl = tmp_path / "more.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["first line doc", "second"]) + "\n")
    _prepare(*inputs, "--input", str(jl), "--seed", "99", "--valid-fraction", "0.2", "--out", str(tmp_path / "ds"))
    ds = IndexedDataset(tmp_path / "ds")
    ds.verify()
    texts += ["first line doc", "second"]
    assert len(ds) == 26 and ds.dtype == np.uint16 and ds.eod_id == 256 and ds.max_token_id() == 256
    for d, t in enumerate(texts):
        assert ds[d][-1] == 256
        assert bytes(ds[d][:-1].astype(np.uint8)).decode("utf-8") == t
    # the TypeScript split equals the Python rule, so a sidecar-less copy splits the same way
    train, valid = split_documents(26, 99, 0.2)
    assert ds.split_documents("valid").tolist() == valid.tolist() == ds.sidecar["split"]["valid"].tolist()
    assert ds.split_documents("train").tolist() == train.tolist()
    for ext in ("bin", "idx"):
        shutil.copy(tmp_path / f"ds.{ext}", tmp_path / f"bare.{ext}")
    bare = IndexedDataset(tmp_path / "bare")
    assert bare.sidecar is None
    assert bare.split_documents("valid", seed=99, valid_fraction=0.2).tolist() == valid.tolist()
    tw = TokenWindows(tmp_path / "ds", 16, split="train", seed=1)
    assert tw.num_tokens == int(ds.doc_sizes[train].sum())


def test_gpt2_ids(tmp_path):
    (tmp_path / "h.txt").write_text("Hello world")
    s = _prepare("--input", str(tmp_path / "h.txt"), "--tokenizer", "gpt2", "--valid-fraction", "0", "--out", str(tmp_path / "g"))
    assert s["vocab_size"] == 50257 and s["eod_id"] == 50256
    assert IndexedDataset(tmp_path / "g")[0].tolist() == [15496, 995, 50256]


def test_split_rule_agrees_with_typescript_on_edge_cases():
    cases = [(1, 5, 0.5), (2, 0, 0.9), (1000, 4294967295, 0.05), (37, 1234, 0.333), (64, 2**31, 0.0)]
    script = ("import { splitDocuments } from './src/data/split.ts';"
              f"console.log(JSON.stringify({json.dumps(cases)}.map(([n, s, f]) => splitDocuments(n, s, f))));")
    r = subprocess.run([str(ROOT / "node_modules" / ".bin" / "tsx"), "--eval", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for (n, seed, frac), ts in zip(cases, json.loads(r.stdout)):
        train, valid = split_documents(n, seed, frac)
        assert ts == {"train": train.tolist(), "valid": valid.tolist()}, (n, seed, frac)
