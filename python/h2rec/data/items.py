"""Item tables: each item's text, keyed by the interaction file's item id.

Item tables (``ItemTableOptions.format``): ``csv``/``tsv``/``parquet`` with an id column and text
columns, RecBole ``.item``, MovieLens ``movies.dat`` (title and genres), a JSON object keyed by item
id (LETTER's ``Yelp.item.json``, or S3Rec's ``*_item2attributes.json``, whose attribute ids
become the words ``attr<id>`` of an ``attributes`` column), or ``beauty`` (``products_lookup.csv`` with
``item_id_to_int.json`` beside it). The text of an item is built from its text columns by a
template such as ``"{title}. Categories: {description}"``; without a template the non-empty text
columns are joined with ``"; "``.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from h2rec.data.files import _AUTO, _check_file, _read_lines, _read_table, _require_columns
from h2rec.errors import DataError, quote

# the package's logger, as before the split into modules: log lines keep reading "h2rec.data"
logger = logging.getLogger("h2rec.data")

ITEM_FORMATS = ("auto", "csv", "tsv", "parquet", "recbole", "movielens", "json", "beauty")

ItemFormat = Literal["auto", "csv", "tsv", "parquet", "recbole", "movielens", "json", "beauty"]


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


def _attribute_id(v: Any) -> bool:
    """An integer (not a bool) or a non-empty word without whitespace."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, str) and v != "" and v.split() == [v])


def _read_json_items(path: Path) -> pl.DataFrame:
    """``{"<id>": {"title": ..., "description": ...}, ...}`` (LETTER ``*.item.json``) or a list of
    objects with an ``id`` field: string and list fields become text columns. Or
    ``{"<id>": [3, 17, ...], ...}`` (S3Rec ``*_item2attributes.json``: category and brand ids
    without names): one ``attributes`` column, ``"attr3 attr17 ..."``, words that a text encoder
    such as TF-IDF matches between items sharing an attribute."""
    try:
        obj = json.loads(path.read_text(encoding="utf8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(obj, dict):
        records = []
        for key, value in obj.items():
            if isinstance(value, list):  # attribute ids
                bad = [v for v in value if not _attribute_id(v)]
                if bad:
                    raise DataError(
                        f"{path}: item {key!r}: attribute {bad[0]!r:.60} is not an attribute id "
                        "(an integer, or a word without spaces)"
                    )
                value = {"attributes": " ".join(f"attr{v}" for v in value)}
            if not isinstance(value, dict):
                raise DataError(
                    f"{path}: item {key!r}: expected an object or a list of attribute ids, "
                    f"got {value!r:.60}"
                )
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
