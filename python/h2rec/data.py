"""Data stage: read interaction logs and item tables, filter, order, remap ids, write a dataset.

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

Item tables (``ItemTableOptions.format``): ``csv``/``tsv``/``parquet`` with an id column and text
columns, RecBole ``.item``, MovieLens ``movies.dat`` (title and genres), a JSON object keyed by item
id (LETTER's ``Yelp.item.json``), or ``beauty`` (``products_lookup.csv`` with
``item_id_to_int.json`` beside it). The text of an item is built from its text columns by a
template such as ``"{title}. Categories: {description}"``; without a template the non-empty text
columns are joined with ``"; "``.

``prepare`` reads, drops bad rows (or stops at the first one), filters (iterated k-core or the
single-pass minimum count of SASRec's preprocessing), orders each user's events by timestamp with
ties kept in file order, numbers users in order of first appearance in the file and items in order
of first appearance when the users' sorted sequences are read one after another (this reproduces
S3Rec's ids from ``user_sequence.txt``), and writes the dataset directory under a temporary name
that is renamed when complete. Everything runs in polars; no Python loop touches a row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

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

logger = logging.getLogger(__name__)

DATASET_FORMAT = "h2rec-dataset"
DATASET_VERSION = 1
INTERACTION_FORMATS = (
    "auto", "csv", "tsv", "parquet", "sequences", "pairs", "recbole", "movielens",
)
ITEM_FORMATS = ("auto", "csv", "tsv", "parquet", "recbole", "movielens", "json", "beauty")
SKIPPED_FILE = "skipped_rows.csv"
_AUTO = "auto"
NOT_UTF8 = "not valid UTF-8"
_LINES_SEPARATOR = "\x1f"  # unit separator: a byte that never occurs in the text formats we read

Format = Literal["auto", "csv", "tsv", "parquet", "sequences", "pairs", "recbole", "movielens"]
ItemFormat = Literal["auto", "csv", "tsv", "parquet", "recbole", "movielens", "json", "beauty"]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class ItemTableOptions:
    """How to read an item table and build each item's text."""

    format: ItemFormat = "auto"  # table layout; "auto" guesses from the name and suffix
    id_col: str | None = None  # id column; None: "item_id" (csv/tsv/parquet/recbole)
    text_cols: tuple[str, ...] | None = None  # text columns; None: every non-id string column
    template: str | None = None  # e.g. "{title} ({genres})"; None: join non-empty columns with "; "
    id_offset: int = 0  # added to integer table ids before the join (Yelp.item.json: 1)
    id_map: str | None = None  # file mapping interaction item id -> table id (json or 2 columns)
    encoding: Literal["utf8", "latin-1"] = "utf8"  # text encoding (movies.dat is latin-1)
    on_duplicate: Literal["error", "first"] = "error"  # same id twice with different text


@dataclass(frozen=True)
class FilterOptions:
    """Which interactions to keep."""

    kind: Literal["none", "kcore", "min-count"] = "none"  # kcore iterates until stable
    min_user: int = 5  # least interactions per user
    min_item: int = 5  # least interactions per item


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


def _empty_skipped() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"file": pl.String, "line": pl.Int64, "reason": pl.String, "content": pl.String}
    )


# --------------------------------------------------------------------------------------------
# Low-level readers
# --------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")


def _read_bytes_utf8(path: Path, encoding: str) -> bytes | Path:
    """Return the path itself for utf8, or the file re-encoded to utf8 for latin-1."""
    if encoding == "utf8":
        return path
    return path.read_bytes().decode("latin-1").encode("utf8")


def _invalid_utf8_lines(path: Path) -> list[tuple[int, bytes]]:
    """(1-based line, raw bytes) of every line of ``path`` that is not valid UTF-8."""
    bad: list[tuple[int, bytes]] = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf8")
            except UnicodeDecodeError:
                bad.append((number, raw.rstrip(b"\r\n")))
    return bad


