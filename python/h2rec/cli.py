"""Command line: ``h2rec <command>`` and ``h2rec-train``.

``h2rec-train [DATA]`` runs the whole pipeline (prepare -> embed -> build-sid -> train -> test)
and prints the result table; without arguments it uses the built-in generated dataset.
``h2rec train | evaluate | recommend | compare`` run one stage each; ``prepare``, ``embed`` and
``build-sid`` come from :mod:`h2rec.cli_data`.

Every run reads ``--config file.toml`` and ``--set section.key=value`` overrides, writes under
``./runs/<run name>/`` (``--output-dir`` to change), saves its resolved config, and refuses to
replace existing results without ``--overwrite``. An :class:`~h2rec.errors.H2RecError` ends the
command with a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from h2rec.config import RunConfig, apply_overrides, load_config, save_config
from h2rec.errors import ConfigError, DataError, H2RecError

__all__ = ["main", "train_main"]

logger = logging.getLogger("h2rec")

MODEL_KINDS = ("sasrec", "sid", "h2rec")
# h2rec-train without data: the built-in dataset, all three models, a short schedule
BUILTIN_PRESET = ("name=builtin", "train.epochs=20", "train.patience=5")


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
    cfg = load_config(args.config, args.overrides)
    changes: dict[str, Any] = {}
    if getattr(args, "name", None):
        changes["name"] = args.name
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    if changes:
        try:
            cfg = dataclasses.replace(cfg, **changes)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err
    return cfg


def _with(cfg: RunConfig, **section_values: Any) -> RunConfig:
    """``cfg`` with ``section__key=value`` pairs replaced (type-checked like overrides)."""
    from h2rec.config import config_from_dict, config_to_dict

    values = config_to_dict(cfg)
    for key, value in section_values.items():
        section, field = key.split("__")
        values[section][field] = value
    return config_from_dict(values)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def _load_sids_for(cfg: RunConfig, dataset_path: Path | None) -> Any:
    """The SemanticIds a model needs: ``sid.path`` or ``<dataset>/sid``; None for SASRec."""
    if not cfg.model.uses_sids:
        return None
    from h2rec.semantic_ids import load_sids

    path = Path(cfg.sid.path) if cfg.sid.path else (dataset_path / "sid" if dataset_path else None)
    if path is None or not path.exists():
        raise ConfigError(
            f"model.kind={cfg.model.kind!r} needs semantic IDs: give sid.path (--sids DIR) "
            f"or run 'h2rec build-sid' first (looked for {path})"
        )
    return load_sids(path)


def _load_embeddings_for(cfg: RunConfig, dataset_path: Path | None) -> np.ndarray | None:
    """Item embeddings when the model wants them (PCA init of the HID table)."""
    path = Path(cfg.data.embeddings) if cfg.data.embeddings else None
    if path is None and dataset_path is not None and (dataset_path / "embeddings.npy").exists():
        path = dataset_path / "embeddings.npy"
    if path is None:
        if cfg.model.hid_init == "pca":
            raise ConfigError("model.hid_init='pca' needs item embeddings: give data.embeddings")
        return None
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read embeddings ({err})") from err
    if emb.dtype != np.float32 or emb.ndim != 2:
        raise DataError(f"{path}: expected float32 (n_items, D), got {emb.dtype} {emb.shape}")
    return emb


def _device(cfg: RunConfig) -> Any:
    from h2rec.train import resolve_device

    return resolve_device(cfg.train.device)


# --------------------------------------------------------------------------- train


def _train_one(
    cfg: RunConfig,
    dataset: Any,
    sids: Any,
    embeddings: np.ndarray | None,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
) -> Any:
    from h2rec.train import train

    cfg = _with(
        cfg,
        data__path=_absolute(str(dataset.path)),
        data__embeddings=_absolute(cfg.data.embeddings),
        sid__path=_absolute(cfg.sid.path),
    )
    logger.info("training %s on %s -> %s", cfg.model.kind, dataset.name, run_dir)
    return train(
        cfg, dataset.store, sids, embeddings, run_dir=run_dir, resume=resume, overwrite=overwrite
    )


def _dataset_run_config(args: argparse.Namespace) -> RunConfig:
    """The run config with DATA, --sids and --embeddings folded in; a dataset is required."""
    cfg = _run_config(args)
    if args.data:
        cfg = _with(cfg, data__path=_absolute(args.data))
    if args.sids:
        cfg = _with(cfg, sid__path=_absolute(args.sids))
    if getattr(args, "embeddings", None):
        cfg = _with(cfg, data__embeddings=_absolute(args.embeddings))
    if not cfg.data.path:
        raise ConfigError("no dataset: give DATA (a prepared dataset directory) or data.path")
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from h2rec.data import load_dataset

    cfg = _dataset_run_config(args)
    dataset = load_dataset(cfg.data.path)
    sids = _load_sids_for(cfg, dataset.path)
    embeddings = _load_embeddings_for(cfg, dataset.path)
    result = _train_one(cfg, dataset, sids, embeddings, cfg.run_dir, args.resume, args.overwrite)
    _print_table(cfg.run_dir)
    return 0 if result is not None else 1


# --------------------------------------------------------------------------- evaluate / recommend


def _checkpoint_path(target: str) -> Path:
    p = Path(target)
    if p.is_dir():
        p = p / "best.pt"
    if not p.exists():
        raise H2RecError(f"{p}: no checkpoint (give a run directory or a .pt file)")
    return p


def _load_run(args: argparse.Namespace) -> tuple[Any, RunConfig, Any]:
    """(model, config, dataset) of a checkpoint, with --data/--sids overriding its paths."""
    import torch

    from h2rec.config import config_from_dict
    from h2rec.data import load_dataset
    from h2rec.train import load_checkpoint

    ckpt_path = _checkpoint_path(args.run)
    try:
        raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg = config_from_dict(raw["config"])
    except H2RecError:
        raise
    except Exception as err:
        raise H2RecError(f"{ckpt_path}: not a readable h2rec checkpoint: {err}") from err
    data_path = _absolute(args.data) if args.data else cfg.data.path
    if args.sids:
        cfg = _with(cfg, sid__path=_absolute(args.sids))
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    dataset = load_dataset(data_path)
    sids = _load_sids_for(cfg, dataset.path)
    embeddings = _load_embeddings_for(cfg, dataset.path)
    model, _ = load_checkpoint(ckpt_path, dataset.store, sids, embeddings, _device(cfg))
    return model, cfg, dataset


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from h2rec.evaluate import bucket_labels, evaluate
    from h2rec.report import markdown_table, write_json

    model, cfg, dataset = _load_run(args)
    ev = cfg.eval
    if args.protocol:
        ev = dataclasses.replace(ev, protocol=args.protocol)
    if args.include_history:
        ev = dataclasses.replace(ev, exclude_history=False)
    result = evaluate(model, dataset.store, args.split, ev, cfg.model.max_len)
    summary = {cfg.model.kind: result.to_dict()}
    print(markdown_table(summary), end="")
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise H2RecError(f"{out}: exists; pass --overwrite to replace it")
        write_json(out, {"models": summary, "buckets": bucket_labels(ev.buckets)})
        print(f"wrote {out}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    import polars as pl

    from h2rec.evaluate import eval_users, recommend_top_k
    from h2rec.report import atomic_writer

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"--out {out}: must end in .parquet or .csv")
    if out.exists() and not args.overwrite:
        raise H2RecError(f"{out}: exists; pass --overwrite to replace it")
    model, cfg, dataset = _load_run(args)
    store = dataset.store
    if args.users:
        index = dataset.user_index()
        wanted = [u.strip() for u in args.users.split(",") if u.strip()]
        missing = [u for u in wanted if u not in index]
        if missing:
            raise DataError(f"--users: unknown user ids {missing[:5]}")
        users = np.array([index[u] for u in wanted], dtype=np.int64)
    elif args.split:
        users = eval_users(store)  # the users the split's metrics are computed over
    else:
        users = np.arange(store.n_users, dtype=np.int64)
    if args.split:
        short = users[store.lengths()[users] < 3]
        if short.size:
            raise DataError(
                f"--users: user {dataset.user_ids[int(short[0])]!r} has fewer than 3 "
                f"interactions, so it has no {args.split} target"
            )
    items, scores = recommend_top_k(
        model,
        store,
        users,
        args.k,
        cfg.model.max_len,
        exclude_history=not args.include_history,
        batch_size=cfg.eval.batch_size,
        split=args.split,
        max_scores_mb=cfg.eval.max_scores_mb,
    )
    k = items.shape[1]
    item_ids = np.array(["", *dataset.item_ids], dtype=object)
    user_ids = np.array(dataset.user_ids, dtype=object)
    keep = items.reshape(-1) > 0
    columns: dict[str, Any] = {
        "user": user_ids[np.repeat(users, k)][keep].tolist(),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), users.size)[keep],
        "item": item_ids[items.reshape(-1)][keep].tolist(),
        "score": scores.reshape(-1)[keep].astype(np.float64),
    }
    schema: dict[str, Any] = {
        "user": pl.String, "rank": pl.Int64, "item": pl.String, "score": pl.Float64
    }
    if args.split:  # the held-out item the split's metrics score these lists against
        _, targets = store.eval_inputs(users, 1, args.split)
        columns["target"] = item_ids[np.repeat(targets, k)][keep].tolist()
        schema["target"] = pl.String
    frame = pl.DataFrame(columns, schema=schema)
    if suffix == ".parquet":
        atomic_writer(out, lambda f: frame.write_parquet(f))
    else:
        atomic_writer(out, lambda f: frame.write_csv(f))
    print(f"wrote {frame.height} recommendations for {users.size} users to {out}")
    return 0


# --------------------------------------------------------------------------- compare


def _compare(
    cfg: RunConfig,
    dataset: Any,
    kinds: Sequence[str],
    overwrite: bool,
    embeddings: np.ndarray | None,
) -> Path:
    """Train (or load, when a finished run exists) each model kind; one table and one plot."""
    from h2rec.evaluate import bucket_labels, evaluate
    from h2rec.report import write_report
    from h2rec.train import load_checkpoint

    base = cfg.run_dir
    results: dict[str, Any] = {}
    for kind in kinds:
        kcfg = _with(cfg, model__kind=kind)
        run_dir = base / kind
        sids = _load_sids_for(kcfg, dataset.path)
        done = (run_dir / "metrics.json").exists() and (run_dir / "best.pt").exists()
        if done and not overwrite:
            logger.info("loading finished run %s", run_dir)
            model, _ = load_checkpoint(
                run_dir / "best.pt", dataset.store, sids, embeddings, _device(kcfg)
            )
            test = evaluate(model, dataset.store, "test", kcfg.eval, kcfg.model.max_len)
        else:
            test = _train_one(kcfg, dataset, sids, embeddings, run_dir, False, overwrite).test
        results[kind] = test.to_dict()
    save_config(cfg, base / "config.json")
    write_report(
        base,
        results,
        bucket_labels(cfg.eval.buckets),
        extra={"dataset": str(dataset.path), "models_compared": list(kinds)},
    )
    return base


def _parse_models(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if not kinds or bad:
        raise ConfigError(f"--models {text!r}: choose from {', '.join(MODEL_KINDS)}")
    return kinds


def _cmd_compare(args: argparse.Namespace) -> int:
    from h2rec.data import load_dataset

    cfg = _dataset_run_config(args)
    dataset = load_dataset(cfg.data.path)
    embeddings = _load_embeddings_for(cfg, dataset.path)
    base = _compare(cfg, dataset, _parse_models(args.models), args.overwrite, embeddings)
    _print_table(base)
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print_table(run_dir: Path) -> None:
    table = run_dir / "results.md"
    if table.exists() and _is_main_process():
        print(table.read_text(), end="")
        print(f"results in {run_dir}")


# --------------------------------------------------------------------------- h2rec-train


def _pipeline(args: argparse.Namespace) -> int:
    """prepare -> embed -> build-sid -> train -> test, on DATA or the built-in dataset."""
    from h2rec.data import load_dataset

    builtin = not (
        args.data or args.config or any(o.startswith("data.path=") for o in args.overrides)
    )
    if builtin:  # a short schedule that finishes in minutes on a laptop; --set still wins
        args.overrides = [*BUILTIN_PRESET, *args.overrides]
    cfg = _run_config(args)
    if args.models:
        kinds = _parse_models(args.models)
    else:
        kinds = list(MODEL_KINDS) if builtin else [cfg.model.kind]
    base = cfg.run_dir
    if base.exists() and any(base.iterdir()) and not args.overwrite:
        raise H2RecError(f"{base}: a run already exists there; pass --overwrite to replace it")
    base.mkdir(parents=True, exist_ok=True)
    source = args.data or cfg.data.path
    items = args.items or cfg.data.items or None
    data_dir = base / "data"
    if not source:
        from h2rec.synthetic import SyntheticConfig, builtin_dataset

        logger.info("generating the built-in dataset in %s", base / "builtin")
        synthetic = SyntheticConfig(
            n_users=cfg.data.synthetic_users,
            n_items=cfg.data.synthetic_items,
            seed=cfg.data.synthetic_seed,
        )
        data_dir = builtin_dataset(base / "builtin", synthetic, overwrite=True)
    elif (Path(source) / "meta.json").exists():
        data_dir = Path(source)
    else:
        from h2rec.data import FilterOptions, prepare

        logger.info("preparing %s -> %s", source, data_dir)
        prepare(
            source,
            data_dir,
            items=items,
            filter=FilterOptions(
                kind=cfg.data.filter, min_user=cfg.data.min_user, min_item=cfg.data.min_item
            ),
            overwrite=True,
        )
    dataset = load_dataset(data_dir)
    logger.info("dataset %s: %d users, %d items", dataset.name, dataset.n_users, dataset.n_items)

    needs_sids = any(k in ("sid", "h2rec") for k in kinds)
    embeddings = None
    sid_dir = Path(cfg.sid.path) if cfg.sid.path else base / "sid"
    if needs_sids and not cfg.sid.path:
        emb_path = Path(cfg.data.embeddings) if cfg.data.embeddings else base / "embeddings.npy"
        if not emb_path.exists() or emb_path == base / "embeddings.npy":
            from h2rec.embed import EmbedOptions, embed_texts, save_embeddings

            logger.info("embedding %d item texts (%s)", dataset.n_items, cfg.data.encoder)
            options = EmbedOptions(
                backend=cfg.data.encoder,
                model=cfg.data.encoder_model,
                dim=cfg.data.embed_dim,
                seed=cfg.train.seed,
            )
            embeddings = embed_texts(dataset.item_text, options)
            save_embeddings(embeddings, emb_path)
        else:
            embeddings = np.load(emb_path, allow_pickle=False)
        from h2rec.semantic_ids import build_sid, save_sids

        k = min(cfg.sid.codebook_size, max(dataset.n_items // 4, 2))
        logger.info("building %d x %d semantic IDs", cfg.sid.n_levels, k)
        sids = build_sid(
            embeddings,
            n_levels=cfg.sid.n_levels,
            codebook_size=k,
            n_iter=cfg.sid.n_iter,
            seed=cfg.sid.seed,
            collision=cfg.sid.collision,
            normalize_residuals=cfg.sid.normalize_residuals,
            balanced=cfg.sid.balanced,
        )
        save_sids(sids, sid_dir)
        cfg = _with(cfg, data__embeddings=str(emb_path.resolve()))
    if needs_sids:
        cfg = _with(cfg, sid__path=str(sid_dir.resolve()))
    if embeddings is None and cfg.model.hid_init == "pca":
        embeddings = _load_embeddings_for(cfg, dataset.path)
    _compare(cfg, dataset, kinds, True, embeddings)
    _print_table(base)
    return 0


# --------------------------------------------------------------------------- entry points


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("h2rec")
    if not any(getattr(h, "_h2rec", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._h2rec = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level if _is_main_process() else logging.WARNING)  # torchrun: rank 0 logs


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    _configure_logging(getattr(args, "verbose", False))
    try:
        return int(args.func(args))
    except H2RecError as err:
        message = " ".join(str(err).split())
        print(f"h2rec: error: {message}", file=sys.stderr)
        return 2


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
    p.add_argument("--embeddings", help="item embeddings .npy (for model.hid_init=pca)")
    p.add_argument("--resume", action="store_true", help="continue the run from its last.pt")
    _add_run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained model")
    _evaluate_like(p)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--protocol", choices=("full", "sampled"), help="default: the run's")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.set_defaults(func=_cmd_evaluate)

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
    p.set_defaults(func=_cmd_recommend)

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
        "DATA: the built-in generated dataset, SASRec, SID-only and H2Rec, with the preset "
        + " ".join(BUILTIN_PRESET)
        + " (override with --set)",
    )
    p.add_argument("data", nargs="?", help="interaction file or prepared dataset directory")
    p.add_argument("--items", help="item text table (with an interaction file; or data.items)")
    p.add_argument(
        "--models",
        help="comma-separated model kinds (default: model.kind; without DATA: sasrec,sid,h2rec)",
    )
    _add_run_options(p)
    p.set_defaults(func=_pipeline)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``h2rec``: one stage per subcommand."""
    return _run(build_parser(), argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``h2rec-train``: the whole pipeline in one command."""
    return _run(build_train_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
