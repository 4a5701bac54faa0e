"""The dataset directory: ``prepare`` writes it, ``load_dataset`` reads and validates it.

``prepare`` reads, drops bad rows (or stops at the first one), filters (iterated k-core or the
single-pass minimum count of SASRec's preprocessing), orders each user's events by timestamp with
ties kept in file order, numbers users in order of first appearance in the file and items in order
of first appearance when the users' sorted sequences are read one after another (this reproduces
S3Rec's ids from ``user_sequence.txt``), and writes the dataset directory under a temporary name
that is renamed when complete. Everything runs in polars; no Python loop touches a row.

A dataset directory holds ``offsets.npy`` (int64) and ``items.npy`` (int32 while the ids fit,
else int64: the CSR sequences, memory-mapped by ``load_dataset``),
``users.parquet``, ``items.parquet`` (original ids and item text), ``stats.json``, ``meta.json``
and, when rows were dropped, ``skipped_rows.csv``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from h2rec.data.files import _first_line
from h2rec.data.filters import FilterOptions, apply_filter
from h2rec.data.ids import encode_ids
from h2rec.data.items import ItemTableOptions, apply_template, read_item_table
from h2rec.data.readers import ReadOptions, read_interactions
from h2rec.data.stats import compute_stats
from h2rec.data.stream import Coded, read_coded
from h2rec.errors import DataError, quote
from h2rec.outputs import (
    check_output_dir,
    item_fingerprint,
    locked,
    named,
    new_dir_beside,
    recover,
    swap_in,
)

# the package's logger, as before the split into modules: log lines keep reading "h2rec.data"
logger = logging.getLogger("h2rec.data")

DATASET_FORMAT = "h2rec-dataset"
DATASET_VERSION = 1
SKIPPED_FILE = "skipped_rows.csv"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf8")
    os.replace(tmp, path)


def prepare(
    interactions: str | Path,
    out: str | Path,
    *,
    read: ReadOptions = ReadOptions(),
    items: str | Path | None = None,
    item_table: ItemTableOptions = ItemTableOptions(),
    filter: FilterOptions = FilterOptions(),
    min_length: int = 3,
    short_users: Literal["drop", "error"] = "drop",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Read, filter, order and remap interactions (and item text), write a dataset directory.

    ``min_length`` is the shortest sequence the leave-one-out split can use (3: one training
    item, one validation, one test); shorter users are dropped with a warning and written to
    ``skipped_rows.csv`` (or, with ``short_users="error"``, stop the run). Returns ``out``."""
    out = Path(out)
    if min_length < 1:
        raise DataError(f"min_length={min_length}: must be >= 1")
    inputs = (interactions, items, item_table.id_map)
    check_output_dir(out, "dataset", overwrite, inputs)  # before reading anything
    with locked(out, "dataset folder"):
        recover(out)
        check_output_dir(out, "dataset", overwrite, inputs)
        return _prepare(interactions, out, read, items, item_table, filter, min_length,
                        short_users, name)


def _repeated_rows(frame: pl.DataFrame, key: list[str]) -> int:
    """Rows equal on ``key`` (integer codes and a numeric timestamp) to an earlier row.

    Exact, in about 25 bytes a row (``n_unique`` over the frame's rows took over 100): only rows
    whose 64-bit mix of ``key`` occurs twice can repeat one, and those few are compared in
    full."""
    mixed = np.zeros(frame.height, dtype=np.uint64)
    for j, col in enumerate(key):
        v = frame.get_column(col).to_numpy()
        if v.dtype.kind == "f":
            v = v + 0.0  # -0.0 -> 0.0: equal values, equal bits
        bits = v.view(np.uint64) if v.dtype.itemsize == 8 else v.astype(np.uint64)
        mixed ^= bits * np.uint64(_MIX[j])
        mixed ^= mixed >> np.uint64(31)
        mixed *= np.uint64(_MIX[-1])
        del v, bits
    ordered = np.sort(mixed)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if repeated.size == 0:
        return 0
    at = np.minimum(np.searchsorted(repeated, mixed), repeated.size - 1)
    maybe = frame.filter(pl.Series(repeated[at] == mixed))
    return maybe.height - maybe.n_unique(subset=key)


# odd 64-bit constants (splitmix64's and xxhash's) of _repeated_rows' mix
_MIX = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xBF58476D1CE4E5B9)