def _first_line_with(path: Path, needle: bytes) -> tuple[int, str] | None:
    """(1-based line, text) of the first line of ``path`` holding ``needle``."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if needle in raw:
                return number, raw.rstrip(b"\r\n").decode("utf8", "backslashreplace")
    return None


def _utf8_source(
    path: Path, encoding: str, on_bad_line: str, blank: bytes = b""
) -> tuple[bytes | Path, pl.DataFrame]:
    """The file as polars should read it, and its lines that are not valid UTF-8 (as skipped
    rows). With ``on_bad_line="error"`` the first such line stops the read with its number; with
    ``"skip"`` each is replaced by ``blank`` so that the other lines keep their numbers."""
    source = _read_bytes_utf8(path, encoding)
    if encoding != "utf8":
        return source, _empty_skipped()
    bad = _invalid_utf8_lines(path)
    if not bad:
        return source, _empty_skipped()
    skipped = pl.DataFrame(
        {
            "file": [str(path)] * len(bad),
            "line": [n for n, _ in bad],
            "reason": [NOT_UTF8] * len(bad),
            "content": [raw.decode("utf8", "backslashreplace") for _, raw in bad],
        },
        schema=_empty_skipped().schema,
    )
    if on_bad_line == "error":
        _handle_bad(path, skipped, "error")
    wanted = {n for n, _ in bad}
    with path.open("rb") as fh:
        cleaned = b"".join(
            (blank + (b"\n" if raw.endswith(b"\n") else b"")) if n in wanted else raw
            for n, raw in enumerate(fh, start=1)
        )
    return cleaned, skipped


def _read_lines(
    path: Path, encoding: str = "utf8", on_bad_line: str = "error"
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every non-blank line of a text file as ``line`` (1-based) and ``text``, and the lines
    skipped as not UTF-8 (see :func:`_utf8_source`)."""
    _check_file(path)

    def read(source: bytes | Path) -> pl.DataFrame:
        return pl.read_csv(
            source,
            has_header=False,
            separator=_LINES_SEPARATOR,
            quote_char=None,
            new_columns=["text"],
            schema_overrides={"text": pl.String},
            encoding="utf8",
            row_index_name="line",
            row_index_offset=1,
        )

    not_utf8 = _empty_skipped()
    try:
        try:
            frame = read(_read_bytes_utf8(path, encoding))
        except pl.exceptions.ComputeError:
            if encoding != "utf8" or not _invalid_utf8_lines(path):
                raise
            source, not_utf8 = _utf8_source(path, encoding, on_bad_line)
            frame = read(source)
    except pl.exceptions.PolarsError as exc:
        unit = _first_line_with(path, _LINES_SEPARATOR.encode())
        if unit is not None:
            raise DataError(
                f"{path}:{unit[0]}: the line contains the control byte 0x1f: {quote(unit[1])}; "
                "not a text file of the format"
            ) from exc
        raise DataError(f"{path}: cannot read as text lines ({_first_line(exc)})") from exc
    if frame.width != 2:
        raise DataError(f"{path}: a line contains the control byte 0x1f; not a text file")
    frame = frame.with_columns(pl.col("line").cast(pl.Int64))
    frame = frame.filter(pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != ""))
    return frame, not_utf8


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _bad_rows(
    path: Path, frame: pl.DataFrame, mask: pl.Expr, reason: str, content: pl.Expr
) -> pl.DataFrame:
    return frame.filter(mask).select(
        pl.lit(str(path)).alias("file"),
        pl.col("line"),
        pl.lit(reason).alias("reason"),
        content.cast(pl.String).alias("content"),
    )


def _handle_bad(path: Path, skipped: pl.DataFrame, on_bad_line: str) -> None:
    if skipped.height == 0:
        return
    first = skipped.sort("line").row(0, named=True)
    if on_bad_line == "error":
        more = f" ({skipped.height - 1} more bad rows)" if skipped.height > 1 else ""
        hint = "pass on_bad_line='skip' (--on-bad-line skip) to drop such rows"
        if first["reason"] == NOT_UTF8:
            hint = "if the file is Latin-1, pass --encoding latin-1; or " + hint
        raise DataError(
            f"{path}:{first['line']}: {first['reason']}: {quote(first['content'])}{more}; {hint}"
        )
    counts = skipped.group_by("reason").len().sort("reason").rows()
    logger.warning(
        "%s: skipped %d unparsable rows (%s), first at line %d",
        path,
        skipped.height,
        ", ".join(f"{n} {r}" for r, n in counts),
        first["line"],
    )


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


