"""Interaction files: one reader per layout, into an ``Interactions`` frame.

Inputs (``ReadOptions.format``):

- ``csv`` / ``tsv`` / ``parquet``: a table with user, item and optional timestamp columns, names
  configurable (``user_id``, ``item_id``, ``timestamp`` by default).
- ``sequences``: one line per user, ``user item item ...``, already in chronological order
  (S3Rec/SASRec ``Beauty.txt``, GRAM ``user_sequence.txt``).
- ``pairs``: one interaction per line, ``user item [timestamp]`` (SASRec ``ml-1m.txt``), each user's
  lines in chronological order unless a timestamp column is present.
- ``recbole``: RecBole atomic ``.inter`` files, tab-separated with a typed header such as
  ``user_id:token  item_id:token  rating:float  timestamp:float``.
- ``movielens``: MovieLens ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from h2rec.data.files import (
    _AUTO,
    _bad_rows,
    _check_file,
    _empty_skipped,
    _handle_bad,
    _read_lines,
    _read_table_rows,
    _require_columns,
)
from h2rec.errors import DataError

# the package's logger, as before the split into modules: log lines keep reading "h2rec.data"
logger = logging.getLogger("h2rec.data")

INTERACTION_FORMATS = (
    "auto", "csv", "tsv", "parquet", "sequences", "pairs", "recbole", "movielens",
)

Format = Literal["auto", "csv", "tsv", "parquet", "sequences", "pairs", "recbole", "movielens"]


@dataclass(frozen=True)
class ReadOptions:
    """How to read an interaction file."""

    format: Format = "auto"  # file layout; "auto" guesses from the suffix (and content for .txt)
    user_col: str = "user_id"  # user column (csv/tsv/parquet/recbole)
    item_col: str = "item_id"  # item column (csv/tsv/parquet/recbole)
    time_col: str | None = "auto"  # timestamp column; "auto": "timestamp" if present; None: no time
    separator: str | None = None  # csv/tsv field separator; None: "," for csv, "\t" for tsv
    encoding: Literal["utf8", "latin-1"] = "utf8"  # text encoding of the file
    on_bad_line: Literal["error", "skip"] = "error"  # unparsable rows: stop, or skip and record
    # csv/tsv logs larger than a chunk are read this many rows at a time, their ids coded chunk
    # by chunk (h2rec.data.stream), so the whole log's id strings are never in memory at once;
    # 0 = always read whole
    chunk_rows: int = 2_000_000


@dataclass(frozen=True)
class Interactions:
    """Interactions as read from one file, before filtering.

    ``frame`` has columns ``user`` (str), ``item`` (str), ``line`` (int64, 1-based line or row
    number in the file) and, when the file has times, ``timestamp`` (float64 or int64).
    ``skipped`` lists the rows that were dropped as unparsable: ``file, line, reason, content``.
    """

    frame: pl.DataFrame
    path: Path
    format: str
    has_timestamp: bool
    skipped: pl.DataFrame


def _parse_timestamp(path: Path, frame: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.Expr]:
    """Turn column ``timestamp`` into a number; return the frame and a mask of bad values."""
    col = frame.get_column("timestamp")
    if col.dtype.is_numeric():
        ts = frame.get_column("timestamp")
        if ts.dtype.is_float():
            ts = ts.cast(pl.Float64)
        else:
            ts = ts.cast(pl.Int64, strict=False)  # beyond int64: a bad timestamp, not a crash
        frame = frame.with_columns(ts.alias("timestamp"), col.cast(pl.String).alias("_ts_text"))
        bad = pl.col("timestamp").is_null() | (
            pl.col("timestamp").is_nan() if ts.dtype == pl.Float64 else pl.lit(False)
        )
        return frame, bad
    if col.dtype.is_temporal():
        frame = frame.with_columns(pl.col("timestamp").dt.epoch("ms").cast(pl.Int64))
        return frame, pl.col("timestamp").is_null()
    text = pl.col("timestamp").cast(pl.String).str.strip_chars()
    as_int = text.cast(pl.Int64, strict=False)
    as_float = text.cast(pl.Float64, strict=False)
    frame = frame.with_columns(
        as_int.alias("_ts_int"), as_float.alias("_ts_float"), text.alias("_ts_text")
    )
    if frame.get_column("_ts_int").null_count() == frame.get_column("_ts_text").null_count():
        frame = frame.with_columns(pl.col("_ts_int").alias("timestamp"))
    elif frame.get_column("_ts_float").null_count() == frame.get_column("_ts_text").null_count():
        frame = frame.with_columns(pl.col("_ts_float").alias("timestamp"))
    else:
        dt = pl.col("_ts_text").str.to_datetime(strict=False, time_unit="ms")
        frame = frame.with_columns(
            pl.coalesce(pl.col("_ts_float"), dt.dt.epoch("ms").cast(pl.Float64)).alias("timestamp")
        )
        if frame.get_column("timestamp").null_count() > frame.get_column("_ts_text").null_count():
            logger.info("%s: column %r mixes numbers and dates or has bad values", path, name)
    frame = frame.drop("_ts_int", "_ts_float")
    return frame, pl.col("timestamp").is_null() | pl.col("timestamp").cast(pl.Float64).is_nan()


def _guess_format(path: Path) -> str:
    suffix = path.suffix.lower()
    by_suffix = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".inter": "recbole",
        ".dat": "movielens",
    }
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix in (".txt", ""):
        return _sniff_text(path)
    raise DataError(
        f"{path}: cannot guess the format from suffix {suffix!r}; "
        f"give one of {', '.join(INTERACTION_FORMATS[1:])}"
    )


def _sniff_text(path: Path) -> str:
    """``pairs`` when the first lines all have two or three fields and users repeat."""
    _check_file(path)
    with path.open("rb") as fh:
        head = [ln.split() for ln in fh.read(1 << 16).splitlines()[:-1] or [b""]]
    head = [t for t in head if t]
    if not head:
        return "sequences"
    firsts = [t[0] for t in head]
    if all(len(t) in (2, 3) for t in head) and len(set(firsts)) < len(firsts):
        return "pairs"
    return "sequences"


def read_interactions(path: str | Path, options: ReadOptions = ReadOptions()) -> Interactions:
    """Read one interaction file into an ``Interactions`` frame (no filtering, no sorting)."""
    path = Path(path)
    fmt = _guess_format(path) if options.format == _AUTO else options.format
    if fmt not in INTERACTION_FORMATS:
        raise DataError(f"format={fmt!r} is not one of {', '.join(INTERACTION_FORMATS[1:])}")
    _check_file(path)
    if fmt in ("csv", "tsv", "parquet", "recbole"):
        frame, skipped = _read_table_interactions(path, fmt, options)
    elif fmt == "sequences":
        frame, skipped = _read_sequences(path, options)
    elif fmt == "pairs":
        frame, skipped = _read_pairs(path, options)
    else:
        frame, skipped = _read_movielens(path, options)
    _handle_bad(path, skipped, options.on_bad_line)
    if frame.height == 0:
        raise DataError(f"{path}: no interactions in the file")
    logger.info("%s: read %d interactions (%s)", path, frame.height, fmt)
    return Interactions(
        frame=frame,
        path=path,
        format=fmt,
        has_timestamp="timestamp" in frame.columns,
        skipped=skipped,
    )


def _read_table_interactions(
    path: Path, fmt: str, options: ReadOptions
) -> tuple[pl.DataFrame, pl.DataFrame]:
    if options.user_col == options.item_col:
        raise DataError(
            f"user column and item column are both {options.user_col!r}; give two columns "
            "(--user-col, --item-col)"
        )
    frame, ragged = _read_table_rows(
        path, fmt, options.separator, options.encoding, (options.user_col, options.item_col),
        options.on_bad_line, short_rows=True,
    )
    _require_columns(path, frame, {"user": options.user_col, "item": options.item_col})
    time_col = options.time_col
    if time_col == _AUTO:
        time_col = "timestamp" if "timestamp" in frame.columns else None
    if time_col is not None:
        _require_columns(path, frame, {"timestamp": time_col})
    cols = [
        pl.col("line"),
        _id_expr(path, frame, options.user_col, "user").str.strip_chars().alias("user"),
        _id_expr(path, frame, options.item_col, "item").str.strip_chars().alias("item"),
    ]
    if time_col is not None:
        cols.append(pl.col(time_col).alias("timestamp"))
    frame = frame.select(cols)
    frame, skipped = _validate_rows(path, frame, content_cols=frame.columns[1:])
    return frame, pl.concat([ragged, skipped])


def _id_expr(path: Path, frame: pl.DataFrame, name: str, role: str) -> pl.Expr:
    """Column ``name`` as string ids: strings and integers as they are, floats only when every
    value is a whole number (``45.0`` -> ``"45"``); nested or binary columns are errors."""
    dtype = frame.schema[name]
    if dtype.is_nested() or dtype in (pl.Binary, pl.Object, pl.Null) or dtype.is_temporal():
        base = dtype.base_type()
        kind = "list" if base in (pl.List, pl.Array) else "struct" if base == pl.Struct else "non-id"
        raise DataError(
            f"{path}: {role} column {name!r} holds {kind} values ({dtype}); ids must be strings "
            "or integers"
        )
    if dtype.is_float():
        col = frame.get_column(name)
        whole = col.is_null() | (col.is_finite() & (col == col.floor()) & (col.abs() < 2.0**53))
        if not whole.all():
            row = frame.filter(~whole).row(0, named=True)
            raise DataError(
                f"{path}:{row['line']}: {role} column {name!r} holds {row[name]!r}, not a "
                "whole number; ids must be strings or integers"
            )
        return pl.col(name).cast(pl.Int64).cast(pl.String)
    return pl.col(name).cast(pl.String)


def _validate_rows(
    path: Path, frame: pl.DataFrame, content_cols: Sequence[str], bad_shape: pl.Expr | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split off rows with a missing user/item, a wrong field count or a bad timestamp."""
    content = pl.concat_str(
        [pl.col(c).cast(pl.String).fill_null("") for c in content_cols], separator=" "
    )
    parts = []
    bad_any = pl.lit(False)
    if bad_shape is not None:
        parts.append(_bad_rows(path, frame, bad_shape, "wrong number of fields", content))
        bad_any = bad_any | bad_shape
    for col, reason in (("user", "missing user id"), ("item", "missing item id")):
        mask = ~bad_any & (pl.col(col).is_null() | (pl.col(col) == ""))
        parts.append(_bad_rows(path, frame, mask, reason, content))
        bad_any = bad_any | pl.col(col).is_null() | (pl.col(col) == "")
    for col in ("user", "item"):
        nul = pl.col(col).str.contains("\x00", literal=True).fill_null(False)
        parts.append(_bad_rows(path, frame, ~bad_any & nul, f"NUL byte in the {col} id", content))
        bad_any = bad_any | nul
    if "timestamp" in frame.columns:
        frame, bad_ts = _parse_timestamp(path, frame, "timestamp")
        raw = pl.col("_ts_text") if "_ts_text" in frame.columns else pl.col("timestamp")
        content = pl.concat_str(
            [pl.col("user").fill_null(""), pl.col("item").fill_null(""),
             raw.cast(pl.String).fill_null("")],
            separator=" ",
        )
        mask = ~bad_any & bad_ts
        parts.append(_bad_rows(path, frame, mask, "bad timestamp", content.fill_null("")))
        bad_any = bad_any | bad_ts
    skipped = pl.concat(parts) if parts else _empty_skipped()
    bad = frame.select(bad_any.fill_null(True)).to_series()
    keep = frame.filter(~bad) if bad.any() else frame  # no copy in the common case
    if "_ts_text" in keep.columns:
        keep = keep.drop("_ts_text")
    return keep, skipped


