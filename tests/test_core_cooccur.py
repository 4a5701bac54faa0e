"""Co-occurrence mining against a dictionary-counting Python oracle."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from h2rec import SequenceStore, cooccurrence


def oracle(seqs, n_items, window, top_k, lo_w, hi_w, holdout):
    counts: Counter[tuple[int, int]] = Counter()
    for q in seqs:
        p = q[: max(len(q) - holdout, 0)]
        for i in range(len(p)):
            for j in range(i + 1, min(len(p), i + window + 1)):
                if p[i] != p[j]:
                    counts[p[i], p[j]] += 1
                    counts[p[j], p[i]] += 1
    row = Counter()
    for (a, _), c in counts.items():
        row[a] += c
    total = sum(counts.values())
    out = {}
    for a in range(n_items + 1):
        cand = []
        for (x, b), c in counts.items():
            if x == a:
                pmi = math.log(c * total / (row[a] * row[b]))
                if pmi > 0:
                    cand.append((-pmi, -c, b, c, pmi))
        cand.sort()
        cand = cand[:top_k]
        if cand:
            hi, lo = cand[0][4], cand[-1][4]
            out[a] = [(b, c, lo_w + (hi_w - lo_w) * (p - lo) / (hi - lo) if hi > lo else hi_w)
                      for _, _, b, c, p in cand]
        else:
            out[a] = []
    return out


@given(st.lists(st.lists(st.integers(1, 12), max_size=15), min_size=1, max_size=25),
       st.integers(1, 4), st.integers(1, 6), st.integers(0, 2))
@settings(max_examples=60, deadline=None)
def test_matches_oracle(seqs, window, top_k, holdout):
    store = SequenceStore.from_sequences(seqs, n_items=12)
    indptr, idx, w, c = cooccurrence(store, window=window, top_k=top_k, holdout=holdout)
    want = oracle(seqs, 12, window, top_k, 0.3, 1.0, holdout)
    assert indptr.shape == (14,) and indptr[0] == 0 and indptr[-1] == len(idx) == len(w) == len(c)
    for a in range(13):
        lo, hi = indptr[a], indptr[a + 1]
        got = list(zip(idx[lo:hi].tolist(), c[lo:hi].tolist()))
        assert got == [(b, cnt) for b, cnt, _ in want[a]]
        np.testing.assert_allclose(w[lo:hi], [x for _, _, x in want[a]], rtol=1e-5)


def test_only_training_prefix_counts_and_threads_agree():
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6]]
    store = SequenceStore.from_sequences(seqs)
    indptr, idx, _, _ = cooccurrence(store, window=3, holdout=2)
    assert idx[indptr[1]:indptr[2]].tolist() == [2]  # 3..6 are held out
    rng = np.random.default_rng(0)
    big = SequenceStore.from_sequences([rng.integers(1, 300, 30).tolist() for _ in range(500)])
    a = cooccurrence(big, n_threads=1)
    b = cooccurrence(big, n_threads=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