def _split_recbole_header(columns: Sequence[str]) -> list[str]:
    return [c.split(":", 1)[0] for c in columns]


def _find_ragged(path: Path, sep: str, encoding: str, quoted: bool, n_fields: int,
                 first_only: bool) -> list[tuple[int, str]]:
    """Lines whose field count differs from the header's (only called after a parse error)."""
    bad: list[tuple[int, str]] = []
    enc = "utf-8" if encoding == "utf8" else "latin-1"
    with path.open(encoding=enc, errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter=sep, quoting=csv.QUOTE_MINIMAL if quoted
                            else csv.QUOTE_NONE)
        start = 1
        for fields in reader:
            if fields and len(fields) != n_fields:
                bad.append((start, sep.join(fields)))
                if first_only:
                    break
            start = reader.line_num + 1
    return bad


def _read_table(
    path: Path,
    fmt: str,
    separator: str | None,
    encoding: str,
    string_cols: Sequence[str] = (),
    on_bad_line: str = "error",
) -> pl.DataFrame:
    """A csv/tsv/parquet/recbole table with a ``line`` column (1-based file line, header = 1).

    Rows with too many fields, or lines that are not UTF-8, stop the read with their line
    number; with ``on_bad_line="skip"`` they are dropped (see :func:`_read_table_rows`)."""
    return _read_table_rows(path, fmt, separator, encoding, string_cols, on_bad_line)[0]