def _prepare(
    interactions: str | Path,
    out: Path,
    read: ReadOptions,
    items: str | Path | None,
    item_table: ItemTableOptions,
    filter: FilterOptions,
    min_length: int,
    short_users: str,
    name: str | None,
) -> Path:
    # from here on users and items are integer codes; the strings live once, in two Series
    coded = read_coded(interactions, read)  # large csv/tsv logs: in chunks
    if coded is None:
        data = read_interactions(interactions, read)
        frame, user_names, item_names = encode_ids(data.frame)
        coded = Coded(frame, user_names, item_names, data.path, data.format,
                      data.has_timestamp, data.skipped)
        del data, frame
    src, has_ts, n_bad = coded.path, coded.has_timestamp, coded.skipped.height
    frame, user_names, item_names = coded.frame, coded.user_names, coded.item_names
    n_dup = 0
    if coded.format != "sequences":  # a sequence line may repeat an item on purpose
        key = ["user", "item", "timestamp"] if has_ts else ["user", "item"]
        n_dup = _repeated_rows(frame, key)  # codes: as many as of the ids
        if n_dup:
            logger.warning(
                "%s: %d rows repeat an earlier row exactly (same %s); they are kept as repeated "
                "interactions (remove them from the file if they are copies)",
                src, n_dup, ", ".join(key),
            )
    skipped_parts = [coded.skipped]
    meta_read = asdict(read) | {"format": coded.format}
    del coded

    table: pl.DataFrame | None = None
    extra: dict[str, Any] = {}
    if items is not None:
        table = read_item_table(items, item_table)
        joined = item_names.to_frame("item").join(
            table.select("id"), left_on="item", right_on="id", how="semi"
        )
        if joined.height == 0:
            raise DataError(
                f"{items}: no item id joins the interactions of {src} "
                f"(interaction ids like {item_names.head(3).to_list()}, table ids like "
                f"{table.head(3).get_column('id').to_list()}); "
                "check the id column, id_offset or id_map"
            )
        extra["item_table_rows"] = table.height
        extra["item_table_rows_unused"] = table.height - joined.height

    n_read = frame.height
    frame, passes = apply_filter(frame, filter)
    n_filtered = n_read - frame.height
    if frame.height == 0:
        raise DataError(
            f"{src}: the {filter.kind} filter (min_user={filter.min_user}, "
            f"min_item={filter.min_item}) removed every interaction"
        )
    lengths = frame.group_by("user").agg(pl.len(), pl.col("line").min().alias("first"))
    short = lengths.filter(pl.col("len") < min_length)
    n_short = short.height
    if n_short:
        if short_users == "error":
            row = short.sort("first").row(0, named=True)
            raise DataError(
                f"{src}:{row['first']}: user {quote(user_names[row['user']])} has {row['len']} "
                f"interactions, fewer than min_length={min_length} that the leave-one-out split "
                f"needs ({n_short} such users)"
            )
        short_rows = frame.join(short.select("user"), on="user", how="semi").sort("line")
        logger.warning(
            "%s: dropped %d users with fewer than %d interactions (%d interactions); "
            "rows written to %s",
            src, n_short, min_length, short_rows.height, SKIPPED_FILE,
        )
        skipped_parts.append(
            pl.DataFrame(
                {
                    "file": pl.Series([str(src)] * short_rows.height, dtype=pl.String),
                    "line": short_rows.get_column("line"),
                    "reason": pl.Series(
                        [f"user shorter than min_length={min_length}"] * short_rows.height,
                        dtype=pl.String,
                    ),
                    "content": pl.DataFrame(
                        {
                            "u": user_names.gather(short_rows.get_column("user")),
                            "i": item_names.gather(short_rows.get_column("item")),
                        }
                    ).select(pl.concat_str(["u", "i"], separator=" ")).to_series(),
                }
            )
        )
        # a filter, not an anti join: the rows stay in file order, which the sort below keeps
        frame = frame.filter(~pl.col("user").is_in(short.get_column("user").implode()))
        lengths = lengths.filter(pl.col("len") >= min_length)
    if frame.height == 0:
        raise DataError(f"{src}: no user has at least min_length={min_length} interactions")

    # users numbered by first appearance in the file, events by (time, file line)
    first = lengths.sort("first").select(pl.col("user"))
    uid_of = np.zeros(user_names.len(), dtype=np.uint32)  # user code -> uid (a gather, no join)
    uid_of[first.get_column("user").to_numpy()] = np.arange(first.height, dtype=np.uint32)
    frame = frame.with_columns(
        pl.Series("uid", uid_of[frame.get_column("user").to_numpy()])
    ).drop("user")
    del uid_of
    # the rows are in file order (reading and every filter keep it), so a stable sort by user
    # and time leaves ties in file order (a line's tokens included), with two sort keys at most
    frame = frame.sort(["uid", "timestamp"] if has_ts else ["uid"], maintain_order=True)
    # items numbered by first appearance in the sorted sequences
    item_codes = frame.get_column("item").to_numpy()
    order = frame.get_column("item").unique(maintain_order=True).to_numpy()
    new_id = np.zeros(item_names.len(), dtype=_item_dtype(order.size))
    new_id[order] = np.arange(1, order.size + 1)
    items_np = new_id[item_codes]
    del item_codes
    n_users = first.height
    n_items = int(order.size)
    if n_items < 2:
        raise DataError(
            f"{src}: every kept interaction is with one item ({quote(item_names[int(order[0])])}); "
            "ranking needs at least 2 items"
        )
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(frame.get_column("uid").to_numpy(), minlength=n_users), out=offsets[1:])

    ties = 0
    if has_ts:
        # interactions whose timestamp equals that of an earlier interaction of the same user
        # (the frame is sorted by user then time, so a tie equals its predecessor)
        uid = frame.get_column("uid").to_numpy()
        ts = frame.get_column("timestamp").to_numpy()
        ties = int(np.count_nonzero((uid[1:] == uid[:-1]) & (ts[1:] == ts[:-1])))
        del uid, ts
    del frame

    users = pl.DataFrame(
        {
            "user": np.arange(n_users, dtype=np.int64),
            "original_id": user_names.gather(first.get_column("user")),
        }
    )
    item_order = pl.DataFrame(
        {"iid": np.arange(1, n_items + 1, dtype=np.int64), "item": item_names.gather(order)}
    )
    item_frame = item_order.select(pl.col("iid").alias("item"), pl.col("item").alias("original_id"))
    if table is not None:
        item_frame = item_frame.join(
            table, left_on="original_id", right_on="id", how="left", maintain_order="left"
        ).with_columns(pl.col("text").fill_null(""))
        n_missing = int(
            item_frame.join(table.select("id"), left_on="original_id", right_on="id", how="anti")
            .height
        )
        if n_missing:
            logger.warning(
                "%s: %d of %d items have no row in %s; their text is empty",
                src, n_missing, n_items, items,
            )
        extra["items_without_table_row"] = n_missing
    else:
        item_frame = item_frame.with_columns(pl.lit("").alias("text"))
    item_frame = item_frame.select(
        "item", "original_id", "text", *[c for c in item_frame.columns
                                         if c not in ("item", "original_id", "text")]
    )

    stats = compute_stats(offsets, items_np, n_items, item_frame.get_column("text"))
    stats["timestamp_ties"] = ties
    skipped = pl.concat(skipped_parts)
    meta = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "name": name or out.name,
        "sources": {
            "interactions": str(Path(interactions).resolve()),
            "items": str(Path(items).resolve()) if items is not None else None,
        },
        "read": meta_read,
        "item_table": asdict(item_table) if items is not None else None,
        "filter": asdict(filter) | {"passes": passes, "removed": n_filtered},
        "min_length": min_length,
        "short_users_dropped": n_short,
        "rows_read": n_read + n_bad,
        "rows_skipped": skipped.height,
        "has_timestamp": has_ts,
        "duplicate_rows": n_dup,
        "item_ids_sha256": item_fingerprint(item_order.get_column("item").to_list()),
        **extra,
    }

    tmp = new_dir_beside(out, "dataset")
    try:
        np.save(tmp / "offsets.npy", offsets)
        # int32 ids whenever the catalogue allows (new_id's dtype): half the bytes, and the
        # store reads the memory-mapped file in place (load_dataset)
        np.save(tmp / "items.npy", items_np)
        users.write_parquet(tmp / "users.parquet")
        item_frame.write_parquet(tmp / "items.parquet")
        if skipped.height:
            skipped.sort("file", "line").write_csv(tmp / SKIPPED_FILE)
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "meta.json", meta)
        swap_in(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise named(err, out) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote %s: %d users, %d items, %d interactions", out, n_users, n_items, items_np.size
    )
    return out


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: CSR sequences in the Rust store plus the id maps and item text."""

    path: Path
    store: Any  # h2rec._core.SequenceStore
    item_ids: list[str]  # index r = original id of internal item r + 1
    user_ids: list[str]  # index u = original id of user row u
    item_text: list[str]  # index r = text of internal item r + 1
    stats: dict[str, Any]
    name: str

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @cached_property
    def item_fingerprint(self) -> str:
        """SHA-256 of the ordered original item ids: what embeddings, Semantic IDs and
        checkpoints record to prove they were built for this dataset's items."""
        return item_fingerprint(self.item_ids)

    def item_index(self) -> dict[str, int]:
        """Original item id -> internal id (1..n_items)."""
        return {orig: i + 1 for i, orig in enumerate(self.item_ids)}

    def user_index(self) -> dict[str, int]:
        """Original user id -> user row (0..n_users-1)."""
        return {orig: u for u, orig in enumerate(self.user_ids)}

    def items_frame(self) -> pl.DataFrame:
        """The full item table (``item``, ``original_id``, ``text`` and any kept text columns)."""
        return pl.read_parquet(self.path / "items.parquet")


