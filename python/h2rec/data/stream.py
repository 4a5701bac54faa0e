"""Large CSV/TSV logs read in chunks, their ids coded chunk by chunk.

``prepare`` on a whole-file frame holds every row's user and item strings at once (about 2 GB a
10 million rows). Here the file is scanned by polars' streaming engine ``chunk_rows`` rows at a
time; each chunk is checked exactly as the whole-file reader checks its rows
(:func:`h2rec.data.readers._validate_rows`), its ids are looked up in (and added to) two growing
tables of names, and only integer columns are kept: line (int64), user and item codes (uint32,
in order of first appearance, as :func:`h2rec.data.ids.encode_ids` numbers them) and the
timestamp. So memory is the integer columns plus one chunk of strings plus the distinct ids.

The result is the whole-file reader's, coded. Whatever that reader would report or refuse with
its own message (a parse error, a ragged line, bytes that are not UTF-8, a timestamp column
that is not numeric, a bad row under ``on_bad_line="error"``) sends the file down the whole-file
path instead (:func:`read_coded` returns None), which then gives its exact message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from h2rec.data.files import _AUTO, _empty_skipped, _handle_bad
from h2rec.data.readers import ReadOptions, _guess_format, _validate_rows

logger = logging.getLogger("h2rec.data")

# below this many bytes a file is read whole: one chunk would hold it anyway
_BYTES_PER_ROW = 16


@dataclass(frozen=True)
class Coded:
    """A log read and coded: ``frame`` has ``line`` (int64), ``user`` and ``item`` (uint32
    codes) and, when the file has times, ``timestamp``; ``user_names[c]`` / ``item_names[c]``
    is the original id of code ``c``; ``skipped`` the rows dropped as unparsable."""

    frame: pl.DataFrame
    user_names: pl.Series
    item_names: pl.Series
    path: Path
    format: str
    has_timestamp: bool
    skipped: pl.DataFrame


class _Fallback(Exception):
    """This file goes the whole-file way."""


class _Codes:
    """Original ids -> uint32 codes in order of first appearance, grown chunk by chunk."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.table = pl.DataFrame(schema={name: pl.String, "code": pl.UInt32})

    def code(self, ids: pl.Series) -> pl.Series:
        col = self.name
        new = (
            ids.to_frame(col).unique(maintain_order=True)
            .join(self.table, on=col, how="anti", maintain_order="left")
        )
        if new.height:
            new = new.with_row_index("code", offset=self.table.height).select(col, "code")
            self.table = pl.concat([self.table, new.cast({"code": pl.UInt32})])
        joined = ids.to_frame(col).join(self.table, on=col, how="left", maintain_order="left")
        return joined.get_column("code").rename(col)

    @property
    def names(self) -> pl.Series:
        return self.table.get_column(self.name).rename(self.name)


def read_coded(path: str | Path, options: ReadOptions = ReadOptions()) -> Coded | None:
    """The log at ``path`` read in chunks of ``options.chunk_rows`` and coded, or None when it
    should be read whole (not CSV/TSV, Latin-1, no larger than a chunk, or anything the
    whole-file reader reports with its own message)."""
    path = Path(path)
    fmt = _guess_format(path) if options.format == _AUTO else options.format
    if fmt not in ("csv", "tsv") or options.encoding != "utf8" or options.chunk_rows <= 0:
        return None
    if options.user_col == options.item_col:
        return None
    try:
        if path.stat().st_size <= options.chunk_rows * _BYTES_PER_ROW:
            return None
        return _read(path, fmt, options)
    except (_Fallback, pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        logger.info("%s: read whole, not in chunks of %d rows (%s)", path, options.chunk_rows,
                    reason)
        return None


def _read(path: Path, fmt: str, options: ReadOptions) -> Coded:
    sep = options.separator if options.separator is not None else ("," if fmt == "csv" else "\t")
    header = pl.read_csv(path, separator=sep, n_rows=0, quote_char='"').columns
    user_col, item_col = options.user_col, options.item_col
    if user_col not in header or item_col not in header:
        raise _Fallback("a column is missing")
    time_col = options.time_col
    if time_col == _AUTO:
        time_col = "timestamp" if "timestamp" in header else None
    if time_col is not None and time_col not in header:
        raise _Fallback("the time column is missing")
    scan = pl.scan_csv(
        path,
        separator=sep,
        quote_char='"',
        schema_overrides={user_col: pl.String, item_col: pl.String},
        infer_schema_length=10_000,
        row_index_name="line",
        row_index_offset=2,
    )
    schema = scan.collect_schema()
    if time_col is not None and not schema[time_col].is_numeric():
        raise _Fallback(f"timestamp column {time_col!r} is {schema[time_col]}")
    cols = [
        pl.col("line").cast(pl.Int64),
        pl.col(user_col).str.strip_chars().alias("user"),
        pl.col(item_col).str.strip_chars().alias("item"),
    ]
    if time_col is not None:
        cols.append(pl.col(time_col).alias("timestamp"))
    users, items = _Codes("user"), _Codes("item")
    parts: list[pl.DataFrame] = []
    skipped_parts = [_empty_skipped()]
    if not hasattr(scan, "collect_batches"):  # polars before 1.3x: read whole
        raise _Fallback("this polars has no LazyFrame.collect_batches")
    # every column is parsed, the unused ones too, as the whole-file reader parses them (a bad
    # value or a missing field there is its error); chunks come in file order (the ids' codes
    # and the later stable sort depend on it)
    for whole in scan.collect_batches(chunk_size=options.chunk_rows, maintain_order=True):
        if whole.null_count().sum_horizontal().item() > 0:
            # a short row, or an empty field: the whole-file reader tells which, with its line
            raise _Fallback("a null field")
        chunk = whole.select(cols)
        del whole
        keep, skipped = _validate_rows(path, chunk, content_cols=chunk.columns[1:])
        if skipped.height:
            if options.on_bad_line == "error":
                raise _Fallback("a bad row")  # the whole-file reader names it
            skipped_parts.append(skipped)
        if keep.height == 0:
            continue
        coded = keep.with_columns(users.code(keep.get_column("user")),
                                  items.code(keep.get_column("item")))
        parts.append(coded)
    if not parts:
        raise _Fallback("no row")  # the whole-file reader says so
    frame = pl.concat(parts)
    dtypes = {p.schema.get("timestamp") for p in parts}
    if len(dtypes) > 1:  # chunks read differently: the whole file decides
        raise _Fallback(f"timestamp types {dtypes}")
    skipped = pl.concat(skipped_parts)
    _handle_bad(path, skipped, options.on_bad_line)  # skip: the warning the whole read gives
    logger.info("%s: read %d interactions (%s, in chunks of %d rows)",
                path, frame.height, fmt, options.chunk_rows)
    return Coded(frame, users.names, items.names, path, fmt, "timestamp" in frame.columns,
                 skipped)
