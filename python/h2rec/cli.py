"""Command line: ``h2rec <command>`` and ``h2rec-train``.

``h2rec-train [DATA]`` runs the whole pipeline (prepare -> embed -> build-sid -> train -> test)
and prints the result table; without arguments it uses the built-in generated dataset.
``h2rec train | evaluate | recommend | compare`` run one stage each; ``prepare``, ``embed`` and
``build-sid`` come from :mod:`h2rec.cli_data`.

Every run reads ``--config file.toml`` and ``--set section.key=value`` overrides, writes under
``./runs/<run name>/`` (``--output-dir`` to change), saves its resolved config, and refuses to
replace existing results without ``--overwrite``.

One error path: a user mistake (:class:`~h2rec.errors.H2RecError`) or an OS error (permission,
full disk, missing file) ends the command with a short message on stderr and exit code 2,
Ctrl-C with exit code 130, an internal error with exit code 1; a traceback only with ``-v``.
Outputs follow :mod:`h2rec.outputs`: refused unless ``--overwrite``, replaced only when h2rec
wrote them, run folders locked while a run writes them and swapped in when complete.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


from h2rec.errors import ConfigError, DataError, H2RecError, OutputError
from h2rec.pipeline import BUILTIN_PRESET, is_main_process
from h2rec.outputs import (
    check_output_dir,
    check_output_file,
)

if TYPE_CHECKING:  # the config pulls in torch: imported where used, so that a Ctrl-C while
    # the libraries load is already inside the one error path
    from h2rec.config import RunConfig

__all__ = ["main", "train_main"]

logger = logging.getLogger("h2rec")



# --------------------------------------------------------------------------- shared options


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.lr=3e-4",
    )
    p.add_argument("--name", help="run name (default: config 'name')")
    p.add_argument("--output-dir", help="parent directory of runs (default: ./runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run's results")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _run_config(args: argparse.Namespace) -> RunConfig:
    from h2rec.config import load_config

    cfg = load_config(args.config, args.overrides)
    changes: dict[str, Any] = {}
    if getattr(args, "name", None):
        changes["name"] = args.name
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    if changes:
        from h2rec.runs import replace_config

        cfg = replace_config(cfg, **changes)
    return cfg


# --------------------------------------------------------------------------- train


def _dataset_run_config(args: argparse.Namespace) -> RunConfig:
    """The run config with DATA, --sids and --embeddings folded in; a dataset is required."""
    from h2rec.runs import absolute, with_values

    cfg = _run_config(args)
    if args.data:
        cfg = with_values(cfg, data__path=absolute(args.data))
    if args.sids:
        cfg = with_values(cfg, sid__path=absolute(args.sids))
    if getattr(args, "embeddings", None):
        cfg = with_values(cfg, data__embeddings=absolute(args.embeddings))
    if not cfg.data.path:
        raise ConfigError("no dataset: give DATA (a prepared dataset directory) or data.path")
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from h2rec.pipeline import train_dataset

    cfg = _dataset_run_config(args)
    result = train_dataset(cfg, args.resume, args.overwrite)
    _print_table(cfg.run_dir)
    return 0 if result is not None else 1


# --------------------------------------------------------------------------- evaluate / recommend


def _load(args: argparse.Namespace) -> Any:
    """The Recommender of RUN, with --data/--sids/--set."""
    from h2rec.serving import Recommender

    return Recommender.load(args.run, args.data, args.sids, args.overrides)


def _run_inputs(args: argparse.Namespace, rec: Any) -> list[Path]:
    """The files evaluate and recommend read, which their --out must never replace."""
    from h2rec.runs import checkpoint_path

    files = [p for p in Path(rec.dataset.path).iterdir() if p.is_file()]
    for folder in (rec.config.sid.path, Path(args.run) if Path(args.run).is_dir() else None):
        if folder and Path(folder).is_dir():
            files += [p for p in Path(folder).iterdir() if p.is_file()]
    extra = [Path(args.histories)] if getattr(args, "histories", None) else []
    return [*files, checkpoint_path(args.run), *extra]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from h2rec.evaluate import bucket_labels
    from h2rec.report import markdown_table, write_json
    from h2rec.runs import check_serving_overrides

    if args.out:
        if Path(args.out).suffix.lower() != ".json":
            raise ConfigError(f"--out {args.out}: evaluate writes JSON; give a name ending in .json")
        check_output_file(Path(args.out), args.overwrite)  # before the evaluation
    check_serving_overrides(args.overrides)
    rec = _load(args)
    if args.out:
        check_output_file(Path(args.out), args.overwrite, _run_inputs(args, rec))
    result = rec.evaluate(args.split, args.protocol, not args.include_history)
    summary = {rec.kind: result.to_dict()}
    print(markdown_table(summary), end="")
    if args.out:
        out = Path(args.out)
        check_output_file(out, args.overwrite)
        write_json(out, {"models": summary, "buckets": bucket_labels(rec.config.eval.buckets)})
        print(f"wrote {out}")
    return 0


def _cmd_blend(args: argparse.Namespace) -> int:
    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.models.config import TEXT_KINDS
    from h2rec.runs import check_serving_overrides, checkpoint_path, load_embeddings_for
    from h2rec.serving import Recommender
    from h2rec.train.checkpoint import checkpoint_blend, set_checkpoint_blend

    check_serving_overrides(args.overrides)
    ckpt = checkpoint_path(args.run)
    if checkpoint_blend(ckpt) is not None and not args.overwrite:
        raise OutputError(f"{ckpt}: holds a text blend; add --overwrite to choose it again")
    rec = Recommender.load(args.run, None, args.sids, args.overrides, apply_blend=False)
    cfg = rec.config
    if cfg.model.kind not in TEXT_KINDS or cfg.model.text_match:
        raise ConfigError(
            f"{args.run}: a {cfg.model.kind} run"
            f"{' with model.text_match' if cfg.model.text_match else ''} gets no text blend "
            f"(it is for {', '.join(TEXT_KINDS)} trained without a text match)"
        )
    embeddings = load_embeddings_for(cfg, rec.dataset)
    item_text = rec.dataset.item_text
    if embeddings is None and not blend.has_text(item_text):
        raise ConfigError(
            f"{args.run}: the text blend needs item text or embeddings: its dataset's items "
            "have no text, the run names no embeddings and the dataset folder has no "
            "embeddings.npy"
        )
    record = blend.choose(
        rec.model, embeddings, lambda m: evaluate(m, rec.dataset.store, "valid", cfg.eval,
                                                  cfg.model.max_len), item_text,
        rec.dataset.store.popularity(holdout=2),
        args.mode or ("rare" if cfg.train.text_blend == "rare" else "auto"),
    )
    if record is None:  # no word in two items' text, and no embeddings
        raise ConfigError(f"{args.run}: no word of its items' text is in two items or more, "
                          "and there are no item embeddings: no text blend to choose")
    set_checkpoint_blend(ckpt, record)
    if ckpt.name == "best.pt":
        blend.write_copy(ckpt.parent, record)
    for key, v in record["valid_ndcg10"].items():
        if isinstance(v, dict):  # version 3: by popularity exponent, then weight
            for w, x in v.items():
                print(f"pop exponent {key}, weight {w}: validation NDCG@10 {x:.4f}")
        else:
            print(f"weight {key}: validation NDCG@10 {v:.4f}")
    g = f" (pop exponent {record['pop_exponent']:g})" if "pop_exponent" in record else ""
    print(f"chose {record['weight']:g}{g}; wrote it into {ckpt}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from h2rec.report import atomic_writer
    from h2rec.runs import check_serving_overrides

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"--out {out}: must end in .parquet or .csv")
    if args.histories and (args.users or args.split):
        raise ConfigError("--histories scores new histories; it takes neither --users nor --split")
    if args.k < 1:
        raise ConfigError(f"-k {args.k}: must be >= 1")
    check_output_file(out, args.overwrite)
    check_serving_overrides(args.overrides)
    if args.histories and not Path(args.histories).is_file():
        raise DataError(f"--histories {args.histories}: no such file")
    rec = _load(args)
    check_output_file(out, args.overwrite, _run_inputs(args, rec))
    if args.histories:
        stats = rec.recommend_file(
            args.histories,
            out,
            k=args.k,
            exclude_history=not args.include_history,
            overwrite=args.overwrite,
            format=args.format,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=None if args.time_col == "none" else args.time_col,
        )
        print(f"read {stats}")
        print(f"wrote top-{args.k} for {stats.histories} histories to {out}")
        return 0
    users = [u for u in args.users.split(",")] if args.users else None
    frame = rec.recommend_users(users, args.k, args.split, not args.include_history)
    if suffix == ".parquet":
        atomic_writer(out, lambda f: frame.write_parquet(f))
    else:
        atomic_writer(out, lambda f: frame.write_csv(f))
    n_users = frame["user"].n_unique() if frame.height else 0
    print(f"wrote {frame.height} recommendations for {n_users} users to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from h2rec.runs import check_serving_overrides

    check_output_dir(Path(args.out), "export", args.overwrite)
    check_serving_overrides(args.overrides)
    rec = _load(args)
    out = rec.export(args.out, faiss=args.faiss, overwrite=args.overwrite)
    print(f"exported {rec.kind} ({rec.dataset.n_items} items, max_len {rec.max_len}) to {out}")
    return 0


# --------------------------------------------------------------------------- compare


def _cmd_compare(args: argparse.Namespace) -> int:
    from h2rec.pipeline import compare_dataset

    cfg = _dataset_run_config(args)
    base = compare_dataset(cfg, args.models, args.overwrite)
    _print_table(base)
    return 0


def _print_table(run_dir: Path) -> None:
    table = run_dir / "results.md"
    if table.exists() and is_main_process():
        print(table.read_text(), end="")
        print(f"results in {run_dir}")


# --------------------------------------------------------------------------- h2rec-train


def _pipeline(args: argparse.Namespace) -> int:
    """prepare -> embed -> build-sid -> train -> test, on DATA or the built-in dataset."""
    from h2rec.pipeline import run_pipeline

    builtin = not (
        args.data or args.config or any(o.startswith("data.path=") for o in args.overrides)
    )
    if builtin:  # a short schedule that finishes in minutes on a laptop; --set still wins
        args.overrides = [*BUILTIN_PRESET, *args.overrides]
    cfg = _run_config(args)
    base = run_pipeline(
        cfg,
        models=args.models,
        source=args.data,
        items=args.items,
        overwrite=args.overwrite,
        config_file=args.config,
        builtin=builtin,
    )
    _print_table(base)
    return 0


# --------------------------------------------------------------------------- entry points


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (in-process callers replace it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("h2rec")
    if not any(getattr(h, "_h2rec", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._h2rec = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if is_main_process() else logging.WARNING)  # torchrun: rank 0 logs


_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another output",
    errno.EPERM: "check the permissions, or choose another output",
    errno.EROFS: "the file system is read-only; choose another output",
    errno.ENOSPC: "the disk is full: free some space and rerun (outputs h2rec finished are "
    "kept; a training run continues with --resume once it has a last.pt)",
    errno.EDQUOT: "the disk quota is used up: free some space and rerun",
    errno.ENOENT: "check the path",
    errno.EISDIR: "a folder is in the way; give a file name",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "use a shorter path",
}


def _os_message(err: OSError) -> str:
    where = ""
    if err.filename is not None:
        where = f"{os.fsdecode(err.filename)}: "
        if err.filename2 is not None:
            where = f"{os.fsdecode(err.filename)} -> {os.fsdecode(err.filename2)}: "
    what = err.strerror or type(err).__name__
    hint = _OS_HINTS.get(err.errno or 0)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _fail(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    message = " ".join(message.split())
    print(f"h2rec: error: {message}", file=sys.stderr)


def _run(parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> int:
    verbose = "-v" in (sys.argv[1:] if argv is None else argv) or "--verbose" in (
        sys.argv[1:] if argv is None else argv
    )
    try:
        args = parser().parse_args(argv)  # building the parser imports the libraries
        verbose = bool(getattr(args, "verbose", False))
        _configure_logging(verbose)
        return int(args.func(args))
    except KeyboardInterrupt:
        _fail(
            "interrupted; finished outputs are kept and the one being written was not replaced "
            "(a training run continues with --resume)",
            verbose,
        )
        return 130
    except H2RecError as err:
        _fail(str(err), verbose)
        return 2
    except OSError as err:
        _fail(_os_message(err), verbose)
        return 2
    except MemoryError:
        _fail("out of memory; try a smaller batch (train.batch_size, eval.batch_size)", verbose)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with -v
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        _fail(
            f"internal error ({type(err).__name__}: {first}); please report it with the "
            "output of the same command with -v",
            verbose,
        )
        return 1


def _evaluate_like(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--data", help="dataset directory (default: the one the run was trained on)")
    p.add_argument("--sids", help="SID directory (default: the one the run was trained on)")
    p.add_argument("--include-history", action="store_true", help="rank already-seen items too")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The ``h2rec`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="h2rec",
        description="Sequential recommendation with Semantic IDs and Hash IDs (H2Rec): one "
        "stage per command. The whole pipeline in one command: h2rec-train.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model on a prepared dataset, then test it")
    p.add_argument("data", nargs="?", help="prepared dataset directory (or data.path)")
    p.add_argument("--sids", help="SID directory (default: <data>/sid)")
    p.add_argument("--embeddings", help="item embeddings .npy (for model.hid_init=pca, model.text_match)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    _add_run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model")
    _evaluate_like(p)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--protocol", choices=("full", "sampled"), help="default: the run's")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "blend", help="choose a run's text blend on its validation split, into its checkpoint"
    )
    p.add_argument("run", help="run directory (uses best.pt) or checkpoint file")
    p.add_argument("--sids", help="SID directory (default: the one the run was trained on)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--overwrite", action="store_true", help="choose again over a chosen blend")
    p.add_argument("--mode", choices=("auto", "rare"),
                   help="auto: the weight alone; rare: rows also scaled by popularity (default: "
                        "the run's train.text_blend, auto when off)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_blend)

    p = sub.add_parser("recommend", help="top-K items per user (Parquet or CSV, original ids)")
    _evaluate_like(p)
    p.add_argument("--out", required=True, help="output .parquet or .csv")
    p.add_argument("-k", "--k", type=int, default=10, help="items per user")
    p.add_argument("--users", help="comma-separated original user ids (default: all)")
    p.add_argument(
        "--split",
        choices=("valid", "test"),
        help="recommend from exactly the input this split's evaluation uses, for every "
        "evaluated user, and add the split's target (to recompute the metrics outside h2rec)",
    )
    p.add_argument(
        "--histories",
        help="recommend for new histories instead of the dataset's users: a sequence text "
        "file (user item item ... per line) or CSV/TSV/Parquet rows of user, item and "
        "optional timestamp, with original ids; streamed; unknown items are skipped and "
        "counted, an empty history gets the most popular items",
    )
    p.add_argument(
        "--format", choices=("auto", "sequences", "csv", "tsv", "parquet"), default="auto",
        help="layout of --histories (auto: from the suffix)",
    )
    p.add_argument("--user-col", default="user_id", help="user column of --histories rows")
    p.add_argument("--item-col", default="item_id", help="item column of --histories rows")
    p.add_argument(
        "--time-col", default="auto",
        help="time column of --histories rows (auto: 'timestamp' if present; none: file order)",
    )
    p.set_defaults(func=_cmd_recommend)

    p = sub.add_parser(
        "export", help="write the user encoder (torch.export) and item vectors for serving"
    )
    _evaluate_like(p)
    p.add_argument("out", help="output folder")
    p.add_argument("--faiss", action="store_true", help="also write a FAISS inner-product index")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("compare", help="train or load several models on one dataset")
    p.add_argument("data", nargs="?", help="prepared dataset directory (or data.path)")
    p.add_argument("--models", default="sasrec,sid,h2rec", help="comma-separated model kinds")
    p.add_argument("--sids", help="SID directory (default: <data>/sid)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_compare)

    if importlib.util.find_spec("h2rec.cli_data") is not None:
        from h2rec import cli_data

        cli_data.register(sub)
    return parser


def build_train_parser() -> argparse.ArgumentParser:
    """The ``h2rec-train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="h2rec-train",
        description="prepare -> embed -> build-sid -> train -> test in one command. Without "
        "DATA: the built-in generated dataset, SASRec, SID-only, naive fusion and H2Rec, with the preset "
        + " ".join(BUILTIN_PRESET)
        + " (override with --set)",
    )
    p.add_argument("data", nargs="?", help="interaction file or prepared dataset directory")
    p.add_argument("--items", help="item text table (with an interaction file; or data.items)")
    p.add_argument(
        "--models",
        help="comma-separated model kinds (default: model.kind; without DATA: sasrec,sid,fusion,h2rec)",
    )
    _add_run_options(p)
    p.set_defaults(func=_pipeline)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``h2rec``: one stage per subcommand."""
    return _run(build_parser, argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``h2rec-train``: the whole pipeline in one command."""
    return _run(build_train_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
