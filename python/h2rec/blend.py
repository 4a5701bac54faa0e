"""Text blend: an item-text similarity term added to a trained model's scores, its weight picked
on the validation split.

A rare item is rarely a training target, so its ID and code vectors learn little; its text says
what it is. After training, ``score(u, i) = model(u, i) + beta * <q_u, t_i>`` with t_i the item's
text vector, q_u the decayed sum ``sum_k exp(-0.5 k) t_{x_{T-k}}`` of the user's items' vectors
(the last item at k = 0), and beta chosen from BLEND_GRID by validation NDCG@10 (ties: the
smaller beta). The test split is never read.

The text vectors (record version 2, kind ``tfidf``) are the sparse word TF-IDF rows of the items'
text (h2rec.embed.tfidf_matrix, terms in at least two items, rows L2-normalised): the exact words
a rare item shares with the user's items (a brand, a product line) are what tell it apart, and a
dense projection loses them. On Beauty validation, text similarity alone ranks tail items at
NDCG@10 0.0550 with these rows, 0.0503 / 0.0445 / 0.0385 with 1024 / 512 / 256-dimensional SVD
vectors. Without item text (``train(..., item_text=None)``) the dense, unit-normalised item
embeddings stand in (version 1, as before; such records still load). Trained jointly instead
(``model.text_match``), the ID part leans on the text for popular items and the tail gets worse.

The choice is saved in ``best.pt`` itself (a readable copy: ``text_blend.json`` beside it);
``load_checkpoint`` attaches it, so evaluation, ``recommend``, the exports and serving score with
it, wherever the checkpoint is copied to. The sparse term is the model's ``text_blend`` module,
which h2rec.evaluate adds to the inner-product scores; the dense one is extra columns of the
user and item vectors (h2rec.models.text_match).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from h2rec import _core
from h2rec.errors import CheckpointError, ConfigError, DataError
from h2rec.models.config import TEXT_KINDS

logger = logging.getLogger(__name__)

BLEND_FILE = "text_blend.json"
BLEND_FORMAT = "h2rec-text-blend"
BLEND_VERSION = 2  # 2: sparse TF-IDF rows of the item text; 1: dense item embeddings
BLEND_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# train.text_blend="rare" (record version 3): each item's row scaled by (1 + its training
# count)^-g, g and the weight chosen together on validation; every scale is at most 1, so the
# weights go higher
RARE_VERSION = 3
POP_GRID = (0.0, 0.15, 0.3)
RARE_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
BLEND_DECAY = 0.5  # q_u weighs the item k steps back by exp(-0.5 k)
TFIDF_MIN_DF = 2  # a word in one item only says nothing of its neighbours


# --------------------------------------------------------------------------- sparse text rows


@dataclass(frozen=True)
class TextRows:
    """The items' sparse text vectors: CSR of (n_items + 1, n_terms), row 0 (padding) empty,
    float32 values, rows of unit norm (or empty, for an item without a kept word)."""

    indptr: np.ndarray  # (n_items + 2,) int64
    indices: np.ndarray  # (nnz,) int64
    data: np.ndarray  # (nnz,) float32
    n_terms: int

    @property
    def n_rows(self) -> int:
        return int(self.indptr.size - 1)

    def digest(self) -> str:
        """sha256 of the rows: a blend is only applied with the same text."""
        h = hashlib.sha256()
        for a in (self.indptr.astype(np.int64), self.indices.astype(np.int64),
                  self.data.astype(np.float32), np.array([self.n_terms], dtype=np.int64)):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def has_text(item_text: Sequence[str] | None) -> bool:
    """Whether any item has non-blank text."""
    return item_text is not None and any(t and not t.isspace() for t in item_text)


def text_rows(item_text: Sequence[str], min_df: int = TFIDF_MIN_DF) -> TextRows | None:
    """The TF-IDF rows of ``item_text`` (entry r: internal item r + 1); None when no word is in
    ``min_df`` items or more."""
    from h2rec.embed import tfidf_matrix

    try:
        matrix, _ = tfidf_matrix(list(item_text), min_df=min_df)
    except DataError:  # no word left in the vocabulary
        return None
    indptr = np.concatenate([[0], matrix.indptr]).astype(np.int64)  # row 0: padding, empty
    return TextRows(indptr, matrix.indices.astype(np.int64), matrix.data.astype(np.float32),
                    int(matrix.shape[1]))


def popularity_scaled(rows: TextRows, popularity: np.ndarray, g: float) -> TextRows:
    """``rows`` with row i multiplied by (1 + popularity[i])^-g (``popularity``: (n_items + 1,)
    training counts, entry 0 the padding row's); g = 0: the rows themselves."""
    pop = np.asarray(popularity, dtype=np.float64)
    if pop.shape != (rows.n_rows,):
        raise DataError(
            f"text blend: {pop.size} popularity counts for {rows.n_rows} text rows"
        )
    if g == 0.0:
        return rows
    scale = np.repeat((1.0 + pop) ** -g, np.diff(rows.indptr)).astype(np.float32)
    return TextRows(rows.indptr, rows.indices, (rows.data * scale).astype(np.float32), rows.n_terms)


def popularity_digest(popularity: np.ndarray) -> str:
    """sha256 of the int64 training counts a version 3 blend was chosen with."""
    return hashlib.sha256(np.ascontiguousarray(popularity, dtype=np.int64).tobytes()).hexdigest()


class TextScores(nn.Module):
    """``beta * <q_u, t_i>`` for every item i, or for given candidates (see the module doc),
    from left-padded inputs.

    The profiles q^T (n_terms, B) gather the input items' rows (one scatter); all items are
    then scored by one sparse product ``T q^T`` (the Rust core's ``csr_matmul``, in column
    panels that stay in cache), costing (non-zeros of T) x (users): on Beauty
    (12k items, ten words an item) less than scoring the users against 64-wide item vectors.
    Nothing is trained and nothing is added to the model's ``state_dict``; every sum runs in a
    fixed order, whatever the thread count. The rows stay on the CPU; the scores go to the
    input's device."""

    def __init__(self, rows: TextRows, weight: float, decay: float = BLEND_DECAY) -> None:
        super().__init__()
        self.rows = rows
        self.weight = float(weight)
        self.decay = float(decay)
        self.n_rows = rows.n_rows
        self._indptr = torch.from_numpy(rows.indptr.copy())
        self._indices = torch.from_numpy(rows.indices.copy())
        self._data = torch.from_numpy(rows.data.copy())
        # the CSR arrays checked once here (offsets, term ids) by a product with no columns
        try:
            _core.csr_matmul(rows.indptr, rows.indices, rows.data,
                             np.zeros((rows.n_terms, 0), dtype=np.float32), n_threads=1)
        except ValueError as err:
            raise DataError(f"text blend rows: {err}") from err

    def _entries(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """For the flat item rows ``items`` (M,): (which of the M each stored entry of their
        rows belongs to, the entry's position in ``indices`` / ``data``), in row order."""
        starts = self._indptr[items]
        counts = self._indptr[items + 1] - starts
        owner = torch.repeat_interleave(torch.arange(items.numel()), counts)
        first = torch.cumsum(counts, 0) - counts  # where each item's entries begin
        pos = starts[owner] + torch.arange(owner.numel()) - first[owner]
        return owner, pos

    def profiles(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded item rows (CPU) -> q^T (n_terms, B) float32: each column
        one user's decayed sum of the rows of their items."""
        b, t = seq.shape
        w = self._weights(t)  # (T,)
        owner, pos = self._entries(seq.reshape(-1))  # padding (row 0) has no entries
        vals = self._data[pos] * w.repeat(b)[owner]
        qt = torch.zeros(self.rows.n_terms * b)
        # index_add_ sums in the same order whatever the thread count (an accumulating
        # index_put_ did not: its results moved in the last bits with the threads)
        qt.index_add_(0, self._indices[pos] * b + owner // t, vals)
        return qt.view(self.rows.n_terms, b)

    def _weights(self, t: int) -> Tensor:
        """(T,) float32: exp(-decay k) for the item k steps before the last."""
        return torch.exp(-self.decay * torch.arange(t - 1, -1, -1, dtype=torch.float32))

    def _scores(self, seq: Tensor, out: np.ndarray | None = None) -> np.ndarray:
        """The Rust core's ``text_scores``: ``weight * T q^T`` (n_items + 1, B) for CPU seq
        (B, T), added into ``out`` when given."""
        rows = self.rows
        return _core.text_scores(  # type: ignore[no-any-return]
            rows.indptr, rows.indices, rows.data, rows.n_terms, seq.numpy(),
            self._weights(seq.shape[1]).numpy(), self.weight, out=out,
            n_threads=torch.get_num_threads(),
        )

    def add_to(self, scores: Tensor, seq: Tensor) -> None:
        """``scores += forward(seq)`` in place, to the bit, for scores (B, n_items + 1) of the
        users of seq (B, T). When scores are the transpose of a contiguous float32 CPU matrix
        (as h2rec.evaluate's score_matrix makes them), the Rust core adds the term straight
        into them: no (B, n_items + 1) term is held in memory or read back."""
        base = scores.T
        if (scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.requires_grad
                or not base.is_contiguous()):
            scores += self.forward(seq)
            return
        self._scores(seq.cpu(), out=base.numpy())

    def forward(self, seq: Tensor, candidates: Tensor | None = None) -> Tensor:
        """seq (B, T) left-padded item rows -> float32 scores to add: (B, n_items + 1) for every
        item (laid out as the transpose of an (n_items + 1, B) matrix, as h2rec.evaluate's
        score_matrix makes the scores it is added to), or (B, C) for ``candidates`` (B, C)
        item rows."""
        device, seq = seq.device, seq.cpu()
        if candidates is None:
            return torch.from_numpy(self._scores(seq)).T.to(device)  # (B, n_items + 1)
        qt = self.profiles(seq) * self.weight  # (n_terms, B): weighed here, where it is small
        cand = candidates.cpu()
        b, c = cand.shape
        owner, pos = self._entries(cand.reshape(-1))
        vals = self._data[pos] * qt[self._indices[pos], owner // c]
        return torch.zeros(b * c).index_add_(0, owner, vals).view(b, c).to(device)


def blend_applies(
    cfg: Any, embeddings: np.ndarray | None, item_text: Sequence[str] | None = None
) -> bool:
    """Whether a run of ``cfg`` gets a text blend: ``train.text_blend="auto"``, a model that
    reads item text (SID-only, fusion, H2Rec; SASRec stays hash IDs only) without a jointly
    trained text match (``"rare"``: the same, rows scaled by popularity, see RARE_VERSION), and item text (or, without it, item embeddings) to read."""
    return (
        cfg.train.text_blend in ("auto", "rare")
        and cfg.model.kind in TEXT_KINDS
        and not cfg.model.text_match
        and (has_text(item_text) or embeddings is not None)
    )


def embeddings_digest(embeddings: np.ndarray) -> str:
    """sha256 of the float32 embedding rows: a dense blend is only applied with the same text."""
    return hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes()).hexdigest()


def _check_plain(model: Any) -> None:
    if getattr(model, "_blend_base_dim", None) is None and (
        getattr(model, "text_match", None) is not None
    ):
        raise ConfigError("text blend: the model already trains a text match (model.text_match)")


def attach(model: Any, embeddings: np.ndarray, weight: float, decay: float = BLEND_DECAY) -> None:
    """Give ``model`` (trained without a text match) the dense text-match term (version 1)
    with a fixed weight: its states and item vectors gain the text columns. The text rows are
    not saved with the model's weights (its ``state_dict`` is unchanged)."""
    from h2rec.models.text_match import TextMatch

    detach(model)
    _check_plain(model)
    base = model.out_dim
    model._blend_base_dim = base
    device = next(model.parameters()).device
    model.text_match = TextMatch(
        base, embeddings, model.n_items, decay, 1.0, learned=False, weight=weight
    ).to(device)
    model.out_dim = base + model.text_match.dim


def attach_rows(model: Any, rows: TextRows, weight: float, decay: float = BLEND_DECAY) -> None:
    """Give ``model`` the sparse text term (version 2) with a fixed weight: its module
    ``text_blend``, which evaluation, recommendation and serving add to the scores."""
    detach(model)
    _check_plain(model)
    if rows.n_rows != model.n_items + 1:
        raise DataError(
            f"text blend: {rows.n_rows - 1} items of text for a model of {model.n_items} items"
        )
    model.text_blend = TextScores(rows, weight, decay)


def set_weight(model: Any, weight: float) -> None:
    """Change the weight of the blend attached to ``model``."""
    if getattr(model, "text_blend", None) is not None:
        model.text_blend.weight = float(weight)
    else:
        model.text_match.fixed = float(weight)


def detach(model: Any) -> None:
    """Undo :func:`attach` or :func:`attach_rows`."""
    if getattr(model, "text_blend", None) is not None:
        model.text_blend = None
    base = getattr(model, "_blend_base_dim", None)
    if base is not None:
        model.text_match = None
        model.out_dim = base
        del model._blend_base_dim


def choose(
    model: Any,
    embeddings: np.ndarray | None,
    evaluate_valid: Callable[[Any], Any],
    item_text: Sequence[str] | None = None,
    popularity: np.ndarray | None = None,
    mode: str = "auto",
) -> dict[str, Any] | None:
    """With ``mode="rare"`` (``train.text_blend``), TF-IDF rows and the training ``popularity``
    ((n_items + 1,) counts, ``store.popularity(holdout=2)``): see :func:`choose_rare`.
    Otherwise evaluate the validation split at every weight of BLEND_GRID (``evaluate_valid(model)``:
    an ``EvalResult`` of the validation split, gathered over every process under DDP); attach
    the best (by NDCG@10, the smaller weight on a tie) and return the record to save. The text
    vectors are the TF-IDF rows of ``item_text`` or, without it, the ``embeddings``; None (no
    blend) when there is neither."""
    rows = text_rows(item_text) if has_text(item_text) else None
    if rows is None and embeddings is None:
        return None
    if mode == "rare" and rows is not None:
        if popularity is None:
            raise ConfigError("text blend: train.text_blend=rare needs the training popularity")
        return choose_rare(model, rows, popularity, evaluate_valid)
    table: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    best_w, best_v = 0.0, -1.0
    for w in BLEND_GRID:
        if w == 0.0:
            detach(model)
        elif rows is not None and getattr(model, "text_blend", None) is None:
            attach_rows(model, rows, w)
        elif rows is None and getattr(model, "_blend_base_dim", None) is None:
            assert embeddings is not None
            attach(model, embeddings, w)
        else:  # the text rows are already there: change the weight only
            set_weight(model, w)
        result = evaluate_valid(model)
        ndcg = float(result.metrics["NDCG@10"])
        table[f"{w:g}"] = ndcg
        groups[f"{w:g}"] = {
            g: m["NDCG@10"] for g, m in result.groups.items() if g in ("head", "tail")
        }  # None for an empty group
        if ndcg > best_v:
            best_w, best_v = w, ndcg
    if best_w > 0:  # the text rows are attached (the grid ends above 0): set the weight
        set_weight(model, best_w)
    else:
        detach(model)
    logger.info(
        "text blend (%s): weight %g (validation NDCG@10 %.4f; %g: %.4f)",
        "tfidf" if rows is not None else "embeddings", best_w, best_v, 0.0, table["0"],
    )
    record: dict[str, Any] = {"format": BLEND_FORMAT}
    if rows is not None:
        record.update(version=BLEND_VERSION, kind="tfidf", min_df=TFIDF_MIN_DF,
                      text_sha256=rows.digest())
    else:
        assert embeddings is not None
        record.update(version=1, embeddings_sha256=embeddings_digest(embeddings))
    record.update({
        "weight": best_w,
        "decay": BLEND_DECAY,
        "chosen_by": "validation NDCG@10",
        "valid_ndcg10": table,
        "valid_ndcg10_head_tail": groups,  # for the record: the choice reads only the above
    })
    return record


def choose_rare(
    model: Any, rows: TextRows, popularity: np.ndarray, evaluate_valid: Callable[[Any], Any]
) -> dict[str, Any]:
    """Evaluate the validation split at every (g, weight) of POP_GRID x RARE_WEIGHTS, the rows
    scaled by (1 + count)^-g; attach the best by NDCG@10 (on a tie the smaller g, then the
    smaller weight) and return the record (version 3). On Beauty's H2Rec runs this reached the
    validation NDCG@10 of the plain blend or more, with tail targets 10-15% higher."""
    pop = np.asarray(popularity, dtype=np.int64)
    scaled = {g: popularity_scaled(rows, pop, g) for g in POP_GRID}  # checks the sizes first
    table: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, dict[str, float]]] = {}
    best: tuple[float, float, float] = (-1.0, 0.0, 0.0)  # (NDCG@10, g, weight)
    bare = None
    for g in POP_GRID:
        table[f"{g:g}"], groups[f"{g:g}"] = {}, {}
        for w in RARE_WEIGHTS:
            if w == 0.0:
                if bare is None:  # the model alone: the same for every g
                    detach(model)
                    bare = evaluate_valid(model)
                result = bare
            else:
                attach_rows(model, scaled[g], w)
                result = evaluate_valid(model)
            ndcg = float(result.metrics["NDCG@10"])
            table[f"{g:g}"][f"{w:g}"] = ndcg
            groups[f"{g:g}"][f"{w:g}"] = {
                k: m["NDCG@10"] for k, m in result.groups.items() if k in ("head", "tail")
            }
            if ndcg > best[0]:
                best = (ndcg, g, w)
    _, best_g, best_w = best
    if best_w > 0:
        attach_rows(model, scaled[best_g], best_w)
    else:
        detach(model)
    logger.info("text blend (tfidf, rare): g %g, weight %g (validation NDCG@10 %.4f; none: %.4f)",
                best_g, best_w, best[0], table["0"]["0"])
    return {
        "format": BLEND_FORMAT, "version": RARE_VERSION, "kind": "tfidf", "min_df": TFIDF_MIN_DF,
        "text_sha256": rows.digest(), "popularity_sha256": popularity_digest(pop),
        "weight": best_w, "pop_exponent": best_g, "decay": BLEND_DECAY,
        "chosen_by": "validation NDCG@10 over (pop_exponent, weight)",
        "valid_ndcg10": table, "valid_ndcg10_head_tail": groups,
    }


def wanted_version(mode: str) -> int:
    """The record version ``train.text_blend=mode`` gives a run with item text."""
    return RARE_VERSION if mode == "rare" else BLEND_VERSION


def is_outdated(
    record: dict[str, Any] | None, item_text: Sequence[str] | None, mode: str = "auto"
) -> bool:
    """Whether a checkpoint's blend ``record`` is not what :func:`choose` would give it today
    under ``train.text_blend=mode``: none yet, or another kind (dense embeddings, version 1;
    the plain rows, 2; the popularity-scaled ones, 3) where the item text gives TF-IDF rows."""
    if record is None:
        return True
    return (record.get("version") != wanted_version(mode) and has_text(item_text)
            and text_rows(item_text) is not None)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A blend record, checked: format, version (1: dense embeddings, 2: TF-IDF rows, 3: rows
    scaled by popularity), weight >= 0, decay >= 0, the hash of its text (and of its counts)."""
    try:
        version = record.get("version")
        if record.get("format") != BLEND_FORMAT or type(version) is not int or version not in (
            1, BLEND_VERSION, RARE_VERSION
        ):
            raise CheckpointError(
                f"{where}: not an h2rec text blend this h2rec reads (format "
                f"{record.get('format')!r}, version {version!r}; known: 1, {BLEND_VERSION}, "
                f"{RARE_VERSION})"
            )
        ok = True
        weight, decay = float(record["weight"]), float(record["decay"])
        digest = record["embeddings_sha256" if version == 1 else "text_sha256"]
        if version in (BLEND_VERSION, RARE_VERSION):
            min_df = record["min_df"]
            ok = record["kind"] == "tfidf" and type(min_df) is int and min_df >= 1
        if version == RARE_VERSION:
            g = float(record["pop_exponent"])
            ok = ok and bool(np.isfinite(g)) and g >= 0 and isinstance(
                record["popularity_sha256"], str)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{where}: not a readable text blend: {err!r}") from err
    if not ok or not (np.isfinite(weight) and np.isfinite(decay) and weight >= 0 and decay >= 0):
        raise CheckpointError(
            f"{where}: not an h2rec text blend (format {record.get('format')!r}, version "
            f"{record.get('version')!r}, weight {record.get('weight')!r}, decay "
            f"{record.get('decay')!r})"
        )
    if not isinstance(digest, str):
        raise CheckpointError(f"{where}: text blend without the sha256 of its text")
    return record


def apply_record(
    model: Any,
    record: dict[str, Any] | None,
    embeddings: np.ndarray | None,
    where: str,
    item_text: Sequence[str] | None = None,
    popularity: np.ndarray | None = None,
) -> float:
    """Attach the blend ``record`` (from a checkpoint; None: none) to ``model``; its weight.
    A version 2 record needs the item text it was chosen with, a version 1 record the item
    embeddings, a version 3 record the item text and the training ``popularity`` ((n_items +
    1,) counts, ``store.popularity(holdout=2)``) it was chosen with."""
    if record is None:
        return 0.0
    record = check_record(record, where)
    weight = float(record["weight"])
    if weight == 0.0:
        return 0.0
    cfg = model.cfg
    if cfg.kind not in TEXT_KINDS or getattr(model, "text_match", None) is not None:
        raise CheckpointError(
            f"{where}: holds a text blend, which a {cfg.kind} model"
            f"{' with model.text_match' if cfg.text_match else ''} never gets"
        )
    again = "choose it again: h2rec blend RUN --overwrite"
    if record["version"] == 1:
        if embeddings is None:
            raise ConfigError(
                f"{where}: the run scores with a text blend, which needs the item embeddings it "
                "was chosen with: give data.embeddings (--embeddings), keep the dataset's "
                f"embeddings.npy, or {again}"
            )
        if embeddings_digest(embeddings) != record["embeddings_sha256"]:
            raise CheckpointError(
                f"{where}: its text blend was chosen with other item embeddings than the ones "
                f"given (embeddings_sha256 differs); {again}"
            )
        attach(model, embeddings, weight, float(record["decay"]))
        return weight
    if not has_text(item_text):
        raise ConfigError(
            f"{where}: the run scores with a text blend, which needs the item text of its "
            "dataset (items.parquet), and none was given"
        )
    rows = text_rows(item_text, int(record["min_df"]))  # type: ignore[arg-type]
    if rows is None:
        raise CheckpointError(
            f"{where}: its text blend was chosen with other item text: no word of the text "
            f"given is in {record['min_df']} items or more; {again}"
        )
    if rows.digest() != record["text_sha256"]:
        raise CheckpointError(
            f"{where}: its text blend was chosen with other item text than the dataset's "
            f"(text_sha256 differs); {again}"
        )
    if record["version"] == RARE_VERSION:
        if popularity is None:
            raise ConfigError(
                f"{where}: the run scores with a popularity-scaled text blend, which needs the "
                "training popularity of its dataset, and none was given"
            )
        if popularity_digest(np.asarray(popularity)) != record["popularity_sha256"]:
            raise CheckpointError(
                f"{where}: its text blend was chosen with other training counts than the "
                f"dataset's (popularity_sha256 differs); {again}"
            )
        rows = popularity_scaled(rows, popularity, float(record["pop_exponent"]))
    attach_rows(model, rows, weight, float(record["decay"]))
    return weight


def write_copy(run_dir: Path, record: dict[str, Any] | None) -> None:
    """``text_blend.json`` beside the checkpoints: a readable copy of the blend of ``best.pt``
    (the checkpoint holds the blend it scores with); removed when there is none."""
    from h2rec.report import write_text_atomic

    path = Path(run_dir) / BLEND_FILE
    if record is None:
        path.unlink(missing_ok=True)
    else:
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
