"""Residual k-means (3 levels × 256 centroids, 20 Lloyd iterations on all points), four ways,
with the reconstruction error (mean squared residual norm after the last level) beside each time:

- ``h2rec``: the Rust ``residual_kmeans``;
- ``faiss_kmeans``: ``faiss.Kmeans`` run per level on the residuals (subsampling disabled);
- ``faiss_rq``: ``faiss.ResidualQuantizer`` with greedy (beam 1) training, 20 iterations;
- ``sklearn``: scikit-learn ``KMeans`` per level (random init, one run, tol 0).

Inputs: Amazon Beauty's 12,101 product titles embedded to 384 dimensions (all-MiniLM-L6-v2
when installed, else TF-IDF + SVD), and a generated clustered set of 100,000 × 768
(20,000 × 768 unless H2REC_BENCH_FULL=1), and a generated catalogue of 1,000,000 × 384 (20,000
unless H2REC_BENCH_FULL=1; h2rec and faiss.Kmeans only at full size).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, FULL, clustered_embeddings, record
import h2rec

LEVELS, K, ITERS = 3, 256, 20


def beauty_title_embeddings() -> tuple[np.ndarray, str]:
    lookup = DATA / "beauty" / "products_lookup.csv"
    if not lookup.exists():
        pytest.skip(f"{lookup} is not present")
    cache = Path(os.environ.get("H2REC_BENCH_CACHE", Path.home() / ".cache" / "h2rec-bench"))
    import polars as pl

    titles = pl.read_csv(lookup)["name"].fill_null("").cast(pl.Utf8).to_list()
    from h2rec import embed

    try:
        path = embed.resolve_model_path("all-MiniLM-L6-v2")
        encoder = "minilm"
    except Exception:
        path, encoder = None, "tfidf"
    f = cache / f"beauty_titles_{encoder}.npy"
    if f.exists():
        return np.load(f), encoder
    if path is not None:
        x = embed.embed_sentence_transformers(titles, str(path))
    else:
        x = embed.embed_tfidf(titles, embed.EmbedOptions(dim=384))
    x = np.ascontiguousarray(x, dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, x)
    return x, encoder


@pytest.fixture(scope="module", params=["beauty-384", "generated-768", "catalogue-384"])
def embeddings(request):
    if request.param == "beauty-384":
        x, encoder = beauty_title_embeddings()
        return request.param + "-" + encoder, x
    if request.param == "catalogue-384":  # a million-item catalogue's sentence embeddings
        n = 1_000_000 if FULL else 20_000
        return f"generated-{n}x384", clustered_embeddings(n, 384, seed=1)
    n = 100_000 if FULL else 20_000
    return f"generated-{n}x768", clustered_embeddings(n, 768, seed=0)


def mse(x: np.ndarray, recon: np.ndarray) -> float:
    return float(((x.astype(np.float64) - recon) ** 2).sum(1).mean())


def run_h2rec(x):
    codes, books = h2rec.residual_kmeans(x, LEVELS, K, ITERS, seed=0)
    return float(h2rec.reconstruction_errors(x, codes, books)[-1])


def run_faiss_kmeans(x):
    import faiss

    r = x.copy()
    for level in range(LEVELS):
        km = faiss.Kmeans(x.shape[1], K, niter=ITERS, seed=level + 1,
                          max_points_per_centroid=10**9, verbose=False)
        km.train(r)
        _, a = km.index.search(r, 1)
        r = r - km.centroids[a[:, 0]]
    return float((r.astype(np.float64) ** 2).sum(1).mean())


def run_faiss_rq(x):
    import faiss

    rq = faiss.ResidualQuantizer(x.shape[1], LEVELS, 8)
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1
    rq.cp.niter = ITERS
    rq.cp.max_points_per_centroid = 10**9
    rq.train(x)
    codes = rq.compute_codes(x)
    return mse(x, rq.decode(codes))


def run_sklearn(x):
    from sklearn.cluster import KMeans

    r = x.copy()
    for level in range(LEVELS):
        km = KMeans(K, init="random", n_init=1, max_iter=ITERS, tol=0.0, random_state=level,
                    algorithm="lloyd").fit(r)
        r = r - km.cluster_centers_[km.labels_].astype(np.float32)
    return float((r.astype(np.float64) ** 2).sum(1).mean())


PEERS = {"h2rec": run_h2rec, "faiss_kmeans": run_faiss_kmeans, "faiss_rq": run_faiss_rq,
         "sklearn": run_sklearn}


@pytest.mark.parametrize("impl", list(PEERS))
def test_residual_kmeans(benchmark, embeddings, impl):
    name, x = embeddings
    if impl != "h2rec":
        pytest.importorskip("faiss" if impl.startswith("faiss") else "sklearn")
    if x.shape[0] >= 1_000_000 and impl not in ("h2rec", "faiss_kmeans"):
        pytest.skip("1M points: h2rec against faiss.Kmeans per level only (minutes each)")
    benchmark.group = f"rq-kmeans-{name}"
    # full sizes: best of two rounds (the first may share the cores with the embedding
    # fixture's leftover threads)
    err = benchmark.pedantic(PEERS[impl], args=(x,), rounds=2 if FULL else 1, iterations=1)
    record(benchmark, reconstruction_error=err, n=x.shape[0], d=x.shape[1])
    # sanity: every method must explain part of the (unit-norm) data
    assert 0 < err < float((x.astype(np.float64) ** 2).sum(1).mean())