def _item_dtype(n_items: int) -> type:
    """The dtype ``items.npy`` is written with: int32 while the ids fit, else int64."""
    return np.int32 if n_items <= np.iinfo(np.int32).max else np.int64


def _load_npy(path: Path, dtypes: tuple[type, ...], ndim: int) -> np.ndarray:
    """A ``.npy`` array of one of ``dtypes``, memory-mapped read-only (an empty file is read
    plainly: it cannot be mapped)."""
    if not path.exists():
        raise DataError(f"{path}: missing; not a complete dataset directory")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
        if arr.size == 0:
            arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = _first_line(exc)[:200]
        raise DataError(f"{path}: cannot read ({reason}); not a complete dataset directory") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: not a .npy array")
    if arr.dtype not in [np.dtype(d) for d in dtypes] or arr.ndim != ndim:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise DataError(f"{path}: expected {want} with {ndim} dims, "
                        f"got {arr.dtype} with shape {arr.shape}")
    return arr


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset directory written by ``prepare`` and validate it.

    ``offsets.npy`` and ``items.npy`` are memory-mapped read-only and, with int32 ids, read in
    place by the Rust store. ``prepare --overwrite`` replaces the directory by a rename, which a
    loaded dataset survives; a tool that rewrote these files in place (same inode) while a
    process has them loaded would change what that process reads, and one that truncated them
    would crash it (SIGBUS), as with any memory-mapped file."""
    from h2rec._core import SequenceStore

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a dataset directory")
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf8"))
        stats = json.loads((path / "stats.json").read_text(encoding="utf8"))
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: missing; not a complete dataset directory") from exc
    except (ValueError, OSError) as exc:  # bad JSON, not UTF-8, unreadable
        raise DataError(f"{path}: bad JSON in meta.json or stats.json ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(stats, dict):
        raise DataError(f"{path}: meta.json and stats.json must hold JSON objects")
    if meta.get("format") != DATASET_FORMAT:
        raise DataError(f"{meta_path}: format={meta.get('format')!r}, expected {DATASET_FORMAT!r}")
    if meta.get("version") != DATASET_VERSION:
        raise DataError(f"{meta_path}: version={meta.get('version')!r}, expected {DATASET_VERSION}")
    # memory-mapped: the Rust store reads int64 offsets and int32 items in place, so the
    # sequences are in memory once (as the page cache's), not twice
    offsets = _load_npy(path / "offsets.npy", (np.int64,), 1)
    items = _load_npy(path / "items.npy", (np.int32, np.int64), 1)
    try:
        users = pl.read_parquet(path / "users.parquet")
        item_table = pl.read_parquet(path / "items.parquet")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot read users.parquet/items.parquet ({exc})") from exc
    for name, frame, cols in (
        ("users.parquet", users, ("user", "original_id")),
        ("items.parquet", item_table, ("item", "original_id", "text")),
    ):
        for c in cols:
            if c not in frame.columns:
                raise DataError(f"{path / name}: column {c!r} missing")
    n_items = item_table.height
    n_users = users.height
    if not np.array_equal(item_table.get_column("item").to_numpy(), np.arange(1, n_items + 1)):
        raise DataError(f"{path / 'items.parquet'}: column 'item' is not 1..{n_items} in order")
    if not np.array_equal(users.get_column("user").to_numpy(), np.arange(n_users)):
        raise DataError(f"{path / 'users.parquet'}: column 'user' is not 0..{n_users - 1} in order")
    if offsets.size != n_users + 1:
        raise DataError(
            f"{path / 'offsets.npy'}: {offsets.size} entries, expected n_users+1={n_users + 1}"
        )
    try:
        store = SequenceStore(offsets, items, n_items)
    except ValueError as exc:
        raise DataError(f"{path}: invalid sequences ({exc})") from exc
    return Dataset(
        path=path,
        store=store,
        item_ids=item_table.get_column("original_id").cast(pl.String).to_list(),
        user_ids=users.get_column("original_id").cast(pl.String).to_list(),
        item_text=item_table.get_column("text").fill_null("").to_list(),
        stats=stats,
        name=str(meta.get("name", path.name)),
    )


def read_text_for_items(path: str | Path, template: str | None = None) -> list[str]:
    """The text of every item of a dataset directory, optionally rebuilt with ``template`` over
    the kept item columns; index r = item r + 1."""
    path = Path(path)
    try:
        frame = pl.read_parquet(path / "items.parquet")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path / 'items.parquet'}: cannot read ({exc})") from exc
    if template is None:
        return frame.get_column("text").fill_null("").to_list()
    return apply_template(frame, template, [], path / "items.parquet").to_list()