def _read_sequences(path: Path, options: ReadOptions) -> tuple[pl.DataFrame, pl.DataFrame]:
    lines, not_utf8 = _read_lines(path, options.encoding, options.on_bad_line)
    tokens = lines.with_columns(pl.col("text").str.extract_all(r"\S+").alias("tok"))
    short = pl.col("tok").list.len() < 2
    nul = ~short & pl.col("text").str.contains("\x00", literal=True)
    skipped = pl.concat([
        not_utf8,
        _bad_rows(path, tokens, short, "user without items", pl.col("text")),
        _bad_rows(path, tokens, nul, "NUL byte in an id", pl.col("text")),
    ])
    short = short | nul
    frame = (
        tokens.filter(~short)
        .select(
            pl.col("line"),
            pl.col("tok").list.first().alias("user"),
            pl.col("tok").list.slice(1).alias("item"),
        )
        .explode("item")
    )
    return frame.select("line", "user", "item"), skipped


def _read_pairs(path: Path, options: ReadOptions) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``user item`` or ``user item timestamp`` per line; the width is the most common one."""
    lines, not_utf8 = _read_lines(path, options.encoding, options.on_bad_line)
    tokens = lines.with_columns(pl.col("text").str.extract_all(r"\S+").alias("tok")).with_columns(
        pl.col("tok").list.len().alias("n_tok")
    )
    widths = tokens.filter(pl.col("n_tok").is_between(2, 3)).get_column("n_tok")
    width = int(widths.mode().min()) if widths.len() else 2  # type: ignore[arg-type]
    bad_shape = pl.col("n_tok") != width
    shape_rows = _bad_rows(path, tokens, bad_shape, "wrong number of fields", pl.col("text"))
    use_time = width == 3 and options.time_col is not None
    frame = tokens.filter(~bad_shape).select(
        pl.col("line"),
        pl.col("tok").list.get(0).alias("user"),
        pl.col("tok").list.get(1).alias("item"),
        *([pl.col("tok").list.get(2).alias("timestamp")] if use_time else []),
    )
    frame, skipped = _validate_rows(path, frame, content_cols=frame.columns[1:])
    return frame, pl.concat([not_utf8, shape_rows, skipped])


def _read_movielens(path: Path, options: ReadOptions) -> tuple[pl.DataFrame, pl.DataFrame]:
    lines, not_utf8 = _read_lines(path, options.encoding, options.on_bad_line)
    parts = lines.with_columns(pl.col("text").str.strip_chars().str.split("::").alias("tok"))
    bad_shape = pl.col("tok").list.len() != 4
    shape_rows = _bad_rows(path, parts, bad_shape, "wrong number of fields", pl.col("text"))
    cols = [
        pl.col("line"),
        pl.col("tok").list.get(0).str.strip_chars().alias("user"),
        pl.col("tok").list.get(1).str.strip_chars().alias("item"),
    ]
    if options.time_col is not None:
        cols.append(pl.col("tok").list.get(3).str.strip_chars().alias("timestamp"))
    frame = parts.filter(~bad_shape).select(cols)
    frame, skipped = _validate_rows(path, frame, content_cols=frame.columns[1:])
    return frame, pl.concat([not_utf8, shape_rows, skipped])
