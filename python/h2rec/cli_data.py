"""The ``prepare``, ``embed`` and ``build-sid`` subcommands of ``h2rec``.

``register(subparsers)`` adds them to the CLI's argparse sub-parsers; each sets ``func`` to a
handler ``(args) -> int``. Handlers raise ``H2RecError`` on bad input; the CLI's main turns that
into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from h2rec.errors import ConfigError

logger = logging.getLogger(__name__)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _codebook_size(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add ``prepare``, ``embed`` and ``build-sid`` to an ``add_subparsers()`` object."""
    from h2rec.data import INTERACTION_FORMATS, ITEM_FORMATS
    from h2rec.embed import BACKENDS, DEFAULT_MODEL
    from h2rec.semantic_ids import COLLISIONS

    p = subparsers.add_parser(
        "prepare",
        help="read interactions (+ item text), filter, order, remap, write a dataset directory",
        description="Read an interaction file and optionally an item table, and write a dataset "
        "directory (CSR sequences, id maps, item text, stats.json). Example: h2rec prepare "
        "user_sequence.txt data/beauty --items products_lookup.csv",
    )
    p.add_argument("interactions", type=Path, help="interaction file")
    p.add_argument("out", type=Path, help="dataset directory to write")
    p.add_argument("--format", choices=INTERACTION_FORMATS, default="auto",
                   help="interaction file layout (default: from the suffix)")
    p.add_argument("--user-col", default="user_id", help="user column (tables)")
    p.add_argument("--item-col", default="item_id", help="item column (tables)")
    p.add_argument("--time-col", default="auto",
                   help="timestamp column; 'auto' uses 'timestamp' if present, 'none' ignores time")
    p.add_argument("--separator", default=None, help="field separator of csv/tsv files")
    p.add_argument("--encoding", choices=("utf8", "latin-1"), default="utf8")
    p.add_argument("--on-bad-line", choices=("error", "skip"), default="error",
                   help="stop at an unparsable row, or skip it (rows go to skipped_rows.csv)")
    p.add_argument("--chunk-rows", type=_non_negative_int, default=2_000_000,
                   help="csv/tsv logs larger than this many rows are read and their ids coded "
                        "this many rows at a time (bounds memory); 0 reads them whole")
    p.add_argument("--items", type=Path, default=None, help="item table with text columns")
    p.add_argument("--item-format", choices=ITEM_FORMATS, default="auto")
    p.add_argument("--item-id-col", default=None, help="id column of the item table")
    p.add_argument("--text-cols", default=None,
                   help="comma-separated text columns (default: every string column)")
    p.add_argument("--template", default=None,
                   help="item text template over the item columns, e.g. '{title}. {genres}'")
    p.add_argument("--item-id-offset", type=int, default=0,
                   help="added to integer item-table ids before joining (Yelp.item.json: 1)")
    p.add_argument("--item-id-map", default=None,
                   help="file mapping interaction item ids to item-table ids (json or 2 columns)")
    p.add_argument("--item-encoding", choices=("utf8", "latin-1"), default="utf8")
    p.add_argument("--on-duplicate-item", choices=("error", "first"), default="error")
    p.add_argument("--filter", choices=("none", "kcore", "min-count"), default="none",
                   help="kcore: iterate until every user and item has enough; min-count: once")
    p.add_argument("--min-user", type=_positive_int, default=5)
    p.add_argument("--min-item", type=_positive_int, default=5)
    p.add_argument("--min-length", type=_positive_int, default=3,
                   help="shortest user kept (leave-one-out needs 3)")
    p.add_argument("--short-users", choices=("drop", "error"), default="drop")
    p.add_argument("--name", default=None, help="dataset name (default: directory name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset directory h2rec wrote (never one holding an input)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    p.set_defaults(func=run_prepare)

    e = subparsers.add_parser(
        "embed",
        help="item text -> embeddings.npy (sentence-transformers, tfidf, or import a .npy)",
        description="Embed the items of a dataset directory; writes <dataset>/embeddings.npy "
        "unless --out is given.",
    )
    e.add_argument("dataset", type=Path, help="dataset directory written by prepare")
    e.add_argument("--backend", choices=BACKENDS, default="tfidf")
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help="sentence-transformers model directory or installed package")
    e.add_argument("--npy", type=Path, default=None, help="file to import (backend npy)")
    e.add_argument("--out", type=Path, default=None)
    e.add_argument("--template", default=None, help="rebuild the text from the item columns")
    e.add_argument("--dim", type=_positive_int, default=256, help="tfidf dimensions")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--device", default=None)
    e.add_argument("--empty", choices=("mean", "random"), default="mean",
                   help="vector for items without text")
    e.add_argument("--no-normalize", action="store_true", help="keep raw vector lengths")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--behaviour", type=float, default=0.0, metavar="W",
                   help="share in [0, 1) of each item's vector taken from co-occurrence in the "
                   "training prefixes (PPMI + SVD; validation and test targets left out): "
                   "codes built from the mix group items that are used together (0 = text only)")
    e.add_argument("--behaviour-dim", type=_positive_int, default=64,
                   help="behaviour: SVD dimensions")
    e.add_argument("--behaviour-window", type=_positive_int, default=5,
                   help="behaviour: items at most this many positions apart co-occur")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    e.set_defaults(func=run_embed)

    s = subparsers.add_parser(
        "build-sid",
        help="residual k-means Semantic IDs from embeddings, with a report",
        description="Build codes, codebooks and the SID report from an embeddings file.",
    )
    s.add_argument("embeddings", type=Path, help="embeddings.npy (or a dataset directory)")
    s.add_argument("out", type=Path, help="SID directory to write")
    s.add_argument("--levels", type=_positive_int, default=3)
    s.add_argument("--codebook-size", type=_codebook_size, default=256)
    s.add_argument("--iters", type=_positive_int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--collision", choices=COLLISIONS, default="none")
    s.add_argument("--normalize-residuals", action="store_true")
    s.add_argument("--balanced", action="store_true")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a SID directory h2rec wrote (never one holding the embeddings)")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    s.set_defaults(func=run_build_sid)


def run_prepare(args: argparse.Namespace) -> int:
    from h2rec.data import FilterOptions, ItemTableOptions, ReadOptions, prepare

    time_col: str | None = args.time_col
    if time_col is not None and time_col.lower() == "none":
        time_col = None
    text_cols = None
    if args.text_cols:
        text_cols = tuple(c.strip() for c in args.text_cols.split(",") if c.strip())
        if not text_cols:
            raise ConfigError(f"--text-cols {args.text_cols!r}: no column names")
    read = ReadOptions(
        format=args.format,
        user_col=args.user_col,
        item_col=args.item_col,
        time_col=time_col,
        separator=args.separator,
        encoding=args.encoding,
        on_bad_line=args.on_bad_line,
        chunk_rows=args.chunk_rows,
    )
    table = ItemTableOptions(
        format=args.item_format,
        id_col=args.item_id_col,
        text_cols=text_cols,
        template=args.template,
        id_offset=args.item_id_offset,
        id_map=args.item_id_map,
        encoding=args.item_encoding,
        on_duplicate=args.on_duplicate_item,
    )
    out = prepare(
        args.interactions,
        args.out,
        read=read,
        items=args.items,
        item_table=table,
        filter=FilterOptions(kind=args.filter, min_user=args.min_user, min_item=args.min_item),
        min_length=args.min_length,
        short_users=args.short_users,
        name=args.name,
        overwrite=args.overwrite,
    )
    stats = json.loads((out / "stats.json").read_text("utf8"))
    print(
        f"{out}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions; length avg {stats['length']['mean']:.2f} "
        f"(min {stats['length']['min']:,.0f}, median {stats['length']['median']:,.0f}, "
        f"max {stats['length']['max']:,.0f}); text for {stats['text']['items_with_text']:,} items "
        f"({stats['text']['share']:.2%})"
    )
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from h2rec.embed import EmbedOptions, embed_dataset

    options = EmbedOptions(
        backend=args.backend,
        model=args.model,
        dim=args.dim,
        batch_size=args.batch_size,
        device=args.device,
        normalize=not args.no_normalize,
        empty=args.empty,
        seed=args.seed,
        behaviour=args.behaviour,
        behaviour_dim=args.behaviour_dim,
        behaviour_window=args.behaviour_window,
    )
    path = embed_dataset(
        args.dataset, args.out, options, template=args.template, npy=args.npy,
        overwrite=args.overwrite,
    )
    import numpy as np

    shape = np.load(path, mmap_mode="r").shape
    mix = f", behaviour share {args.behaviour:g}" if args.behaviour > 0 else ""
    print(f"{path}: {shape[0]:,} x {shape[1]} float32 ({args.backend}{mix})")
    return 0


def run_build_sid(args: argparse.Namespace) -> int:
    from h2rec.embed import EMBEDDINGS_FILE
    from h2rec.semantic_ids import build_sid_dir

    source = args.embeddings / EMBEDDINGS_FILE if args.embeddings.is_dir() else args.embeddings
    if args.embeddings.is_dir() and (args.embeddings / "meta.json").is_file():
        # a dataset folder: its embeddings must describe its items, in its order
        from h2rec.data import load_dataset
        from h2rec.embed import check_item_fingerprint

        dataset = load_dataset(args.embeddings)
        if source.is_file():
            check_item_fingerprint(source, dataset.item_fingerprint, dataset.n_items)
    sids = build_sid_dir(
        source,
        args.out,
        n_levels=args.levels,
        codebook_size=args.codebook_size,
        n_iter=args.iters,
        seed=args.seed,
        collision=args.collision,
        normalize_residuals=args.normalize_residuals,
        balanced=args.balanced,
        overwrite=args.overwrite,
    )
    r = sids.report
    print(
        f"{args.out}: {r['n_items']:,} items, {r['n_levels']} x {r['codebook_size']} codes; "
        f"{r['unique_tuples']:,} distinct tuples, {r['collision_share']:.2%} of items collide, "
        f"largest group {r['largest_collision_group']}; report in {args.out / 'sid_report.md'}"
    )
    return 0


__all__ = ["register", "run_build_sid", "run_embed", "run_prepare"]
