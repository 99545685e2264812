"""TokenWindows: the windows of the split's concatenated documents (by hand), every epoch a
permutation of them, and sample(i) a function of (seed, i) alone."""

from __future__ import annotations

import numpy as np
import pytest

from ampipe.data import DatasetError, IndexedDataset, TokenWindows
from megatron_writer import write_megatron


def test_windows_of_one_document_by_hand(tmp_path):
    write_megatron(tmp_path / "m", [[list(range(10, 21))]], "uint16")  # 11 tokens
    tw = TokenWindows(tmp_path / "m", 3, split="all")
    assert tw.num_samples == 3  # (11 - 1) // 3
    assert [tw.window(k).tolist() for k in range(3)] == [[10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19]]
    assert sorted(tw.sample(i).tolist() for i in range(3)) == [[10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19]]
    assert tw.sample(0).dtype == np.int64 and tw.sample(0).shape == (4,)


def test_windows_cross_documents_in_the_shuffled_order(tmp_path):
    docs = [[[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9]], [[10]]]
    write_megatron(tmp_path / "m", docs, "int32")
    tw = TokenWindows(tmp_path / "m", 2, split="all", seed=11)
    assert sorted(tw.documents.tolist()) == [0, 1, 2, 3]
    concat = [t for d in tw.documents for t in docs[d][0]]
    assert tw.num_tokens == 10 and tw.num_samples == 4
    assert [tw.window(k).tolist() for k in range(4)] == [concat[2 * k:2 * k + 3] for k in range(4)]
    orders = {tuple(TokenWindows(tmp_path / "m", 2, split="all", seed=s).documents.tolist()) for s in range(20)}
    assert len(orders) > 1  # the seed shuffles the documents


def test_every_epoch_is_a_permutation_and_samples_depend_on_seed_and_index_alone(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 256, size=int(rng.integers(5, 60))).tolist()] for _ in range(30)]
    write_megatron(tmp_path / "m", docs, "uint8")
    tw = TokenWindows(tmp_path / "m", 8, split="train", seed=5)
    n = tw.num_samples
    windows = sorted(tw.window(k).tolist() for k in range(n))
    epoch0 = [tw.sample(i).tolist() for i in range(n)]
    epoch1 = [tw.sample(n + i).tolist() for i in range(n)]
    assert sorted(epoch0) == windows and sorted(epoch1) == windows
    assert epoch0 != epoch1
    # a fresh reader (a resumed run) gives the same sample for any index, in any order
    again = TokenWindows(IndexedDataset(tmp_path / "m"), 8, split="train", seed=5)
    for i in [7 * n + 3, 0, 10**9, n - 1, 5]:
        assert np.array_equal(again.sample(i), tw.sample(i))
    assert again.samples([3, 1]).tolist() == [tw.sample(3).tolist(), tw.sample(1).tolist()]
    other = TokenWindows(tmp_path / "m", 8, split="train", seed=6)
    assert [other.sample(i).tolist() for i in range(n)] != epoch0
    # train and valid windows come from disjoint documents
    valid = TokenWindows(tmp_path / "m", 8, split="valid", seed=5)
    assert not set(valid.documents.tolist()) & set(tw.documents.tolist())
    with pytest.raises(IndexError, match="sample index must be an integer >= 0"):
        tw.sample(-1)


def test_a_split_shorter_than_one_window_is_named(tmp_path):
    write_megatron(tmp_path / "m", [[[1, 2, 3]], [[4, 5, 6]]], "uint16")
    with pytest.raises(DatasetError, match=r"split 'valid' has 3 tokens in 1 documents, fewer than one window of seq_length \+ 1 = 5"):
        TokenWindows(tmp_path / "m", 4, split="valid")
    with pytest.raises(ValueError, match="seq_length: must be a positive integer"):
        TokenWindows(tmp_path / "m", 0, split="all")
