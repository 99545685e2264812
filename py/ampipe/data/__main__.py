"""``python -m ampipe.data inspect PREFIX [--verify]``: open and check a dataset, print its summary as JSON.

What ``ampipe data inspect`` and the training command run before any rank starts, so a missing,
corrupt or too-small dataset is reported once, naming the file. Exit 2 on a DatasetError.
"""

from __future__ import annotations

import argparse
import json
import sys

from ampipe.data.indexed import DatasetError, IndexedDataset


def summary(ds: IndexedDataset, split_seed: int | None = None, valid_fraction: float | None = None) -> dict:
    splits = {name: ds.split_documents(name, seed=split_seed, valid_fraction=valid_fraction) for name in ("train", "valid")}
    sizes = ds.doc_sizes
    return {
        "prefix": ds.prefix,
        "dtype": ds.dtype.name,
        "num_documents": len(ds),
        "num_sequences": ds.num_sequences,
        "num_tokens": ds.num_tokens,
        "max_token_id": ds.max_token_id(),
        "sidecar": ds.sidecar is not None,
        "tokenizer": None if ds.sidecar is None else ds.sidecar.get("tokenizer"),
        "vocab_size": ds.vocab_size,
        "eod_id": ds.eod_id,
        "split": {name: {"documents": int(len(d)), "tokens": int(sizes[d].sum())} for name, d in splits.items()},
        "split_origin": ds.split_origin(seed=split_seed, valid_fraction=valid_fraction),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ampipe.data")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="check a PREFIX.bin/.idx pair and print its summary as JSON")
    ins.add_argument("prefix")
    ins.add_argument("--split-seed", type=int, default=None, help="split seed for a dataset without a sidecar")
    ins.add_argument("--valid-fraction", type=float, default=None, help="valid fraction for a dataset without a sidecar")
    ins.add_argument("--verify", action="store_true", help="also check the .bin's checksum against the sidecar")
    a = p.parse_args(argv)
    try:
        ds = IndexedDataset(a.prefix)
        if a.verify:
            ds.verify()
        s = summary(ds, a.split_seed, a.valid_fraction)
    except (DatasetError, ValueError) as e:
        print(f"{e}", file=sys.stderr)
        return 2
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
