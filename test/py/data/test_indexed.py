"""IndexedDataset against Megatron's format: a fixture from an independent writer (several dtypes,
documents of several sequences), every corruption refused by name, and the split rule."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ampipe.data import DatasetError, IndexedDataset, split_documents
from ampipe.data.split import splitmix64, valid_count
from megatron_writer import write_megatron

DOCS = [  # 3 documents: 2 sequences, 1 sequence, 3 sequences (one empty)
    [[5, 1, 0], [7]],
    [[200, 3]],
    [[9], [], [4, 4, 2]],
]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "int64"])
def test_reads_megatron_files_of_every_token_dtype(tmp_path, dtype):
    docs = DOCS if dtype != "int8" else [[[t % 100 for t in s] for s in d] for d in DOCS]
    if dtype == "int64":
        docs = [[[t + 2**40 for t in s] for s in d] for d in DOCS]
    write_megatron(tmp_path / "m", docs, dtype)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == 3 and ds.num_sequences == 6
    assert ds.sizes.tolist() == [3, 1, 2, 1, 0, 3]
    assert ds.doc_idx.tolist() == [0, 2, 3, 6]
    assert ds.doc_sizes.tolist() == [4, 2, 4]
    for d, doc in enumerate(docs):
        assert ds[d].tolist() == [t for s in doc for t in s]
    assert ds[-1].tolist() == ds[2].tolist()
    assert ds.sequence(3).tolist() == docs[2][0]
    assert ds.max_token_id() == max(t for d in docs for s in d for t in s)
    assert ds.sidecar is None and ds.eod_id is None
    with pytest.raises(IndexError, match="document 3 out of range"):
        ds[3]


def test_multimodal_index_with_modes_reads(tmp_path):
    write_megatron(tmp_path / "m", DOCS, "int32", modes=True)
    ds = IndexedDataset(tmp_path / "m")
    assert ds.multimodal and ds[2].tolist() == [9, 4, 4, 2]


def test_without_sidecar_the_split_follows_the_rule(tmp_path):
    docs = [[[i, i]] for i in range(40)]
    write_megatron(tmp_path / "m", docs, "uint16")
    ds = IndexedDataset(tmp_path / "m")
    train, valid = ds.split_documents("train"), ds.split_documents("valid")
    assert valid.tolist() == split_documents(40, 1234, 0.05)[1].tolist()
    assert len(valid) == 2 and sorted(train.tolist() + valid.tolist()) == list(range(40))
    assert ds.split_documents("valid", seed=5, valid_fraction=0.25).tolist() == split_documents(40, 5, 0.25)[1].tolist()
    assert ds.split_documents("all").tolist() == list(range(40))
    with pytest.raises(ValueError, match="split: must be 'train', 'valid' or 'all'"):
        ds.split_documents("test")


def test_split_rule_by_hand():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the reference first output for state 0
    base = splitmix64(77)
    keys = [splitmix64((base + j) % 2**64) for j in range(30)]
    by_key = sorted(range(30), key=lambda j: (keys[j], j))
    train, valid = split_documents(30, 77, 0.2)
    assert valid.tolist() == sorted(by_key[:6]) and train.tolist() == sorted(by_key[6:])
    assert valid_count(20, 0.125) == 3 and valid_count(1, 0.5) == 0 and valid_count(5, 0) == 0


# ----- corruption: every one refused by a DatasetError naming the file ----------------------------

@pytest.fixture
def good(tmp_path):
    write_megatron(tmp_path / "m", DOCS, "int32")
    return tmp_path / "m"


def _patch(path, offset, data):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


def test_missing_files(tmp_path, good):
    (tmp_path / "m.bin").unlink()
    with pytest.raises(DatasetError, match=r"m\.bin: no such file"):
        IndexedDataset(good)
    with pytest.raises(DatasetError, match=r"nothere\.idx: no such file"):
        IndexedDataset(tmp_path / "nothere")


def test_bad_magic(good):
    _patch(good.with_suffix(".idx"), 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(DatasetError, match=r"m\.idx: bad magic"):
        IndexedDataset(good)


def test_wrong_version(good):
    _patch(good.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(DatasetError, match=r"m\.idx: unsupported index version 2"):
        IndexedDataset(good)


@pytest.mark.parametrize("code, what", [(9, "unknown dtype code 9"), (0, "unknown dtype code 0"), (7, r"dtype code 7 \(float32\) holds no token ids")])
def test_unknown_or_float_dtype(good, code, what):
    _patch(good.with_suffix(".idx"), 17, bytes([code]))
    with pytest.raises(DatasetError, match=rf"m\.idx: {what}"):
        IndexedDataset(good)


def test_short_idx(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(DatasetError, match=r"m\.idx: short \.idx: 20 bytes, the header alone needs 34"):
        IndexedDataset(good)


def test_truncated_idx(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"m\.idx: truncated \.idx: .* 6 sequences and 4 document indices need"):
        IndexedDataset(good)


def test_trailing_bytes_after_idx(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes() + b"\x00\x00")
    with pytest.raises(DatasetError, match=r"m\.idx: 2 bytes after the document indices"):
        IndexedDataset(good)


def test_truncated_bin(good):
    b = good.with_suffix(".bin")
    b.write_bytes(b.read_bytes()[:-4])
    with pytest.raises(DatasetError, match=r"m\.bin: truncated \.bin: 36 bytes, but m\.idx describes 10 int32 tokens = 40 bytes"):
        IndexedDataset(good)


def test_bin_of_another_index(tmp_path, good):
    write_megatron(tmp_path / "other", [[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]], "int32")
    (tmp_path / "other.bin").replace(good.with_suffix(".bin"))
    with pytest.raises(DatasetError, match=r"m\.bin: 44 bytes, but m\.idx describes 40 .*not this index's \.bin"):
        IndexedDataset(good)


def test_pointers_that_do_not_follow_the_sizes(good):
    # sizes start at 34, pointers at 34 + 6*4; make sequence 1 point one token too far
    _patch(good.with_suffix(".idx"), 34 + 24 + 8, struct.pack("<q", 16))
    with pytest.raises(DatasetError, match=r"m\.idx: sequence 1 points at byte 16, but the sizes before it end at byte 12"):
        IndexedDataset(good)


def test_document_indices_that_do_not_end_at_the_sequence_count(good):
    _patch(good.with_suffix(".idx"), 34 + 24 + 48 + 24, struct.pack("<q", 5))
    with pytest.raises(DatasetError, match=r"m\.idx: the last document index is 5, the sequence count is 6"):
        IndexedDataset(good)


# ----- the sidecar -------------------------------------------------------------------------------

def _sidecar(prefix, **over):
    import hashlib
    b, i = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    s = {"format": "ampipe.indexed_dataset", "version": 1, "tokenizer": "byte", "vocab_size": 257, "eod_id": 256,
         "max_token_id": 200, "dtype": "int32", "num_documents": 3, "num_tokens": 10,
         "split": {"seed": 3, "valid_fraction": 0.3, "train": [0, 2], "valid": [1]},
         "files": {"bin": {"bytes": b.stat().st_size, "sha256": hashlib.sha256(b.read_bytes()).hexdigest()},
                   "idx": {"bytes": i.stat().st_size, "sha256": hashlib.sha256(i.read_bytes()).hexdigest()}},
         "source": {"kind": "files", "inputs": []}}
    s.update(over)
    prefix.with_suffix(".json").write_text(json.dumps(s))


def test_sidecar_lists_are_the_split(good):
    _sidecar(good)
    ds = IndexedDataset(good)
    assert ds.eod_id == 256 and ds.vocab_size == 257
    assert ds.split_documents("train").tolist() == [0, 2] and ds.split_documents("valid").tolist() == [1]
    # the sidecar's lists are the split; a seed and fraction apply only to a dataset without one
    assert ds.split_documents("valid", seed=4, valid_fraction=0.9).tolist() == [1]
    assert ds.split_origin(seed=4, valid_fraction=0.9) == {"from": "sidecar", "seed": 3, "valid_fraction": 0.3}
    good.with_suffix(".json").unlink()
    assert IndexedDataset(good).split_origin(seed=4, valid_fraction=0.9) == {"from": "rule", "seed": 4, "valid_fraction": 0.9}


def test_sidecar_of_another_pair_is_refused(tmp_path, good):
    _sidecar(good)
    # an .idx of the same size but other contents (the sizes of two sequences swapped)
    write_megatron(tmp_path / "twin", [[[5, 1, 0], [7]], [[200, 3]], [[9], [4, 4, 2], []]], "int32")
    (tmp_path / "twin.idx").replace(good.with_suffix(".idx"))
    with pytest.raises(DatasetError, match=r"m\.idx: checksum differs from the one in m\.json: mismatched pair"):
        IndexedDataset(good)


def test_sidecar_sizes_and_bin_checksum(good):
    _sidecar(good, files={"bin": {"bytes": 44, "sha256": "0" * 64}, "idx": {"bytes": 1, "sha256": "0"}})
    with pytest.raises(DatasetError, match=r"m\.bin: 40 bytes, but m\.json was written for 44: mismatched pair"):
        IndexedDataset(good)
    _sidecar(good)
    s = json.loads(good.with_suffix(".json").read_text())
    s["files"]["bin"]["sha256"] = "f" * 64
    good.with_suffix(".json").write_text(json.dumps(s))
    ds = IndexedDataset(good)  # opening checks sizes and the .idx checksum only
    with pytest.raises(DatasetError, match=r"m\.bin: checksum differs .*corrupt or mismatched pair"):
        ds.verify()


def test_unreadable_or_foreign_sidecar(good):
    good.with_suffix(".json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"m\.json: unreadable sidecar"):
        IndexedDataset(good)
    good.with_suffix(".json").write_text(json.dumps({"some": "other tool"}))
    assert IndexedDataset(good).sidecar is None
    _sidecar(good, version=2)
    with pytest.raises(DatasetError, match=r"m\.json: unsupported sidecar version 2"):
        IndexedDataset(good)


def test_inspect_command(good, capsys):
    from ampipe.data.__main__ import main
    assert main(["inspect", str(good), "--valid-fraction", "0.3", "--split-seed", "3"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_documents"] == 3 and s["num_sequences"] == 6 and s["num_tokens"] == 10 and s["max_token_id"] == 200
    assert s["sidecar"] is False and s["eod_id"] is None
    assert s["split_origin"] == {"from": "rule", "seed": 3, "valid_fraction": 0.3}
    assert s["split"]["valid"]["documents"] == 1 and s["split"]["train"]["documents"] == 2
    good.with_suffix(".bin").write_bytes(b"\x00" * 8)
    assert main(["inspect", str(good)]) == 2
    assert "m.bin: truncated .bin" in capsys.readouterr().err


def test_sidecar_split_lists_must_fit_the_documents(good):
    _sidecar(good, split={"seed": 3, "valid_fraction": 0.3, "train": [0, 2], "valid": [3]})
    with pytest.raises(DatasetError, match=r"m\.json: split lists name documents outside 0 \.\. 2"):
        IndexedDataset(good)
    _sidecar(good, split={"seed": 3, "valid_fraction": 0.3, "train": [0, 1], "valid": [1]})
    with pytest.raises(DatasetError, match=r"m\.json: split lists name a document twice"):
        IndexedDataset(good)
