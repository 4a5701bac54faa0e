"""SequenceStore: construction, validation and the leave-one-out views, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2rec import SequenceStore, sample_candidates

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


def _read_only(a: np.ndarray) -> np.ndarray:
    """An array over memory nothing can write (immutable bytes), as a read-only mmap is."""
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=a.dtype)


@given(st.lists(st.lists(st.integers(1, 25), min_size=0, max_size=10), min_size=1, max_size=15))
@settings(max_examples=40, deadline=None)
def test_a_store_read_in_place_answers_as_a_copied_one(seqs):
    offsets = np.concatenate([[0], np.cumsum([len(q) for q in seqs])]).astype(np.int64)
    items = np.array([i for q in seqs for i in q], dtype=np.int64)
    copied = SequenceStore(offsets, items, 25)
    borrowed = SequenceStore(_read_only(offsets), _read_only(items.astype(np.int32)), 25)
    assert borrowed.borrowed and not copied.borrowed
    users = np.array([u for u, q in enumerate(seqs) if len(q) >= 3], dtype=np.int64)
    np.testing.assert_array_equal(borrowed.items, items)
    np.testing.assert_array_equal(borrowed.offsets, offsets)
    for h in (0, 2):
        np.testing.assert_array_equal(borrowed.popularity(h), copied.popularity(h))
    np.testing.assert_array_equal(borrowed.histories(users, 1)[1], copied.histories(users, 1)[1])
    if users.size:
        for split in ("valid", "test"):
            for a, b in zip(borrowed.eval_inputs(users, 4, split), copied.eval_inputs(users, 4, split)):
                np.testing.assert_array_equal(a, b)
        # the exclusions of sampled candidates come from the distinct histories
        t = borrowed.eval_inputs(users, 4, "test")[1]
        np.testing.assert_array_equal(
            sample_candidates(borrowed, users, t, 5, seed=3),
            sample_candidates(copied, users, t, 5, seed=3),
        )


def test_only_read_only_exact_arrays_are_borrowed(tmp_path):
    offsets, items = np.array([0, 3, 5]), np.array([1, 2, 3, 2, 2])
    assert not SequenceStore(offsets, items.astype(np.int32)).borrowed  # writable: copied
    # a cleared flag is not enough when the memory can be made writable again
    owned = items.astype(np.int32)
    owned.flags.writeable = False
    s = SequenceStore(_read_only(offsets), owned)
    assert not s.borrowed
    owned.flags.writeable = True
    owned[0] = 3  # the store holds its own copy
    np.testing.assert_array_equal(s.sequence(0), [1, 2, 3])
    base = items.astype(np.int32)
    view = base[:]
    view.flags.writeable = False
    assert not SequenceStore(_read_only(offsets), view).borrowed
    # a read-only memory map is the case this is for
    np.save(tmp_path / "o.npy", offsets)
    np.save(tmp_path / "i.npy", items.astype(np.int32))
    mapped = SequenceStore(np.load(tmp_path / "o.npy", mmap_mode="r"),
                           np.load(tmp_path / "i.npy", mmap_mode="r"))
    assert mapped.borrowed
    assert not SequenceStore(_read_only(offsets), _read_only(items)).borrowed  # int64 items
    assert not SequenceStore(_read_only(offsets), _read_only(items.astype(np.int16))).borrowed
    strided = _read_only(np.repeat(items.astype(np.int32), 2))[::2]
    assert not SequenceStore(_read_only(offsets), strided).borrowed  # not contiguous
    s = SequenceStore(_read_only(offsets), _read_only(items.astype(np.int32)))
    assert s.borrowed and s.n_items == 3


def test_a_borrowed_array_outlives_its_last_python_name():
    import gc

    items = _read_only(np.array([4, 1, 4, 2, 3], dtype=np.int32))
    s = SequenceStore(_read_only(np.array([0, 2, 5])), items)
    del items
    gc.collect()
    np.testing.assert_array_equal(s.items, [4, 1, 4, 2, 3])
    np.testing.assert_array_equal(s.sequence(1), [4, 2, 3])


@pytest.mark.parametrize(
    ("offsets", "items", "message"),
    [
        ([0, 2], [1, -3], r"items\[1\]=-3 is not a valid item id"),
        ([0, 2], [1, 0], r"items\[1\]=0 is not a valid item id"),
        ([0, 3, 2], [1, 2], r"offsets are not monotone: offsets\[2\]=2 < offsets\[1\]=3"),
        ([0, -1, 2], [1, 2], r"offsets\[1\]=-1 < offsets\[0\]=0"),
        ([0, 3], [1, 2], r"offsets\[-1\]=3 must equal len\(items\)=2"),
        ([1, 2], [1, 2], r"offsets\[0\]=1 must be 0"),
    ],
)
def test_borrowed_arrays_are_validated_as_copied_ones(offsets, items, message):
    with pytest.raises(ValueError, match=message):
        SequenceStore(_read_only(np.array(offsets, dtype=np.int64)),
                      _read_only(np.array(items, dtype=np.int32)))
    with pytest.raises(ValueError, match=message):
        SequenceStore(np.array(offsets), np.array(items))
