"""Bad input at the Rust boundary: a ValueError or TypeError naming the argument and the value,
never a panic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import h2rec
from h2rec import SequenceStore, TrainSampler

STORE = SequenceStore.from_sequences([[1, 2, 3, 4], [2, 3, 4, 5]])
X = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "call,exc,message",
    [
        (lambda: SequenceStore(np.array([0, 2, 1]), np.array([1, 2])), ValueError,
         r"offsets\[2\]=1 < offsets\[1\]=2"),
        (lambda: SequenceStore(np.array([1, 2]), np.array([1, 2])), ValueError, r"offsets\[0\]=1"),
        (lambda: SequenceStore(np.array([0, 3]), np.array([1, 2])), ValueError, r"offsets\[-1\]=3"),
        (lambda: SequenceStore(np.array([0, 2]), np.array([1, 0])), ValueError, r"items\[1\]=0"),
        (lambda: SequenceStore(np.array([0, 2]), np.array([1, 9001]), n_items=3706), ValueError,
         r"items\[1\]=9001 > n_items=3706"),
        (lambda: SequenceStore(np.array([0, 2.5]), np.array([1, 2])), TypeError, "offsets.*float64"),
        (lambda: SequenceStore(np.array([[0, 2]]), np.array([1, 2])), ValueError, r"offsets must be 1-D"),
        (lambda: SequenceStore("abc", np.array([1, 2])), TypeError, "offsets"),
        (lambda: SequenceStore.from_sequences([[1, 2], ["x"]]), TypeError, r"sequences\[1\]"),
        (lambda: TrainSampler(STORE, 0, 4), ValueError, "max_len=0"),
        (lambda: TrainSampler(STORE, 5, 0), ValueError, "batch_size=0"),
        (lambda: TrainSampler(STORE, 5, 2, negative_sampling="zipf"), ValueError, "negative_sampling='zipf'"),
        (lambda: TrainSampler(SequenceStore.from_sequences([[1, 2, 3], [1, 2]], n_items=9), 5, 2), ValueError,
         "user row 1 has 2 items"),
        (lambda: TrainSampler(SequenceStore.from_sequences([[1, 2, 3, 1, 2]]), 5, 2), ValueError,
         "all 3 items in its training prefix"),
        (lambda: TrainSampler(STORE, 5, 2).epoch(0, rank=2, world_size=2), ValueError, "rank=2"),
        (lambda: TrainSampler(STORE, 5, 2, n_threads=0), ValueError, "n_threads=0"),
        (lambda: STORE.eval_inputs(np.array([0, 7]), 5, "test"), ValueError, r"users\[1\]=7"),
        (lambda: STORE.eval_inputs(np.array([0]), 5, "train"), ValueError, "split='train'"),
        (lambda: h2rec.sample_candidates(STORE, [0], [99]), ValueError, r"targets\[0\]=99"),
        (lambda: h2rec.sample_candidates(STORE, [0, 1], [2]), ValueError, "users has 2 entries"),
        (lambda: h2rec.residual_kmeans(np.where(np.arange(200).reshape(50, 4) == 37, np.nan, X)),
         ValueError, r"x\[9, 1\]=NaN is not finite"),
        (lambda: h2rec.residual_kmeans(np.where(np.arange(200).reshape(50, 4) == 5, np.inf, X)),
         ValueError, r"x\[1, 1\]=inf"),
        (lambda: h2rec.residual_kmeans(X, codebook_size=51), ValueError, "codebook_size=51 clusters is more than the 50 points"),
        (lambda: h2rec.residual_kmeans(X[0]), ValueError, r"x must be 2-D, got shape \(4,\)"),
        (lambda: h2rec.residual_kmeans(X.astype(str)), TypeError, "x must be an array of real numbers"),
        (lambda: h2rec.residual_kmeans(X, seed=-1), ValueError, "seed=-1"),
        (lambda: h2rec.kmeans(X, 0), ValueError, "k=0"),
        (lambda: h2rec.assign_codes(X, np.zeros((2, 3, 5), np.float32)), ValueError, "dimension 5"),
        (lambda: h2rec.reconstruction_errors(X, np.zeros((50, 3), np.int64), np.zeros((2, 3, 4), np.float32)),
         ValueError, r"codes has shape \[50, 3\]"),
        (lambda: h2rec.code_report(np.array([[0, 7]]), 4), ValueError, r"codes\[0, 1\]=7 is not in 0..4"),
        (lambda: h2rec.cooccurrence(STORE, window=0), ValueError, "window=0"),
        (lambda: h2rec.cooccurrence(STORE, min_weight=2.0), ValueError, "min_weight=2"),
    ],
)
def test_bad_input(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_inputs_are_coerced_without_changing_values():
    a = SequenceStore(np.array([0, 2, 4], dtype=np.int32), [3, 1, 2, 2])
    assert a.items.dtype == np.int64 and a.items.tolist() == [3, 1, 2, 2]
    f64 = X.astype(np.float64)
    np.testing.assert_array_equal(h2rec.kmeans(f64, 3, seed=1)[1], h2rec.kmeans(X, 3, seed=1)[1])
    strided = np.asfortranarray(X)
    np.testing.assert_array_equal(h2rec.kmeans(strided, 3, seed=1)[1], h2rec.kmeans(X, 3, seed=1)[1])


@given(st.lists(st.integers(-3, 12), max_size=8), st.lists(st.integers(-2, 12), max_size=10),
       st.one_of(st.none(), st.integers(-1, 12)))
@settings(max_examples=200, deadline=None)
def test_any_csr_is_accepted_or_rejected_cleanly(offsets, items, n_items):
    try:
        s = SequenceStore(np.array(offsets, dtype=np.int64), np.array(items, dtype=np.int64), n_items)
    except ValueError:
        return
    assert s.n_interactions == len(items)
    assert s.lengths().sum() == len(items)


def test_extension_is_a_release_build():
    assert h2rec.build_profile in ("release", "debug")
