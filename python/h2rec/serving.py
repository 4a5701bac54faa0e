"""A trained recommender: top-K for the dataset's users, for histories it has never seen, and an
export that a service can run without the training code.

>>> rec = Recommender.load("runs/h2rec")                       # a run folder or a .pt file
>>> rec.recommend([["B004756YJA", "B0020YLEYK"], ["7806397051"]], k=10)  # original item ids
>>> rec.recommend_file("sessions.csv", "top10.parquet", k=10)  # streamed, any number of users
>>> rec.export("serving/")                                     # encoder.pt2 + item vectors

New histories use the dataset's original item ids. Items the model does not know are skipped
(and counted); a history with no known item gets the most popular items of the dataset
(``fallback`` is true on those rows). Items of the history are not recommended unless
``exclude_history=False``. Ties go to the lower internal item id, as in evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from h2rec.config import RunConfig
from h2rec.errors import ConfigError, DataError, OutputError
from h2rec.evaluate import EvalResult, eval_users, evaluate, recommend_top_k, states_of
from h2rec.outputs import check_output_dir, check_output_file, locked, new_dir_beside, recover
from h2rec.outputs import swap_in
from h2rec.runs import load_run

__all__ = [
    "HISTORY_FORMATS",
    "HistoryStats",
    "Recommender",
    "UserEncoder",
    "iter_histories",
]

logger = logging.getLogger("h2rec")

HISTORY_FORMATS = ("auto", "sequences", "csv", "tsv", "parquet")
_SCHEMA: dict[str, Any] = {
    "user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float64,
    "fallback": pl.Boolean,
}


@dataclass
class HistoryStats:
    """What a batch of new histories held: histories scored, interactions read, those whose
    item the model does not know (skipped), and histories left empty (popularity fallback)."""

    histories: int = 0
    interactions: int = 0
    unknown_items: int = 0
    fallback: int = 0

    def add(self, other: HistoryStats) -> None:
        self.histories += other.histories
        self.interactions += other.interactions
        self.unknown_items += other.unknown_items
        self.fallback += other.fallback

    def __str__(self) -> str:
        return (
            f"{self.histories} histories, {self.interactions} interactions, "
            f"{self.unknown_items} with an unknown item (skipped), "
            f"{self.fallback} empty (popularity fallback)"
        )


# --------------------------------------------------------------------------- reading histories


def _history_format(path: Path, fmt: str) -> str:
    if fmt not in HISTORY_FORMATS:
        raise ConfigError(f"format={fmt!r}: choose from {', '.join(HISTORY_FORMATS)}")
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        return suffix[1:]
    if suffix in (".txt", ".seq", ""):
        return "sequences"
    raise DataError(
        f"{path}: cannot tell the format from the suffix {suffix!r}; use .txt (a user and its "
        "items per line), .csv, .tsv or .parquet (one row per interaction), or give the format"
    )


def _sequence_chunks(path: Path, chunk: int) -> Iterator[tuple[list[str], list[list[str]]]]:
    """``user item item ...`` lines (whitespace-separated, oldest item first), ``chunk`` users
    at a time; a line with a user only is an empty history, blank lines are skipped."""
    users: list[str] = []
    items: list[list[str]] = []
    try:
        with open(path, encoding="utf8") as f:
            for number, line in enumerate(f, 1):
                tokens = line.split()
                if not tokens:
                    continue
                if "\x00" in line:
                    raise DataError(f"{path}:{number}: NUL byte in an id")
                users.append(tokens[0])
                items.append(tokens[1:])
                if len(users) == chunk:
                    yield users, items
                    users, items = [], []
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if users:
        yield users, items


def _scan(path: Path, fmt: str) -> pl.LazyFrame:
    if fmt == "parquet":
        return pl.scan_parquet(path)
    return pl.scan_csv(
        path, separator="\t" if fmt == "tsv" else ",", infer_schema=False, quote_char='"'
    )


BUCKET_BYTES = 64 * 2**20  # input bytes per user bucket of a row file


def _row_chunks(
    path: Path,
    fmt: str,
    chunk: int,
    user_col: str,
    item_col: str,
    time_col: str | None,
    buckets: int | None = None,
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Interaction rows grouped into histories, ``chunk`` users at a time. The rows are split
    by a hash of the user into buckets of about ``BUCKET_BYTES`` of input (``buckets`` to
    set the number), written as temporary Parquet files batch by batch; each bucket is then
    sorted by user (then time, then file order) and read back in slices: memory holds one
    bucket's rows and one chunk, not the file."""
    try:
        schema = _scan(path, fmt).collect_schema()
    except (pl.exceptions.PolarsError, OSError) as err:
        raise DataError(f"{path}: not a readable {fmt} file: {err}") from err
    columns = schema.names()
    for role, col in (("user", user_col), ("item", item_col)):
        if col not in columns:
            raise DataError(
                f"{path}: no {role} column {col!r} (columns: {', '.join(columns[:10])})"
            )
    if time_col == "auto":
        time_col = "timestamp" if "timestamp" in columns else None
    elif time_col is not None and time_col not in columns:
        raise DataError(f"{path}: no time column {time_col!r} (columns: {', '.join(columns[:10])})")
    select = [
        pl.col(user_col).cast(pl.String).alias("user"),
        pl.col(item_col).cast(pl.String).alias("item"),
    ]
    order = ["user"]
    if time_col is not None:
        time = pl.col(time_col)
        if schema[time_col].is_temporal():  # Parquet dates and datetimes: their integer value
            time = time.cast(pl.Int64)
        select.append(time.cast(pl.Float64, strict=False).alias("time"))
        order.append("time")
    tmp_dir = Path(tempfile.mkdtemp(prefix="h2rec-histories-"))
    try:
        sorted_rows = tmp_dir / "sorted.parquet"
        try:
            frame = _scan(path, fmt).with_row_index("row").select("row", *select)
            if time_col is not None:
                bad = frame.filter(pl.col("time").is_null()).select("row").head(1).collect()
                if bad.height:
                    raw = _scan(path, fmt).select(time_col).slice(int(bad["row"][0]), 1).collect()
                    raise DataError(
                        f"{path}: row {int(bad['row'][0]) + 1}: {time_col}="
                        f"{raw[time_col][0]!r} is not a number"
                    )
            nulls = frame.filter(pl.col("user").is_null() | pl.col("item").is_null())
            bad = nulls.select("row").head(1).collect()
            if bad.height:
                raise DataError(f"{path}: row {int(bad['row'][0]) + 1}: empty user or item id")
            n_buckets = buckets or max(1, -(-path.stat().st_size // BUCKET_BYTES))
            parts = _bucket_rows(frame, n_buckets, tmp_dir)
        except pl.exceptions.PolarsError as err:
            raise DataError(f"{path}: not a readable {fmt} file: {err}") from err
        for bucket in parts:  # one bucket's rows in memory at a time
            pl.scan_parquet(bucket).sort([*order, "row"]).drop("row").sink_parquet(sorted_rows)
            yield from _grouped(sorted_rows, chunk)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _bucket_rows(frame: pl.LazyFrame, n_buckets: int, tmp_dir: Path) -> list[list[Path]]:
    """The rows of ``frame`` split by a hash of the user into ``n_buckets`` sets of Parquet
    files under ``tmp_dir``, read batch by batch (every row of a user lands in one bucket)."""
    if n_buckets == 1:
        single = tmp_dir / "rows.parquet"
        frame.sink_parquet(single)
        return [[single]]
    parts: list[list[Path]] = [[] for _ in range(n_buckets)]
    bucket = (pl.col("user").hash(seed=0) % n_buckets).alias("bucket")
    for i, batch in enumerate(frame.collect_batches()):
        split = batch.with_columns(bucket).partition_by("bucket", as_dict=True, include_key=False)
        for (key,), rows in split.items():
            part = tmp_dir / f"b{int(key):05d}-{i:07d}.parquet"  # type: ignore[call-overload]
            rows.write_parquet(part)
            parts[int(key)].append(part)  # type: ignore[call-overload]
    return [p for p in parts if p]


def _grouped(
    sorted_rows: Path, chunk: int, rows_per_slice: int | None = None
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Histories from rows sorted by user, ``chunk`` users at a time, reading
    ``rows_per_slice`` rows at once (a user cut by a slice boundary is carried over)."""
    n_rows = pl.scan_parquet(sorted_rows).select(pl.len()).collect().item()
    rows_per_slice = rows_per_slice or max(chunk * 8, 65_536)
    carry_user: str | None = None
    carry_items: list[str] = []
    users: list[str] = []
    items: list[list[str]] = []
    for start in range(0, n_rows, rows_per_slice):
        part = pl.scan_parquet(sorted_rows).slice(start, rows_per_slice).collect()
        grouped = part.group_by("user", maintain_order=True).agg(pl.col("item"))
        g_users = grouped["user"].to_list()
        g_items = grouped["item"].to_list()
        if carry_user is not None:
            if g_users and g_users[0] == carry_user:
                g_items[0] = carry_items + g_items[0]
            else:
                g_users.insert(0, carry_user)
                g_items.insert(0, carry_items)
        carry_user, carry_items = g_users.pop(), g_items.pop()  # may continue in the next slice
        for user, hist in zip(g_users, g_items):
            users.append(user)
            items.append(hist)
            if len(users) == chunk:
                yield users, items
                users, items = [], []
    if carry_user is not None:
        users.append(carry_user)
        items.append(carry_items)
    if users:
        yield users, items


def iter_histories(
    path: str | Path,
    chunk: int = 4096,
    format: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "auto",
) -> Iterator[tuple[list[str], list[list[str]]]]:
    """(user ids, histories of original item ids, oldest first) from a file, ``chunk`` users at
    a time.

    Formats: sequence text (``user item item ...`` per line, ``.txt``), or CSV / TSV / Parquet
    with one interaction per row (``user_col``, ``item_col`` and, optionally, ``time_col``:
    ``"auto"`` uses ``timestamp`` when present; rows of a user are ordered by time, then by
    their order in the file)."""
    path = Path(path)
    if chunk < 1:
        raise ConfigError(f"chunk={chunk}: must be >= 1")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = _history_format(path, format)
    if fmt == "sequences":
        return _sequence_chunks(path, chunk)
    return _row_chunks(path, fmt, chunk, user_col, item_col, time_col)


# --------------------------------------------------------------------------- the encoder


class UserEncoder(nn.Module):
    """The part of a model a service runs: left-padded item rows (B, max_len) int64 (0 =
    padding, item ``r`` of the export's ``item_ids`` is row ``r + 1``) -> user vectors (B, E)
    float32, to score against the export's ``items.npy`` by inner product (plus, for a run
    with a sparse text blend, the term the export's ``text_rows.npz`` gives)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, seq: Tensor) -> Tensor:
        return states_of(self.model, seq)


# --------------------------------------------------------------------------- the recommender


class Recommender:
    """A trained model with its dataset's ids: recommend, evaluate, export.

    Build it with :meth:`load` (or :func:`h2rec.load`). ``config`` is the run's
    :class:`~h2rec.config.RunConfig`, ``dataset`` its :class:`~h2rec.data.Dataset`."""

    def __init__(self, model: Any, config: RunConfig, dataset: Any) -> None:
        self.model = model
        self.config = config
        self.dataset = dataset
        self.model.eval()
        self._item_index: dict[str, int] | None = None
        self._popular: np.ndarray | None = None

    @classmethod
    def load(
        cls,
        run: str | Path,
        data: str | Path | None = None,
        sids: str | Path | None = None,
        overrides: Sequence[str] = (),
        apply_blend: bool = True,
    ) -> Recommender:
        """The recommender of a run folder (its ``best.pt``) or a checkpoint file; ``data`` and
        ``sids`` replace the folders it was trained on; ``overrides``: ``eval.*``,
        ``train.device``, ``train.num_threads``; ``apply_blend=False`` leaves out the
        checkpoint's text blend (h2rec.blend)."""
        model, cfg, dataset = load_run(run, data, sids, overrides, apply_blend)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        return cls(model, cfg, dataset)

    # ------------------------------------------------------------------ facts
    @property
    def kind(self) -> str:
        """The model kind (``sasrec``, ``sid``, ``fusion``, ``h2rec``)."""
        return self.config.model.kind

    @property
    def max_len(self) -> int:
        """The most recent items of a history the model reads."""
        return self.config.model.max_len

    @property
    def item_ids(self) -> list[str]:
        """Original item ids; index ``r`` is internal item ``r + 1``."""
        return list(self.dataset.item_ids)

    def item_index(self) -> dict[str, int]:
        """Original item id -> internal id (1..n_items)."""
        if self._item_index is None:
            self._item_index = self.dataset.item_index()
        return self._item_index

    def _popular_items(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most interacted-with items of the dataset (ties: lower id) and counts."""
        if self._popular is None:
            pop = self.dataset.store.popularity(0).astype(np.int64)
            pop[0] = -1
            self._popular = np.argsort(-pop, kind="stable")  # padding last
        top = self._popular[: min(k, self.dataset.n_items)]
        counts = self.dataset.store.popularity(0)[top].astype(np.float64)
        return top, counts

    # ------------------------------------------------------------------ new histories
    def _internal(self, histories: Iterable[Sequence[Any]]) -> tuple[list[np.ndarray], int, int]:
        """Internal item ids per history (unknown ids dropped), the unknown and the total count."""
        index = self.item_index()
        out: list[np.ndarray] = []
        unknown = total = 0
        for hist in histories:
            if isinstance(hist, (str, bytes)):
                raise ConfigError(
                    f"histories: expected a list of item ids per history, got the string "
                    f"{hist!r} (wrap a single history in a list: [[...]])"
                )
            ids = [index.get(str(item), 0) for item in hist]
            total += len(ids)
            known = np.array([i for i in ids if i], dtype=np.int64)
            unknown += len(ids) - known.size
            out.append(known)
        return out, unknown, total

    def _top_k(
        self, seqs: list[np.ndarray], k: int, exclude_history: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items (B, k) internal ids, scores (B, k), fallback (B,)) for internal histories."""
        from h2rec._core import SequenceStore

        if k < 1:
            raise ConfigError(f"k={k}: must be >= 1")
        b = len(seqs)
        items = np.zeros((b, k), dtype=np.int64)
        scores = np.full((b, k), -np.inf, dtype=np.float64)
        fallback = np.array([s.size == 0 for s in seqs], dtype=bool)
        known = np.flatnonzero(~fallback)
        if known.size:
            lengths = np.array([seqs[i].size for i in known], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            store = SequenceStore(
                offsets, np.concatenate([seqs[i] for i in known]), self.dataset.n_items
            )
            top, top_scores = recommend_top_k(
                self.model,
                store,
                np.arange(known.size, dtype=np.int64),
                k,
                self.max_len,
                exclude_history=exclude_history,
                batch_size=self.config.eval.batch_size,
                max_scores_mb=self.config.eval.max_scores_mb,
            )
            items[known] = top
            scores[known] = top_scores
        if fallback.any():
            pop, counts = self._popular_items(k)
            items[fallback, : pop.size] = pop
            scores[fallback, : pop.size] = counts
        return items, scores, fallback

    def recommend(
        self,
        histories: Sequence[Sequence[Any]],
        k: int = 10,
        exclude_history: bool = True,
        with_scores: bool = False,
    ) -> list[list[Any]]:
        """Top-``k`` original item ids for each history (a list of original item ids, oldest
        first); with ``with_scores``, ``(item, score)`` pairs. Unknown items are skipped; an
        empty history gets the most popular items (scores: their interaction counts)."""
        seqs, _, _ = self._internal(histories)
        items, scores, _ = self._top_k(seqs, k, exclude_history)
        ids = self.dataset.item_ids
        out: list[list[Any]] = []
        for row, row_scores in zip(items, scores):
            keep = row > 0
            names = [ids[i - 1] for i in row[keep]]
            out.append(list(zip(names, row_scores[keep].tolist())) if with_scores else names)
        return out

    def recommend_frame(
        self,
        histories: Sequence[Sequence[Any]],
        users: Sequence[Any] | None = None,
        k: int = 10,
        exclude_history: bool = True,
    ) -> tuple[pl.DataFrame, HistoryStats]:
        """The recommendations of :meth:`recommend` as a frame (``user, rank, item, score,
        fallback``; ``user`` is the history's position unless ``users`` names them) and the
        counts of what the histories held."""
        if users is None:
            users = [str(i) for i in range(len(histories))]
        if len(users) != len(histories):
            raise ConfigError(f"users: {len(users)} names for {len(histories)} histories")
        seqs, unknown, total = self._internal(histories)
        items, scores, fallback = self._top_k(seqs, k, exclude_history)
        stats = HistoryStats(len(seqs), total, unknown, int(fallback.sum()))
        return self._frame(np.array([str(u) for u in users], dtype=object), items, scores,
                           fallback), stats

    def _frame(
        self, users: np.ndarray, items: np.ndarray, scores: np.ndarray, fallback: np.ndarray
    ) -> pl.DataFrame:
        k = items.shape[1]
        names = np.array(["", *self.dataset.item_ids], dtype=object)
        keep = items.reshape(-1) > 0
        return pl.DataFrame(
            {
                "user": users[np.repeat(np.arange(users.size), k)][keep].tolist(),
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), users.size)[keep],
                "item": names[items.reshape(-1)][keep].tolist(),
                "score": scores.reshape(-1)[keep].astype(np.float64),
                "fallback": np.repeat(fallback, k)[keep],
            },
            schema=_SCHEMA,
        )

    def recommend_file(
        self,
        histories: str | Path,
        out: str | Path,
        k: int = 10,
        exclude_history: bool = True,
        overwrite: bool = False,
        chunk: int = 4096,
        format: str = "auto",
        user_col: str = "user_id",
        item_col: str = "item_id",
        time_col: str | None = "auto",
    ) -> HistoryStats:
        """Top-``k`` for every history of a file (see :func:`iter_histories`), written to
        ``out`` (``.parquet`` or ``.csv``: ``user, rank, item, score, fallback`` with original
        ids). Streams: ``chunk`` users are read, scored and written at a time. The output
        appears whole or not at all."""
        out = Path(out)
        suffix = out.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise ConfigError(f"--out {out}: must end in .parquet or .csv")
        histories = Path(histories)
        check_output_file(out, overwrite, [histories])
        chunks = iter_histories(histories, chunk, format, user_col, item_col, time_col)
        stats = HistoryStats()
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            parts: list[Path] = []
            for users, hists in chunks:
                frame, part_stats = self.recommend_frame(hists, users, k, exclude_history)
                stats.add(part_stats)
                part = work / f"part-{len(parts):06d}.parquet"
                frame.write_parquet(part)
                parts.append(part)
                logger.debug("scored %d histories", stats.histories)
            if not parts:
                raise DataError(f"{histories}: no histories in the file")
            tmp = work / f"all{suffix}"
            lazy = pl.scan_parquet(parts)
            if suffix == ".parquet":
                lazy.sink_parquet(tmp)
            else:
                lazy.sink_csv(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            check_output_file(out, overwrite, [histories])
            os.replace(tmp, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return stats

    # ------------------------------------------------------------------ known users
    def recommend_users(
        self,
        users: Sequence[str] | None = None,
        k: int = 10,
        split: str | None = None,
        exclude_history: bool = True,
    ) -> pl.DataFrame:
        """Top-``k`` for the dataset's users (original ids; default all) from their sequence,
        or with ``split`` ('valid'/'test') from exactly the input that split's evaluation uses,
        for every evaluated user, with the split's held-out ``target`` column."""
        store = self.dataset.store
        if users is not None:
            index = self.dataset.user_index()
            wanted = [str(u).strip() for u in users if str(u).strip()]
            missing = [u for u in wanted if u not in index]
            if missing:
                raise DataError(f"--users: unknown user ids {missing[:5]}")
            rows = np.array([index[u] for u in wanted], dtype=np.int64)
        elif split:
            # the users the split's metrics are computed over (eval.sample_users of the run)
            ecfg = self.config.eval
            rows = eval_users(store, ecfg.sample_users, ecfg.seed)
        else:
            rows = np.arange(store.n_users, dtype=np.int64)
        if split:
            short = rows[store.lengths()[rows] < 3]
            if short.size:
                raise DataError(
                    f"--users: user {self.dataset.user_ids[int(short[0])]!r} has fewer than 3 "
                    f"interactions, so it has no {split} target"
                )
        items, scores = recommend_top_k(
            self.model,
            store,
            rows,
            k,
            self.max_len,
            exclude_history=exclude_history,
            batch_size=self.config.eval.batch_size,
            split=split,  # type: ignore[arg-type]
            max_scores_mb=self.config.eval.max_scores_mb,
        )
        user_ids = np.array(self.dataset.user_ids, dtype=object)
        frame = self._frame(
            user_ids[rows], items, scores.astype(np.float64), np.zeros(rows.size, dtype=bool)
        ).drop("fallback")
        if split:  # the held-out item the split's metrics score these lists against
            _, targets = store.eval_inputs(rows, 1, split)
            names = np.array(["", *self.dataset.item_ids], dtype=object)
            keep = items.reshape(-1) > 0
            target = names[np.repeat(targets, items.shape[1])][keep]
            frame = frame.with_columns(pl.Series("target", target.tolist(), dtype=pl.String))
        return frame

    def evaluate(
        self, split: str = "test", protocol: str | None = None, exclude_history: bool = True
    ) -> EvalResult:
        """The run's metrics on ``split`` (full ranking or the sampled protocol)."""
        import dataclasses

        ev = self.config.eval
        if protocol:
            if protocol not in ("full", "sampled"):
                raise ConfigError(f"protocol={protocol!r}: must be 'full' or 'sampled'")
            ev = dataclasses.replace(ev, protocol=protocol)  # type: ignore[arg-type]
        if not exclude_history:
            ev = dataclasses.replace(ev, exclude_history=False)
        return evaluate(
            self.model, self.dataset.store, split, ev, self.max_len  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ export
    @torch.inference_mode()
    def item_vectors(self) -> dict[str, np.ndarray]:
        """The item tables (n_items, ·) float32, row ``r`` = item ``item_ids[r]``: ``items``
        (what the score uses: user vector @ items.T, plus a sparse text blend's term where the
        run has one, h2rec.blend), and ``hid`` / ``sid`` where the model has
        them (fusion's and, by default, H2Rec's ``items`` is hid + sid; H2Rec's is [hid ; sid]
        with ``model.item_score=paired``)."""
        model = self.model
        rows = torch.arange(1, self.dataset.n_items + 1, device=_device(model))
        out = {"items": model.all_item_vectors()[1:].float().cpu().numpy()}
        if hasattr(model, "hid"):
            out["hid"] = model.hid.weight[1:].float().cpu().numpy()
        if hasattr(model, "sid"):
            out["sid"] = model.sid(rows).float().cpu().numpy()
        return {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in out.items()}

    def encoder(self) -> UserEncoder:
        """The user encoder as a plain module (eval mode, CPU or the model's device)."""
        return UserEncoder(self.model).eval()

    def export(self, out: str | Path, faiss: bool = False, overwrite: bool = False) -> Path:
        """Write what a service needs into the folder ``out``: ``encoder.pt2`` (a
        ``torch.export`` program, ``torch.export.load(path).module()``: int64 (B, max_len)
        left-padded item rows -> float32 (B, E)), ``items.npy
        (n_items, E) and ``hid.npy`` / ``sid.npy`` where the model has them, ``item_ids.json``
        (row r of the tables), ``manifest.json``, for a run with a sparse text blend its rows
        ``text_rows.npz`` (the manifest gives the score), and with ``faiss`` an inner-product
        index ``items.faiss`` of ``items.npy`` (the inner-product part of the score only). The encoder is checked after loading it back: its
        scores match the model's. The folder appears whole or not at all."""
        out = Path(out)
        check_output_dir(out, "export", overwrite)
        if faiss:
            try:
                import faiss as faiss_lib
            except ImportError as err:
                raise ConfigError("--faiss: the faiss package is not installed "
                                  "(pip install faiss-cpu)") from err
        with locked(out, "export folder"):
            recover(out)
            check_output_dir(out, "export", overwrite)
            work = new_dir_beside(out, "export")
            device = _device(self.model)
            try:
                vectors = self.item_vectors()
                for name, array in vectors.items():
                    np.save(work / f"{name}.npy", array)
                (work / "item_ids.json").write_text(json.dumps(self.item_ids) + "\n", "utf8")
                torch.export.save(self._exported(), work / "encoder.pt2")
                loaded = torch.export.load(work / "encoder.pt2").module()
                max_err = self._check_encoder(loaded, vectors)
                text_term = self._export_text_blend(work)
                if faiss:
                    index = faiss_lib.IndexFlatIP(vectors["items"].shape[1])
                    index.add(vectors["items"])
                    faiss_lib.write_index(index, str(work / "items.faiss"))
                manifest = {
                    "format": "h2rec-export",
                    "version": 1,
                    "model": self.kind,
                    "max_len": self.max_len,
                    "dim": int(vectors["items"].shape[1]),
                    "n_items": self.dataset.n_items,
                    "item_fingerprint": self.dataset.item_fingerprint,
                    "files": sorted(p.name for p in work.iterdir() if not p.name.startswith(".")),
                    "encoder_input": "int64 (B, max_len): the most recent items as rows "
                    "r + 1 of item_ids.json, oldest first, left-padded with 0",
                    "score": "encoder(input) @ items.T; row r of items.npy is item_ids[r]",
                    "encoder_check_max_abs_error": max_err,
                }
                if text_term is not None:
                    manifest["text_blend"] = text_term
                    manifest["score"] = (
                        "encoder(input) @ items.T + weight * (q @ T.T), T the CSR rows of "
                        "text_rows.npz (row r: item_ids[r]) and q = sum over k of "
                        "exp(-decay * k) * T[row of the item k steps before the last]; row r "
                        "of items.npy is item_ids[r]; items.faiss, when written, holds the "
                        "inner-product part only"
                    )
                (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf8")
                swap_in(work, out)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            finally:
                self.model.to(device)  # tracing and the check run on the CPU
        return out

    def _export_text_blend(self, work: Path) -> dict[str, Any] | None:
        """With a sparse text blend (h2rec.blend): its rows as ``text_rows.npz`` (CSR
        ``indptr``, ``indices``, ``data``, ``shape``; row r: item_ids[r]), checked by scoring 37
        random histories from the file against the model's term; the manifest's entry."""
        term = getattr(self.model, "text_blend", None)
        if term is None:
            return None
        rows = term.rows
        indptr = rows.indptr[1:] - rows.indptr[1]  # without the padding row
        shape = np.array([rows.n_rows - 1, rows.n_terms], dtype=np.int64)
        np.savez(work / "text_rows.npz", indptr=indptr, indices=rows.indices, data=rows.data,
                 shape=shape)
        seq = self._example_inputs(37, 2)
        want = term(seq).numpy()[:, 1:]
        with np.load(work / "text_rows.npz") as saved:
            got = _text_scores_numpy(seq.numpy(), saved, term.weight, term.decay)
        err = float(np.abs(got - want).max())
        if not np.isfinite(err) or err > 1e-4 * (float(np.abs(want).max()) + 1e-6):
            raise OutputError(f"text_rows.npz does not reproduce the text blend's scores "
                              f"(max |difference| {err:.3g})")
        return {"file": "text_rows.npz", "weight": term.weight, "decay": term.decay,
                "check_max_abs_error": err}

    def _example_inputs(self, b: int, seed: int) -> Tensor:
        """(b, max_len) left-padded rows of random items with lengths 1..max_len."""
        gen = np.random.default_rng(seed)
        seq = np.zeros((b, self.max_len), dtype=np.int64)
        for row in range(b):
            n = int(gen.integers(1, self.max_len + 1))
            seq[row, self.max_len - n :] = gen.integers(1, self.dataset.n_items + 1, size=n)
        return torch.from_numpy(seq)

    def _exported(self) -> Any:
        """The encoder as a ``torch.export`` program on the CPU, any batch size."""
        encoder = self.encoder().cpu()
        example = self._example_inputs(4, 0)
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad():
            return torch.export.export(encoder, (example,), dynamic_shapes={"seq": {0: batch}})

    def _check_encoder(self, loaded: Any, vectors: dict[str, np.ndarray]) -> float:
        """Largest |score difference| between the reloaded encoder and the model on 37 random
        histories; an OutputError when it is not within float32 rounding."""
        seq = self._example_inputs(37, 1)
        with torch.no_grad():
            want = self.encoder().cpu()(seq).numpy()
            got = loaded(seq).numpy()
        items = vectors["items"]
        err = float(np.abs(got @ items.T - want @ items.T).max())
        scale = float(np.abs(want @ items.T).max()) + 1e-6
        if not np.isfinite(err) or err > 1e-4 * scale:
            raise OutputError(f"encoder export does not reproduce the model's scores "
                              f"(max |difference| {err:.3g}, scores up to {scale:.3g})")
        return err


def _text_scores_numpy(
    seq: np.ndarray, saved: Any, weight: float, decay: float
) -> np.ndarray:
    """The text blend's scores (B, n_items) from an export's ``text_rows.npz``, in plain numpy:
    what outside code computes (seq: left-padded rows r + 1 of item_ids, 0 = padding)."""
    n, n_terms = (int(x) for x in saved["shape"])
    indptr, indices, data = saved["indptr"], saved["indices"], saved["data"].astype(np.float64)
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    out = np.zeros((seq.shape[0], n))
    for b in range(seq.shape[0]):
        q = np.zeros(n_terms)
        for k, item in enumerate(seq[b, ::-1]):
            if item > 0:
                lo, hi = indptr[item - 1], indptr[item]
                q[indices[lo:hi]] += np.exp(-decay * k) * data[lo:hi]
        out[b] = weight * np.bincount(row_of, weights=data * q[indices], minlength=n)
    return out


def _device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device  # type: ignore[no-any-return]
    return torch.device("cpu")
