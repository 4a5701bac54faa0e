"""Low-level reading shared by the interaction readers and the item tables.

File checks, UTF-8 and Latin-1 input, a text file as numbered lines, csv/tsv/parquet/RecBole
tables with the file line of every row, and the bookkeeping of unparsable rows (``skipped``
frames with columns ``file, line, reason, content``; stop at the first, or skip and warn).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from h2rec.errors import DataError, quote

# the package's logger, as before the split into modules: log lines keep reading "h2rec.data"
logger = logging.getLogger("h2rec.data")

_AUTO = "auto"
NOT_UTF8 = "not valid UTF-8"
_LINES_SEPARATOR = "\x1f"  # unit separator: a byte that never occurs in the text formats we read


def _empty_skipped() -> pl.DataFrame:
    return pl.DataFrame(
        schema={"file": pl.String, "line": pl.Int64, "reason": pl.String, "content": pl.String}
    )


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
