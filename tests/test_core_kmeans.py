"""Residual k-means, code assignment and the SID report, against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import h2rec


def data(n: int = 2000, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d)) * 3
    return (centers[rng.integers(0, 20, n)] + rng.standard_normal((n, d))).astype(np.float32)


def numpy_assign(x: np.ndarray, books: np.ndarray, normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Greedy residual nearest-centroid codes and the distance gap to the runner-up per level."""
    r = x.astype(np.float64)
    codes, gaps = [], []
    for c in books.astype(np.float64):
        if normalize:
            nrm = np.linalg.norm(r, axis=1, keepdims=True)
            r = np.where(nrm > 0, r / np.where(nrm > 0, nrm, 1), r)
        dist = ((r[:, None, :] - c[None]) ** 2).sum(-1)
        order = np.sort(dist, axis=1)
        codes.append(dist.argmin(1))
        gaps.append(order[:, 1] - order[:, 0])
        r = r - c[codes[-1]]
    return np.stack(codes, 1), np.stack(gaps, 1)


@pytest.mark.parametrize("normalize", [False, True])
def test_codes_are_the_greedy_residual_assignment(normalize):
    x = data()
    codes, books = h2rec.residual_kmeans(x, n_levels=3, codebook_size=16, n_iter=15, seed=1,
                                         normalize_residuals=normalize)
    assert codes.shape == (2000, 3) and codes.dtype == np.int64
    assert books.shape == (3, 16, 24) and books.dtype == np.float32
    want, gap = numpy_assign(x, books, normalize)
    clear = gap > 1e-3  # float32 vs float64: only near-ties may differ
    assert (codes[clear] == want[clear]).all()
    again = h2rec.assign_codes(x, books, normalize_residuals=normalize)
    assert (again[clear] == want[clear]).all()


def test_centroids_are_means_of_their_points_at_convergence():
    x = data(800, 8, 3)
    c, a = h2rec.kmeans(x, 10, n_iter=100, seed=0)
    for j in range(10):
        pts = x[a == j]
        if len(pts):
            np.testing.assert_allclose(c[j], pts.mean(0), atol=1e-4)


def test_reconstruction_errors_match_numpy_and_decrease():
    x = data()
    codes, books = h2rec.residual_kmeans(x, n_levels=4, codebook_size=8, n_iter=10, seed=2)
    err = h2rec.reconstruction_errors(x, codes, books)
    r = x.astype(np.float64)
    want = []
    for lev in range(4):
        r = r - books[lev][codes[:, lev]]
        want.append((r**2).sum(1).mean())
    np.testing.assert_allclose(err, want, rtol=1e-5)
    assert (np.diff(np.concatenate([[(x.astype(np.float64) ** 2).sum(1).mean()], err])) <= 1e-9).all()


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 12))
@settings(max_examples=20, deadline=None)
def test_properties(seed, levels, k):
    x = data(200, 6, seed)
    codes, books = h2rec.residual_kmeans(x, n_levels=levels, codebook_size=k, n_iter=5, seed=seed)
    assert codes.min() >= 0 and codes.max() < k
    err = h2rec.reconstruction_errors(x, codes, books)
    prev = float((x.astype(np.float64) ** 2).sum(1).mean())
    for e in err:
        assert e <= prev * (1 + 1e-6)
        prev = e


def test_same_result_for_any_thread_count_and_seed_matters():
    x = data(3000, 32, 5)
    a = h2rec.residual_kmeans(x, 2, 32, 8, seed=4, n_threads=1)
    b = h2rec.residual_kmeans(x, 2, 32, 8, seed=4, n_threads=2)
    c = h2rec.residual_kmeans(x, 2, 32, 8, seed=5, n_threads=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_balanced_assignment_caps_cluster_sizes():
    x = data(1000, 8, 7)
    codes, _ = h2rec.residual_kmeans(x, 2, 16, 5, seed=0, balanced=True)
    for lev in range(2):
        assert np.bincount(codes[:, lev], minlength=16).max() <= -(-1000 // 16)
    plain, _ = h2rec.residual_kmeans(x, 2, 16, 5, seed=0)
    assert np.bincount(plain[:, 0], minlength=16).max() > -(-1000 // 16)


def test_empty_clusters_are_repaired():
    # 40 distinct points but 4 copies of each: k-means++ on duplicates, all clusters used
    rng = np.random.default_rng(0)
    x = np.repeat(rng.standard_normal((40, 4)).astype(np.float32), 4, axis=0)
    _, a = h2rec.kmeans(x, 40, n_iter=10, seed=1)
    assert len(np.unique(a)) == 40


def test_code_report_matches_numpy():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, size=(500, 3))
    rep = h2rec.code_report(codes, 4)
    uniq, counts = np.unique(codes, axis=0, return_counts=True)
    assert rep["n_unique_tuples"] == len(uniq)
    assert rep["largest_collision_group"] == counts.max()
    assert rep["collision_share"] == pytest.approx(counts[counts > 1].sum() / 500)
    for lev in range(3):
        p = np.bincount(codes[:, lev], minlength=4) / 500
        assert rep["usage"][lev] == pytest.approx((p > 0).mean())
        assert rep["entropy"][lev] == pytest.approx(-(p[p > 0] * np.log2(p[p > 0])).sum())
    unique = h2rec.code_report(np.arange(10).reshape(10, 1), 10)
    assert unique["collision_share"] == 0 and unique["largest_collision_group"] == 1
