"""Megatron-LM's MMapIndexedDataset (``PREFIX.bin`` + ``PREFIX.idx``), memory-mapped, checked.

Layout (megatron/core/datasets/indexed_dataset.py), little-endian:

- ``.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version (1), ``<B`` dtype code, ``<Q`` sequence count
  S, ``<Q`` document count D, then int32 ``sizes[S]`` (tokens per sequence), int64
  ``pointers[S]`` (byte offset of each sequence in ``.bin``), int64 ``doc_idx[D]`` (0, then the
  sequence index that ends each document; D = documents + 1); a multimodal dataset adds int8
  ``modes[S]``.
- ``.bin``: every sequence's tokens back to back.

A document is the run of sequences ``doc_idx[d] .. doc_idx[d+1]``: one sequence when written by
``ampipe data prepare`` or by Megatron's preprocess_data.py without ``--split-sentences``, one per
sentence with it. Every inconsistency is a :class:`DatasetError` naming the file.

An optional sidecar ``PREFIX.json`` (written by ``ampipe data prepare``) records the tokenizer,
vocabulary, EOD id, the train/valid document lists, and the pair's sizes and checksums; when it
is present the pair must match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from ampipe.data.split import DEFAULT_SEED, DEFAULT_VALID_FRACTION, split_documents

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34
SIDECAR_FORMAT = "ampipe.indexed_dataset"
SIDECAR_VERSION = 1

#: Megatron's DType codes. 6 (float64) and 7 (float32) exist in its enum but hold no token ids.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 8: np.dtype(np.uint16),
}
_FLOAT_CODES = {6: "float64", 7: "float32"}


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, or does not match its partner; the message names the file."""


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IndexedDataset:
    """Documents of a Megatron-LM indexed dataset: ``len(ds)`` documents, ``ds[d]`` the tokens of
    document d (a read-only view of the memory map, in the file's dtype).

    Attributes: ``sizes`` (tokens per sequence, int32), ``pointers`` (byte offset per sequence),
    ``doc_idx`` (int64, documents + 1 entries), ``doc_sizes`` (tokens per document), ``dtype``,
    ``sidecar`` (the parsed PREFIX.json, or None), ``prefix``.
    """

    def __init__(self, prefix: str | os.PathLike[str]):
        self.prefix = str(prefix)
        self.idx_path = Path(self.prefix + ".idx")
        self.bin_path = Path(self.prefix + ".bin")
        self.sidecar_path = Path(self.prefix + ".json")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DatasetError(f"{p}: no such file (a dataset is the pair {self.prefix}.bin + .idx)")
        self._read_index()
        self._check_bin()
        self.sidecar = self._read_sidecar()
        self._max_token_id: int | None = None

    # ----- reading and checking -------------------------------------------------------------

    def _read_index(self) -> None:
        p = self.idx_path
        nbytes = p.stat().st_size
        if nbytes < HEADER_BYTES:
            raise DatasetError(f"{p}: short .idx: {nbytes} bytes, the header alone needs {HEADER_BYTES}")
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:9] != INDEX_MAGIC:
            raise DatasetError(f"{p}: bad magic {head[:9]!r}, expected {INDEX_MAGIC!r} (not a Megatron MMapIndexedDataset index)")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != INDEX_VERSION:
            raise DatasetError(f"{p}: unsupported index version {version}, expected {INDEX_VERSION}")
        code = head[17]
        if code in _FLOAT_CODES:
            raise DatasetError(f"{p}: dtype code {code} ({_FLOAT_CODES[code]}) holds no token ids")
        if code not in DTYPE_CODES:
            raise DatasetError(f"{p}: unknown dtype code {code} (Megatron's codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)")
        self.dtype = DTYPE_CODES[code]
        s_count, d_count = struct.unpack_from("<QQ", head, 18)
        need = HEADER_BYTES + 4 * s_count + 8 * s_count + 8 * d_count
        if nbytes < need:
            raise DatasetError(f"{p}: truncated .idx: {nbytes} bytes, but {s_count} sequences and {d_count} document indices need {need}")
        if nbytes not in (need, need + s_count):  # + int8 modes per sequence: a multimodal dataset
            raise DatasetError(f"{p}: {nbytes - need} bytes after the document indices; {s_count} sequences and {d_count} document indices make {need} bytes")
        self.multimodal = nbytes == need + s_count and s_count > 0
        mm = np.memmap(p, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sizes = np.frombuffer(mm, dtype="<i4", count=s_count, offset=off)
        off += 4 * s_count
        self.pointers = np.frombuffer(mm, dtype="<i8", count=s_count, offset=off)
        off += 8 * s_count
        self.doc_idx = np.frombuffer(mm, dtype="<i8", count=d_count, offset=off)
        self._idx_map = mm
        if d_count < 1 or self.doc_idx[0] != 0:
            raise DatasetError(f"{p}: document indices must start with 0, got {self.doc_idx[:1].tolist()}")
        if self.doc_idx[-1] != s_count:
            raise DatasetError(f"{p}: the last document index is {int(self.doc_idx[-1])}, the sequence count is {s_count}")
        if np.any(np.diff(self.doc_idx) < 0):
            raise DatasetError(f"{p}: document indices decrease at document {int(np.argmax(np.diff(self.doc_idx) < 0))}")
        if np.any(self.sizes < 0):
            raise DatasetError(f"{p}: negative sequence size at sequence {int(np.argmax(self.sizes < 0))}")
        item = self.dtype.itemsize
        starts = np.concatenate(([0], np.cumsum(self.sizes, dtype=np.int64)))
        expect = starts[:-1] * item
        bad = np.flatnonzero(self.pointers != expect)
        if bad.size:
            j = int(bad[0])
            raise DatasetError(f"{p}: sequence {j} points at byte {int(self.pointers[j])}, but the sizes before it end at byte {int(expect[j])}")
        self._token_starts = starts  # token offset of each sequence in .bin
        self.num_tokens = int(starts[-1])

    def _check_bin(self) -> None:
        p = self.bin_path
        nbytes = p.stat().st_size
        need = self.num_tokens * self.dtype.itemsize
        if nbytes < need:
            raise DatasetError(f"{p}: truncated .bin: {nbytes} bytes, but {self.idx_path.name} describes {self.num_tokens} {self.dtype.name} tokens = {need} bytes")
        if nbytes > need:
            raise DatasetError(f"{p}: {nbytes} bytes, but {self.idx_path.name} describes {need} ({self.num_tokens} {self.dtype.name} tokens): not this index's .bin")
        # np.memmap refuses an empty file; an empty dataset has no tokens to map.
        self._bin = np.memmap(p, dtype=self.dtype, mode="r") if nbytes else np.zeros(0, self.dtype)

    def _read_sidecar(self) -> dict | None:
        p = self.sidecar_path
        if not p.exists():
            return None
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"{p}: unreadable sidecar ({e}); remove it to read the pair without one") from None
        if not isinstance(s, dict) or s.get("format") != SIDECAR_FORMAT:
            return None  # some other tool's JSON beside the pair: not ours to judge
        if s.get("version") != SIDECAR_VERSION:
            raise DatasetError(f"{p}: unsupported sidecar version {s.get('version')!r}, expected {SIDECAR_VERSION}")
        try:
            files = s["files"]
            checks = [
                (self.bin_path, files["bin"]["bytes"], None),
                (self.idx_path, files["idx"]["bytes"], files["idx"]["sha256"]),
            ]
            n_docs = int(s["num_documents"])
            for name in ("train", "valid"):
                s["split"][name] = np.asarray(s["split"][name], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{p}: malformed sidecar: {type(e).__name__} {e}") from None
        for path, size, digest in checks:
            actual = path.stat().st_size
            if actual != size:
                raise DatasetError(f"{path}: {actual} bytes, but {p.name} was written for {size}: mismatched pair")
            if digest is not None and _sha256(path) != digest:
                raise DatasetError(f"{path}: checksum differs from the one in {p.name}: mismatched pair")
        if n_docs != len(self):
            raise DatasetError(f"{p}: records {n_docs} documents, {self.idx_path.name} has {len(self)}")
        train, valid = s["split"]["train"], s["split"]["valid"]
        ids = np.concatenate((train, valid))
        if ids.size and (ids.min() < 0 or ids.max() >= n_docs):
            raise DatasetError(f"{p}: split lists name documents outside 0 .. {n_docs - 1}")
        if np.unique(ids).size != ids.size:
            raise DatasetError(f"{p}: split lists name a document twice (train and valid must be disjoint)")
        return s

    def verify(self) -> None:
        """The full check: also the .bin's checksum against the sidecar (reads the whole file).
        Without a sidecar there is no checksum; the structure was checked on opening."""
        if self.sidecar is not None and _sha256(self.bin_path) != self.sidecar["files"]["bin"]["sha256"]:
            raise DatasetError(f"{self.bin_path}: checksum differs from the one in {self.sidecar_path.name}: corrupt or mismatched pair")

    # ----- access -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_sequences(self) -> int:
        return len(self.sizes)

    @property
    def doc_sizes(self) -> np.ndarray:
        """Tokens per document (int64)."""
        return np.diff(self._token_starts[self.doc_idx])

    def doc_token_range(self, d: int) -> tuple[int, int]:
        """The [start, stop) token offsets of document d in the .bin."""
        return int(self._token_starts[self.doc_idx[d]]), int(self._token_starts[self.doc_idx[d + 1]])

    def doc_token_ranges(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The start and stop token offsets (int64 arrays) of the documents ``docs``."""
        docs = np.asarray(docs, dtype=np.int64)
        return self._token_starts[self.doc_idx[docs]], self._token_starts[self.doc_idx[docs + 1]]

    def __getitem__(self, d: int) -> np.ndarray:
        n = len(self)
        if not isinstance(d, (int, np.integer)):
            raise TypeError(f"document index must be an integer, got {type(d).__name__}")
        if not -n <= d < n:
            raise IndexError(f"{self.prefix}: document {d} out of range ({n} documents)")
        start, stop = self.doc_token_range(int(d) % n)
        return self._bin[start:stop]

    def sequence(self, j: int) -> np.ndarray:
        """The tokens of sequence j (a sentence, for datasets made with --split-sentences)."""
        return self._bin[self._token_starts[j]:self._token_starts[j + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the whole .bin (a view)."""
        return self._bin[start:stop]

    def max_token_id(self) -> int:
        """The largest token id in the .bin (scanned once, then cached); -1 for an empty dataset."""
        if self._max_token_id is None:
            m = -1
            step = 1 << 24
            for i in range(0, self.num_tokens, step):
                m = max(m, int(self._bin[i:i + step].max()))
            self._max_token_id = m
        return self._max_token_id

    def split_documents(self, split: str, *, seed: int | None = None,
                        valid_fraction: float | None = None) -> np.ndarray:
        """The document ids of ``split`` ("train", "valid" or "all"), ascending.

        With a sidecar its lists are the split (they were made when the dataset was prepared;
        ``seed`` and ``valid_fraction`` are then not used -- :meth:`split_origin` says which
        applied). Without one the documents are split by the rule of :mod:`ampipe.data.split`,
        from ``seed`` and ``valid_fraction`` (defaults as ``ampipe data prepare``'s).
        """
        if split == "all":
            return np.arange(len(self), dtype=np.int64)
        if split not in ("train", "valid"):
            raise ValueError(f"split: must be 'train', 'valid' or 'all', got {split!r}")
        if self.sidecar is not None:
            return self.sidecar["split"][split]
        train, valid = split_documents(len(self), DEFAULT_SEED if seed is None else seed,
                                       DEFAULT_VALID_FRACTION if valid_fraction is None else valid_fraction)
        return train if split == "train" else valid

    def split_origin(self, *, seed: int | None = None, valid_fraction: float | None = None) -> dict:
        """Where :meth:`split_documents` takes the split from, for logs and summaries:
        ``{"from": "sidecar" | "rule", "seed": ..., "valid_fraction": ...}``."""
        if self.sidecar is not None:
            sp = self.sidecar["split"]
            return {"from": "sidecar", "seed": sp["seed"], "valid_fraction": sp["valid_fraction"]}
        return {"from": "rule", "seed": DEFAULT_SEED if seed is None else seed,
                "valid_fraction": DEFAULT_VALID_FRACTION if valid_fraction is None else valid_fraction}

    @property
    def eod_id(self) -> int | None:
        return None if self.sidecar is None else int(self.sidecar["eod_id"])

    @property
    def vocab_size(self) -> int | None:
        return None if self.sidecar is None else int(self.sidecar["vocab_size"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}: {len(self)} documents, {self.num_tokens} {self.dtype.name} tokens)"