def _read_table_rows(
    path: Path,
    fmt: str,
    separator: str | None,
    encoding: str,
    string_cols: Sequence[str] = (),
    on_bad_line: str = "error",
    short_rows: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`_read_table` and the rows it skipped (``file, line, reason, content``).

    With ``short_rows``, rows with fewer fields than the header are bad rows too (polars fills
    them with nulls, which would be reported as a missing id or a bad timestamp)."""
    if fmt == "parquet":
        try:
            frame = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise DataError(f"{path}: cannot read as Parquet ({_first_line(exc)})") from exc
        frame = frame.with_row_index("line", offset=1).with_columns(pl.col("line").cast(pl.Int64))
        return frame, _empty_skipped()
    sep = separator if separator is not None else ("," if fmt == "csv" else "\t")
    quote_char = None if fmt == "recbole" else '"'
    source: bytes | Path = _read_bytes_utf8(path, encoding)
    skipped = _empty_skipped()
    try:
        try:
            header = pl.read_csv(source, separator=sep, n_rows=0, quote_char='"').columns
        except pl.exceptions.ComputeError:
            if encoding != "utf8" or not _invalid_utf8_lines(path):
                raise
            if _invalid_utf8_lines(path)[0][0] == 1:
                raise DataError(
                    f"{path}:1: the header is not valid UTF-8; if the file is Latin-1, pass "
                    "--encoding latin-1"
                ) from None
            header = pl.read_csv(
                _utf8_source(path, encoding, "skip")[0], separator=sep, n_rows=0,
                quote_char='"',
            ).columns
            source, skipped = _utf8_source(path, encoding, on_bad_line,
                                           blank=sep.encode() * (len(header) - 1))
    except pl.exceptions.NoDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot read the header ({_first_line(exc)})") from exc
    names = _split_recbole_header(header) if fmt == "recbole" else list(header)
    overrides = {header[names.index(c)]: pl.String for c in string_cols if c in names}

    def read(truncate: bool) -> pl.DataFrame:
        return pl.read_csv(
            source,
            separator=sep,
            quote_char=quote_char,
            schema_overrides=overrides,
            infer_schema_length=10_000,
            row_index_name="line",
            row_index_offset=2,
            truncate_ragged_lines=truncate,
        )

    def fail(line: int, content: str, reason: str) -> DataError:
        return DataError(
            f"{path}:{line}: {reason} (header has {len(header)}): {quote(content)}; "
            "pass on_bad_line='skip' (--on-bad-line skip) to drop such rows"
        )

    ragged: list[tuple[int, str]] = []
    try:
        try:
            frame = read(False)
        except pl.exceptions.ComputeError:
            if encoding != "utf8" or skipped.height or not _invalid_utf8_lines(path):
                raise
            source, skipped = _utf8_source(path, encoding, on_bad_line,
                                           blank=sep.encode() * (len(header) - 1))
            frame = read(False)
    except pl.exceptions.PolarsError as exc:
        ragged = _find_ragged(path, sep, encoding, quote_char is not None, len(header),
                              first_only=on_bad_line == "error")
        if not ragged:
            raise DataError(f"{path}: cannot parse ({_first_line(exc)})") from exc
        if on_bad_line == "error":
            raise fail(*ragged[0], "wrong number of fields") from exc
        try:
            frame = read(True)
        except pl.exceptions.PolarsError as exc2:
            raise DataError(f"{path}: cannot parse ({_first_line(exc2)})") from exc2
    if short_rows and not ragged and frame.null_count().sum_horizontal().item() > 0:
        ragged = _find_ragged(path, sep, encoding, quote_char is not None, len(header),
                              first_only=on_bad_line == "error")
        ragged = [r for r in ragged if r[0] not in set(skipped.get_column("line").to_list())]
        if ragged and on_bad_line == "error":
            raise fail(*ragged[0], "wrong number of fields")
    frame = frame.rename(dict(zip(header, names, strict=True)))
    frame = frame.with_columns(pl.col("line").cast(pl.Int64))
    drop = [ln for ln, _ in ragged] + skipped.get_column("line").to_list()
    if ragged:
        skipped = pl.concat([skipped, pl.DataFrame(
            {
                "file": [str(path)] * len(ragged),
                "line": [ln for ln, _ in ragged],
                "reason": ["wrong number of fields"] * len(ragged),
                "content": [c for _, c in ragged],
            },
            schema=_empty_skipped().schema,
        )])
    if drop:
        frame = frame.filter(~pl.col("line").is_in(pl.Series(drop, dtype=pl.Int64).implode()))
    return frame, skipped


def _require_columns(path: Path, frame: pl.DataFrame, wanted: dict[str, str]) -> None:
    for role, name in wanted.items():
        if name not in frame.columns:
            shown = [c for c in frame.columns if c != "line"]
            raise DataError(f"{path}: {role} column {name!r} not found; columns are {shown}")


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


# --------------------------------------------------------------------------------------------
# Item tables
# --------------------------------------------------------------------------------------------


def _guess_item_format(path: Path) -> str:
    if path.name == "products_lookup.csv" and (path.parent / "item_id_to_int.json").exists():
        return "beauty"
    suffix = path.suffix.lower()
    by_suffix = {
        ".csv": "csv",
        ".tsv": "tsv",
        ".parquet": "parquet",
        ".pq": "parquet",
        ".item": "recbole",
        ".dat": "movielens",
        ".json": "json",
    }
    if suffix not in by_suffix:
        raise DataError(
            f"{path}: cannot guess the item table format from suffix {suffix!r}; "
            f"give one of {', '.join(ITEM_FORMATS[1:])}"
        )
    return by_suffix[suffix]


def read_beauty_titles(
    lookup_csv: str | Path, id_map_json: str | Path | None = None
) -> pl.DataFrame:
    """Amazon Beauty titles keyed by ASIN: ``products_lookup.csv`` joined with
    ``item_id_to_int.json`` (ASIN -> ``global_product_id``). Columns ``id`` (ASIN), ``line``,
    ``title``; ASINs whose int has no row get no row."""
    lookup_csv = Path(lookup_csv)
    id_map_path = Path(id_map_json) if id_map_json else lookup_csv.parent / "item_id_to_int.json"
    table = _read_table(lookup_csv, "csv", ",", "utf8", ("global_product_id",))
    _require_columns(lookup_csv, table, {"id": "global_product_id", "text": "name"})
    mapping = _read_id_map(id_map_path)  # asin -> int (as strings)
    table = table.select(
        pl.col("line"),
        pl.col("global_product_id").cast(pl.String).str.strip_chars().alias("key"),
        pl.col("name").cast(pl.String).alias("title"),
    )
    joined = mapping.join(table, left_on="target", right_on="key", how="inner")
    return joined.select(pl.col("source").alias("id"), "line", "title")


def _read_id_map(path: Path) -> pl.DataFrame:
    """A two-column id map: a JSON object ``{source: target}`` or lines ``source target``."""
    _check_file(path)
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}: expected a JSON object mapping ids, got {type(obj).__name__}")
        frame = pl.DataFrame(
            {
                "source": [str(k) for k in obj],
                "target": [str(v) for v in obj.values()],
            },
            schema={"source": pl.String, "target": pl.String},
        )
    else:
        lines = _read_lines(path)[0].with_columns(
            pl.col("text").str.extract_all(r"\S+").alias("tok")
        )
        bad = lines.filter(pl.col("tok").list.len() != 2)
        if bad.height:
            row = bad.row(0, named=True)
            raise DataError(f"{path}:{row['line']}: expected 'source target', got {quote(row['text'])}")
        frame = lines.select(
            pl.col("tok").list.get(0).alias("source"), pl.col("tok").list.get(1).alias("target")
        )
    dup = frame.filter(pl.col("source").is_duplicated())
    if dup.height:
        conflicting = dup.group_by("source").agg(pl.col("target").n_unique().alias("n"))
        conflicting = conflicting.filter(pl.col("n") > 1)
        if conflicting.height:
            raise DataError(
                f"{path}: id {quote(conflicting.item(0, 'source'))} is mapped to several targets"
            )
        frame = frame.unique("source", keep="first", maintain_order=True)
    return frame


def _template_expr(template: str, columns: Sequence[str], path: Path) -> pl.Expr:
    parts: list[pl.Expr] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"template {template!r}: {exc}") from exc
    for literal, name, spec, conv in parsed:
        if literal:
            parts.append(pl.lit(literal))
        if name is None:
            continue
        if spec or conv:
            raise DataError(f"template {template!r}: format specs are not supported ({name!r})")
        if name not in columns:
            raise DataError(
                f"{path}: template field {{{name}}} is not a column; columns are {list(columns)}"
            )
        parts.append(pl.col(name).cast(pl.String).fill_null("").str.strip_chars())
    if not parts:
        return pl.lit("")
    return pl.concat_str(parts).str.strip_chars()


def apply_template(frame: pl.DataFrame, template: str | None, text_cols: Sequence[str],
                   path: Path | str = "<items>") -> pl.Series:
    """The text of every row: ``template`` over the frame's columns, or the non-empty
    ``text_cols`` joined with ``"; "``. Rows whose fields are all empty get ``""``."""
    path = Path(path)
    if template is not None:
        expr = _template_expr(template, frame.columns, path)
        used = [n for _, n, _, _ in string.Formatter().parse(template) if n]
        empty = pl.all_horizontal(
            [pl.col(c).cast(pl.String).fill_null("").str.strip_chars() == "" for c in used]
        ) if used else pl.lit(True)
        expr = pl.when(empty).then(pl.lit("")).otherwise(expr)
    else:
        if not text_cols:
            return pl.Series("text", [""] * frame.height, dtype=pl.String)
        cleaned = [
            pl.when(pl.col(c).cast(pl.String).str.strip_chars() == "")
            .then(None)
            .otherwise(pl.col(c).cast(pl.String).str.strip_chars())
            for c in text_cols
        ]
        expr = pl.concat_str(cleaned, separator="; ", ignore_nulls=True).fill_null("")
    return frame.select(expr.alias("text")).to_series()


def read_item_table(
    path: str | Path, options: ItemTableOptions = ItemTableOptions()
) -> pl.DataFrame:
    """Read an item table: columns ``id`` (str, the interaction file's item id after
    ``id_offset``/``id_map``), ``text`` and the text columns themselves, one row per id."""
    path = Path(path)
    _check_file(path)
    fmt = _guess_item_format(path) if options.format == _AUTO else options.format
    if fmt not in ITEM_FORMATS:
        raise DataError(f"item format={fmt!r} is not one of {', '.join(ITEM_FORMATS[1:])}")
    if fmt == "beauty":
        table = read_beauty_titles(path)
        id_col = "id"
    elif fmt == "movielens":
        table = _read_movies_dat(path, options.encoding)
        id_col = "id"
    elif fmt == "json":
        table = _read_json_items(path)
        id_col = "id"
    else:
        id_col = options.id_col or "item_id"
        table = _read_table(path, fmt, None, options.encoding, (id_col,))
        _require_columns(path, table, {"item id": id_col})
    if options.text_cols is not None:
        _require_columns(path, table, {f"text {i}": c for i, c in enumerate(options.text_cols)})
        text_cols = list(options.text_cols)
    else:
        text_cols = [
            c for c in table.columns
            if c not in (id_col, "line") and table.schema[c] in (pl.String, pl.Categorical)
        ]
    table = table.with_columns(pl.col(id_col).cast(pl.String).str.strip_chars().alias("_id"))
    if options.id_offset:
        as_int = table.get_column("_id").cast(pl.Int64, strict=False)
        bad = table.filter(as_int.is_null())
        if bad.height:
            row = bad.row(0, named=True)
            raise DataError(
                f"{path}:{row['line']}: id {quote(row['_id'])} is not an integer, "
                f"but id_offset={options.id_offset} needs one"
            )
        table = table.with_columns((as_int + options.id_offset).cast(pl.String).alias("_id"))
    missing_id = table.filter(pl.col("_id").is_null() | (pl.col("_id") == ""))
    if missing_id.height:
        raise DataError(f"{path}:{missing_id.item(0, 'line')}: missing item id in {id_col!r}")
    text = apply_template(table, options.template, text_cols, path)
    keep_cols = [c for c in text_cols if c not in ("id", "text", "item", "original_id")]
    out = table.select(
        pl.col("_id").alias("id"),
        pl.col("line"),
        *[pl.col(c).cast(pl.String) for c in keep_cols],
    ).with_columns(text.alias("text"))
    out = _resolve_duplicates(path, out, options.on_duplicate)
    if options.id_map is not None:
        mapping = _read_id_map(Path(options.id_map))
        out = mapping.join(out, left_on="target", right_on="id", how="inner").drop("target")
        out = out.rename({"source": "id"})
    return out.drop("line")


def _resolve_duplicates(path: Path, table: pl.DataFrame, on_duplicate: str) -> pl.DataFrame:
    dup_ids = table.filter(pl.col("id").is_duplicated())
    if dup_ids.height == 0:
        return table
    conflicts = dup_ids.group_by("id", maintain_order=True).agg(
        pl.col("text").n_unique().alias("n"), pl.col("line"), pl.col("text")
    ).filter(pl.col("n") > 1)
    if conflicts.height and on_duplicate == "error":
        row = conflicts.row(0, named=True)
        raise DataError(
            f"{path}: item {quote(row['id'])} appears on lines {row['line'][:5]} with different text "
            f"({quote(row['text'][0])} vs {quote(row['text'][1])}); {conflicts.height} such items; "
            "pass on_duplicate='first' to keep the first row"
        )
    if conflicts.height:
        logger.warning("%s: %d items have several rows with different text; kept the first",
                       path, conflicts.height)
    return table.unique("id", keep="first", maintain_order=True)


def _read_movies_dat(path: Path, encoding: str) -> pl.DataFrame:
    """MovieLens ``movies.dat``: ``MovieID::Title (Year)::Genre|Genre``; latin-1 is tried when
    the file is not valid utf8."""
    raw = path.read_bytes()
    if encoding == "utf8":
        try:
            raw.decode("utf8")
        except UnicodeDecodeError:
            encoding = "latin-1"
    lines = _read_lines(path, encoding)[0]
    parts = lines.with_columns(pl.col("text").str.strip_chars().str.split("::").alias("tok"))
    bad = parts.filter(pl.col("tok").list.len() != 3)
    if bad.height:
        row = bad.row(0, named=True)
        raise DataError(
            f"{path}:{row['line']}: expected 'MovieID::Title::Genres', got {quote(row['text'])}"
        )
    return parts.select(
        pl.col("line"),
        pl.col("tok").list.get(0).str.strip_chars().alias("id"),
        pl.col("tok").list.get(1).str.strip_chars().alias("title"),
        pl.col("tok").list.get(2).str.replace_all("|", ", ", literal=True).alias("genres"),
    )


def _read_json_items(path: Path) -> pl.DataFrame:
    """``{"<id>": {"title": ..., "description": ...}, ...}`` (LETTER ``*.item.json``) or a list of
    objects with an ``id`` field. String and list fields become text columns."""
    try:
        obj = json.loads(path.read_text(encoding="utf8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(obj, dict):
        records = []
        for key, value in obj.items():
            if not isinstance(value, dict):
                raise DataError(f"{path}: item {key!r}: expected an object, got {value!r:.60}")
            records.append({"id": str(key), **value})
    elif isinstance(obj, list):
        records = obj
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or "id" not in rec:
                raise DataError(f"{path}: element {i} has no 'id' field")
    else:
        raise DataError(f"{path}: expected a JSON object or list, got {type(obj).__name__}")
    if not records:
        raise DataError(f"{path}: no items in the file")
    fields: list[str] = []
    for rec in records:
        for k in rec:
            if k not in fields:
                fields.append(k)

    def text_of(v: Any) -> str | None:
        if v is None:
            return None
        if isinstance(v, list):
            return ", ".join(str(x) for x in v)
        return str(v)

    columns = {f: [text_of(rec.get(f)) for rec in records] for f in fields}
    frame = pl.DataFrame(columns, schema={f: pl.String for f in fields})
    return frame.with_row_index("line", offset=1).with_columns(pl.col("line").cast(pl.Int64))


# --------------------------------------------------------------------------------------------
# Filtering, ordering, remapping
# --------------------------------------------------------------------------------------------


def apply_filter(frame: pl.DataFrame, options: FilterOptions) -> tuple[pl.DataFrame, int]:
    """Keep the interactions the filter allows; return the frame and the number of passes."""
    if options.kind == "none":
        return frame, 0
    if options.min_user < 1 or options.min_item < 1:
        raise DataError(
            f"filter min_user={options.min_user}, min_item={options.min_item}: must be >= 1"
        )
    if options.kind == "min-count":
        kept = frame.filter(
            (pl.len().over("user") >= options.min_user)
            & (pl.len().over("item") >= options.min_item)
        )
        return kept, 1
    if options.kind != "kcore":
        raise DataError(f"filter kind={options.kind!r} is not one of none, kcore, min-count")
    passes = 0
    while True:
        passes += 1
        before = frame.height
        frame = frame.filter(pl.len().over("item") >= options.min_item)
        frame = frame.filter(pl.len().over("user") >= options.min_user)
        if frame.height == before:
            return frame, passes


def encode_ids(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Replace the ``user`` and ``item`` strings by UInt32 codes (in order of first appearance
    in the frame); return the coded frame and the two Series of names (code -> original id)."""
    user_names = frame.get_column("user").unique(maintain_order=True)
    item_names = frame.get_column("item").unique(maintain_order=True)

    def code(col: str, names: pl.Series) -> pl.Series:
        # a hash join keeps the left order; much faster than replace_strict on strings
        table = names.to_frame(col).with_row_index("code")
        joined = frame.select(col).join(table, on=col, how="left", maintain_order="left")
        return joined.get_column("code").rename(col)

    rest = [c for c in frame.columns if c not in ("line", "user", "item")]
    coded = frame.select(
        pl.col("line"),
        code("user", user_names),
        code("item", item_names),
        *[pl.col(c) for c in rest],
    )
    return coded, user_names, item_names


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _distribution(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "min": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def compute_stats(
    offsets: np.ndarray, items: np.ndarray, n_items: int, text: Sequence[str] | pl.Series
) -> dict[str, Any]:
    """``stats.json`` content from the CSR arrays and the item text."""
    lengths = np.diff(offsets)
    pop = np.bincount(items, minlength=n_items + 1)[1:]
    text_s = pl.Series("text", list(text) if not isinstance(text, pl.Series) else text)
    has_text = text_s.str.strip_chars().str.len_chars() > 0
    n_text = int(has_text.sum())
    words = text_s.filter(has_text).str.extract_all(r"\S+").list.len()
    n_users = int(lengths.size)
    n_inter = int(items.size)
    sorted_pop = np.sort(pop)[::-1]
    head_n = max(1, round(0.2 * n_items)) if n_items else 0
    return {
        "users": n_users,
        "items": int(n_items),
        "interactions": n_inter,
        "density": float(n_inter / (n_users * n_items)) if n_users and n_items else 0.0,
        "length": _distribution(lengths),
        "popularity": _distribution(pop),
        "popularity_buckets": {
            "1-9": int(((pop >= 1) & (pop <= 9)).sum()),
            "10-29": int(((pop >= 10) & (pop <= 29)).sum()),
            "30-59": int(((pop >= 30) & (pop <= 59)).sum()),
            "60-99": int(((pop >= 60) & (pop <= 99)).sum()),
            ">=100": int((pop >= 100).sum()),
        },
        "head20_interaction_share": (
            float(sorted_pop[:head_n].sum() / n_inter) if n_inter else 0.0
        ),
        "text": {
            "items_with_text": n_text,
            "share": float(n_text / n_items) if n_items else 0.0,
            "words_mean": float(words.mean()) if n_text else 0.0,  # type: ignore[arg-type]
        },
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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
    data = read_interactions(interactions, read)
    src, has_ts, n_bad = data.path, data.has_timestamp, data.skipped.height
    n_dup = 0
    if data.format != "sequences":  # a sequence line may repeat an item on purpose
        key = ["user", "item", "timestamp"] if has_ts else ["user", "item"]
        n_dup = data.frame.height - data.frame.n_unique(subset=key)
        if n_dup:
            logger.warning(
                "%s: %d rows repeat an earlier row exactly (same %s); they are kept as repeated "
                "interactions (remove them from the file if they are copies)",
                src, n_dup, ", ".join(key),
            )
    skipped_parts = [data.skipped]
    meta_read = asdict(read) | {"format": data.format}
    # from here on users and items are integer codes; the strings live once, in two Series
    frame, user_names, item_names = encode_ids(data.frame)
    del data

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
        frame = frame.join(short.select("user"), on="user", how="anti")
        lengths = lengths.filter(pl.col("len") >= min_length)
    if frame.height == 0:
        raise DataError(f"{src}: no user has at least min_length={min_length} interactions")

    # users numbered by first appearance in the file, events by (time, file line)
    first = lengths.sort("first").with_row_index("uid").select(
        pl.col("user"), pl.col("uid").cast(pl.Int64)
    )
    # _pos (the row's place in the file, tokens of one line included) breaks the remaining ties:
    # neither the join nor the sort keeps the order of a line's items by itself
    frame = frame.with_row_index("_pos").join(first, on="user", how="left").drop("user")
    keys = ["uid", "timestamp", "line", "_pos"] if has_ts else ["uid", "line", "_pos"]
    frame = frame.sort(keys).drop("_pos")
    # items numbered by first appearance in the sorted sequences
    item_codes = frame.get_column("item").to_numpy()
    order = frame.get_column("item").unique(maintain_order=True).to_numpy()
    new_id = np.zeros(item_names.len(), dtype=np.int64)
    new_id[order] = np.arange(1, order.size + 1, dtype=np.int64)
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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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


def _load_npy(path: Path, dtype: type, ndim: int) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: missing; not a complete dataset directory")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = _first_line(exc)[:200]
        raise DataError(f"{path}: cannot read ({reason}); not a complete dataset directory") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: not a .npy array")
    if arr.dtype != dtype or arr.ndim != ndim:
        raise DataError(f"{path}: expected {np.dtype(dtype).name} with {ndim} dims, "
                        f"got {arr.dtype} with shape {arr.shape}")
    return arr


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset directory written by ``prepare`` and validate it."""
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
    offsets = _load_npy(path / "offsets.npy", np.int64, 1)
    items = _load_npy(path / "items.npy", np.int64, 1)
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


__all__ = [
    "Dataset",
    "FilterOptions",
    "Interactions",
    "ItemTableOptions",
    "ReadOptions",
    "apply_filter",
    "apply_template",
    "compute_stats",
    "encode_ids",
    "load_dataset",
    "prepare",
    "read_beauty_titles",
    "read_interactions",
    "read_item_table",
    "read_text_for_items",
]
