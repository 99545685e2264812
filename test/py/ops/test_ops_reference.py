"""The pure-torch reference against plain-loop oracles (it is the spec the kernels follow)."""

from __future__ import annotations

import pytest
import torch

from ampipe.ops import reference

from ops_helpers import naive_row_map, random_indices


hypothesis = pytest.importorskip("hypothesis")  # a dev dependency; this module is CPU-only
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 30),
    K=st.integers(1, 4),
    E=st.integers(1, 7),
    cap=st.one_of(st.none(), st.integers(0, 12)),
    distinct=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_make_row_map_matches_loop(T, K, E, cap, distinct, seed):
    indices = random_indices(T, K, E, torch.Generator().manual_seed(seed), distinct)
    row_map, tpe = reference.make_row_map(indices, E, cap)
    want_rows, want_tpe = naive_row_map(indices, E, cap)
    assert torch.equal(row_map, want_rows)
    assert torch.equal(tpe, want_tpe)


def test_dropless_rows_are_a_permutation_grouped_by_expert():
    indices = random_indices(64, 2, 8, torch.Generator().manual_seed(3))
    row_map, tpe = reference.make_row_map(indices, 8)
    assert torch.equal(row_map.flatten().sort().values, torch.arange(128))
    bounds = torch.cumsum(tpe, 0)
    # Every slot's row falls inside its expert's run.
    expert_of_row = torch.searchsorted(bounds, row_map, right=True)
    assert torch.equal(expert_of_row, indices)


def test_first_choices_outrank_second_choices_when_dropping():
    # Expert 0 is every token's second choice and token 3's first choice: with capacity 1
    # token 3's first choice must win over token 0's earlier second choice.
    indices = torch.tensor([[1, 0], [2, 0], [3, 0], [0, 1]])
    row_map, tpe = reference.make_row_map(indices, 4, capacity=1)
    assert row_map[3, 0] == 0
    assert (row_map[:3, 1] == -1).all()
    assert tpe.tolist() == [1, 1, 1, 1]


def test_permute_unpermute_match_loops():
    gen = torch.Generator().manual_seed(1)
    T, K, E, H, cap = 12, 3, 4, 5, 5
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, K, generator=gen, dtype=torch.float64)
    indices = random_indices(T, K, E, gen)
    row_map, _ = reference.make_row_map(indices, E, cap)
    buffer = reference.permute(x, row_map, E * cap)
    want = torch.zeros(E * cap, H, dtype=torch.float64)
    out_want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_map[t, k])
            if r >= 0:
                want[r] = x[t]
                out_want[t] += gates[t, k] * x[t]
    assert torch.equal(buffer, want)
    torch.testing.assert_close(reference.unpermute(buffer, row_map, gates), out_want)
