"""SequenceStore: construction, validation and the leave-one-out views, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2rec import SequenceStore

SEQS = [[3, 1, 2, 3, 5], [4, 4, 2], [1, 2, 3, 4, 5, 6]]


def test_from_sequences_matches_csr_arrays():
    a = SequenceStore.from_sequences(SEQS)
    b = SequenceStore(np.array([0, 5, 8, 14]), np.concatenate([np.array(s) for s in SEQS]))
    for s in (a, b):
        assert (s.n_users, s.n_items, s.n_interactions, len(s)) == (3, 6, 14, 3)
        np.testing.assert_array_equal(s.offsets, [0, 5, 8, 14])
        np.testing.assert_array_equal(s.lengths(), [5, 3, 6])
        np.testing.assert_array_equal(s.sequence(1), [4, 4, 2])
        assert s.items.dtype == np.int64 and s.offsets.dtype == np.int64


def test_n_items_may_exceed_the_largest_id():
    s = SequenceStore.from_sequences([[1, 2]], n_items=10)
    assert s.n_items == 10
    assert s.popularity().shape == (11,)


@given(st.lists(st.lists(st.integers(1, 30), min_size=0, max_size=12), min_size=1, max_size=20),
       st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_popularity_matches_numpy(seqs, holdout):
    s = SequenceStore.from_sequences(seqs, n_items=30)
    want = np.zeros(31, dtype=np.int64)
    for q in seqs:
        for it in q[: max(len(q) - holdout, 0)]:
            want[it] += 1
    np.testing.assert_array_equal(s.popularity(holdout), want)


def _oracle_inputs(seq, max_len, drop):
    inp = seq[: len(seq) - drop][-max_len:]
    return [0] * (max_len - len(inp)) + inp, seq[len(seq) - drop]


@pytest.mark.parametrize("split,drop", [("valid", 2), ("test", 1)])
@pytest.mark.parametrize("max_len", [1, 3, 8])
def test_eval_inputs_left_padded(split, drop, max_len):
    s = SequenceStore.from_sequences(SEQS)
    users = np.array([2, 0, 1, 0])
    inputs, targets = s.eval_inputs(users, max_len, split)
    assert inputs.shape == (4, max_len) and targets.shape == (4,)
    for row, u in enumerate(users):
        want_inp, want_t = _oracle_inputs(SEQS[u], max_len, drop)
        assert inputs[row].tolist() == want_inp
        assert targets[row] == want_t


def test_histories_csr():
    s = SequenceStore.from_sequences(SEQS)
    ptr, items = s.histories(np.array([1, 2]), holdout=2)
    assert ptr.tolist() == [0, 1, 5]
    assert items.tolist() == [4, 1, 2, 3, 4]
