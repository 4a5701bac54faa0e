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
import dataclasses
import errno
import importlib.util
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from h2rec.errors import ConfigError, DataError, H2RecError, OutputError
from h2rec.outputs import (
    MARKER,
    check_output_dir,
    check_output_file,
    locked,
    marker_kind,
    recover,
    swap_in,
    write_marker,
)

if TYPE_CHECKING:  # the config pulls in torch: imported where used, so that a Ctrl-C while
    # the libraries load is already inside the one error path
    from h2rec.config import RunConfig

__all__ = ["main", "train_main"]

logger = logging.getLogger("h2rec")

MODEL_KINDS = ("sasrec", "sid", "fusion", "h2rec")
# h2rec-train without data: the built-in dataset, every model kind, a short schedule
PIPELINE_SIDS = "semantic_ids"  # h2rec-train's SID folder inside the run folder
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
    from h2rec.config import load_config

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


def _load_sids_for(cfg: RunConfig, dataset: Any) -> Any:
    """The SemanticIds a model needs: ``sid.path`` or ``<dataset>/sid``, checked against the
    dataset's item ids; None for SASRec."""
    if not cfg.model.uses_sids:
        return None
    from h2rec.semantic_ids import load_sids

    dataset_path = dataset.path
    path = Path(cfg.sid.path) if cfg.sid.path else (dataset_path / "sid" if dataset_path else None)
    if path is None or not path.exists():
        raise ConfigError(
            f"model.kind={cfg.model.kind!r} needs semantic IDs: give sid.path (--sids DIR) "
            f"or run 'h2rec build-sid' first (looked for {path})"
        )
    return load_sids(path, dataset.n_items, dataset.item_fingerprint)


def _load_embeddings_for(cfg: RunConfig, dataset: Any) -> np.ndarray | None:
    """Item embeddings when the model wants them (PCA init of the HID table), checked against
    the dataset's item ids."""
    from h2rec.embed import check_item_fingerprint, read_npy

    dataset_path = dataset.path
    path = Path(cfg.data.embeddings) if cfg.data.embeddings else None
    if path is None and dataset_path is not None and (dataset_path / "embeddings.npy").exists():
        path = dataset_path / "embeddings.npy"
    if path is None:
        if cfg.model.hid_init == "pca":
            raise ConfigError("model.hid_init='pca' needs item embeddings: give data.embeddings")
        return None
    emb = read_npy(path)
    if emb.dtype != np.float32 or emb.ndim != 2:
        raise DataError(f"{path}: expected float32 (n_items, D), got {emb.dtype} {emb.shape}")
    check_item_fingerprint(path, dataset.item_fingerprint, emb.shape[0])
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
    """Train into ``run_dir`` under its lock. A new run goes into the folder itself (so a kill
    can be resumed); ``--overwrite`` of an existing run writes a hidden folder beside it and
    swaps it in when complete, so readers see the old run or the whole new one."""
    from h2rec.train import train

    cfg = _with(
        cfg,
        data__path=_absolute(str(dataset.path)),
        data__embeddings=_absolute(cfg.data.embeddings),
        sid__path=_absolute(cfg.sid.path),
    )
    inputs = (dataset.path, cfg.sid.path, cfg.data.embeddings)
    pending = run_dir.parent / f".{run_dir.name}.new"  # an --overwrite run being written

    def run(work: Path) -> Any:
        logger.info("training %s on %s -> %s", cfg.model.kind, dataset.name, work)
        return train(
            cfg, dataset.store, sids, embeddings, run_dir=work, resume=resume,
            overwrite=overwrite, item_fingerprint=dataset.item_fingerprint,
        )

    def replacing() -> bool:
        return (resume and (pending / "last.pt").exists()) or (
            overwrite and not resume and run_dir.is_dir() and any(run_dir.iterdir())
        )

    if not _is_main_process():  # torchrun: rank 0 guards and swaps the folder
        return run(pending if replacing() else run_dir)
    with locked(run_dir, "run folder"):
        recover(run_dir)
        recover(pending)
        swap = replacing()
        work = pending if swap else run_dir
        if swap and not resume:
            check_output_dir(run_dir, "run", True, inputs)
            if pending.exists():
                if marker_kind(pending) != "run":
                    raise OutputError(f"{pending}: in the way and not written by h2rec")
                shutil.rmtree(pending)
        elif not swap and not resume and run_dir.is_dir() and any(run_dir.iterdir()):
            if marker_kind(run_dir) is None:
                raise OutputError(
                    f"{run_dir}: exists and was not written by h2rec; choose another --name or "
                    "--output-dir"
                )
            if _first_input(run_dir, inputs):
                check_output_dir(run_dir, "run", True, inputs)
        created = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
        if marker_kind(work) is None:
            write_marker(work, "run")
        try:
            result = run(work)
        except BaseException:
            if created and [p.name for p in work.iterdir()] == [MARKER]:
                shutil.rmtree(work)  # failed before writing anything: leave no empty run
            raise
        if swap:
            swap_in(work, run_dir)
            result = dataclasses.replace(result, run_dir=run_dir)
        return result


def _first_input(folder: Path, inputs: Sequence[Any]) -> bool:
    from h2rec.outputs import _first_input_inside

    return _first_input_inside(folder, inputs) is not None


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
    sids = _load_sids_for(cfg, dataset)
    embeddings = _load_embeddings_for(cfg, dataset)
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

    from h2rec.config import apply_overrides, config_from_dict
    from h2rec.data import load_dataset
    from h2rec.train import load_checkpoint

    ckpt_path = _checkpoint_path(args.run)
    allowed = ("eval.", "train.device=", "train.num_threads=")
    for override in args.overrides:
        if not override.strip().startswith(allowed):
            raise ConfigError(
                f"--set {override}: evaluate and recommend take only eval.* settings (and "
                "train.device, train.num_threads); the model's come from its checkpoint"
            )
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
    sids = _load_sids_for(cfg, dataset)
    embeddings = _load_embeddings_for(cfg, dataset)
    model, _ = load_checkpoint(
        ckpt_path, dataset.store, sids, embeddings, _device(cfg), dataset.item_fingerprint
    )
    return model, cfg, dataset


def _run_inputs(args: argparse.Namespace, cfg: RunConfig, dataset: Any) -> list[Path]:
    """The files evaluate and recommend read, which their --out must never replace."""
    files = [p for p in Path(dataset.path).iterdir() if p.is_file()]
    for folder in (cfg.sid.path, Path(args.run) if Path(args.run).is_dir() else None):
        if folder and Path(folder).is_dir():
            files += [p for p in Path(folder).iterdir() if p.is_file()]
    return [*files, _checkpoint_path(args.run)]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from h2rec.evaluate import bucket_labels, evaluate
    from h2rec.report import markdown_table, write_json

    if args.out:
        if Path(args.out).suffix.lower() != ".json":
            raise ConfigError(f"--out {args.out}: evaluate writes JSON; give a name ending in .json")
        check_output_file(Path(args.out), args.overwrite)  # before the evaluation
    model, cfg, dataset = _load_run(args)
    if args.out:
        check_output_file(Path(args.out), args.overwrite, _run_inputs(args, cfg, dataset))
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
        check_output_file(out, args.overwrite)
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
    check_output_file(out, args.overwrite)
    model, cfg, dataset = _load_run(args)
    check_output_file(out, args.overwrite, _run_inputs(args, cfg, dataset))
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
    from h2rec.config import save_config
    from h2rec.evaluate import bucket_labels, evaluate
    from h2rec.report import write_report
    from h2rec.train import load_checkpoint

    base = cfg.run_dir
    results: dict[str, Any] = {}
    for kind in kinds:
        kcfg = _with(cfg, model__kind=kind)
        run_dir = base / kind
        sids = _load_sids_for(kcfg, dataset)
        done = (run_dir / "metrics.json").exists() and (run_dir / "best.pt").exists()
        if done and not overwrite:
            logger.info("loading finished run %s", run_dir)
            model, _ = load_checkpoint(
                run_dir / "best.pt", dataset.store, sids, embeddings, _device(kcfg),
                dataset.item_fingerprint,
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
    kinds = _parse_models(args.models)
    base = cfg.run_dir
    inputs = (cfg.data.path, cfg.sid.path, cfg.data.embeddings)
    _check_run_base(base, inputs)
    dataset = load_dataset(cfg.data.path)
    embeddings = _load_embeddings_for(cfg, dataset)
    with locked(base, "run folder"):
        recover(base)
        _check_run_base(base, inputs)
        base.mkdir(parents=True, exist_ok=True)
        if marker_kind(base) is None:
            write_marker(base, "run")
        _compare(cfg, dataset, kinds, args.overwrite, embeddings)
    _print_table(base)
    return 0


def _check_run_base(base: Path, inputs: Sequence[Any]) -> None:
    """A compare/pipeline folder: absent, empty, or written by h2rec, and holding no input."""
    if base.exists() and not base.is_dir():
        check_output_dir(base, "run", True, inputs)
    if (base.is_dir() and any(base.iterdir())
            and (_first_input(base, inputs) or marker_kind(base) is None)):
        check_output_dir(base, "run", True, inputs)


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
    source = args.data or cfg.data.path
    items = args.items or cfg.data.items or None
    inputs = (source, items, cfg.sid.path, cfg.data.embeddings, args.config)
    check_output_dir(base, "run", args.overwrite, inputs)
    with locked(base, "run folder"):
        recover(base)
        check_output_dir(base, "run", args.overwrite, inputs)
        base.mkdir(parents=True, exist_ok=True)
        if marker_kind(base) is None:
            write_marker(base, "run")
        # an earlier run's results must not stand beside this one's if it is interrupted
        for name in ("config.json", "metrics.json", "results.md", "ndcg10_by_popularity.png"):
            (base / name).unlink(missing_ok=True)
        for kind in MODEL_KINDS:
            if kind not in kinds and marker_kind(base / kind) == "run":
                shutil.rmtree(base / kind)
        return _pipeline_in(args, cfg, kinds, base, source, items, builtin)


def _pipeline_in(
    args: argparse.Namespace,
    cfg: RunConfig,
    kinds: list[str],
    base: Path,
    source: str,
    items: str | None,
    builtin: bool,
) -> int:
    """The pipeline's stages, in ``base`` (locked by the caller)."""
    from h2rec.data import load_dataset

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

    needs_sids = any(k in ("sid", "fusion", "h2rec") for k in kinds)
    embeddings = None
    # not base / "sid": that is the SID-only model's run folder
    sid_dir = Path(cfg.sid.path) if cfg.sid.path else base / PIPELINE_SIDS
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
            save_embeddings(embeddings, emb_path, dataset.item_fingerprint)
        else:
            from h2rec.embed import check_item_fingerprint, read_npy

            embeddings = read_npy(emb_path)
            check_item_fingerprint(emb_path, dataset.item_fingerprint, embeddings.shape[0])
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
        sids = dataclasses.replace(sids, item_fingerprint=dataset.item_fingerprint)
        save_sids(sids, sid_dir, overwrite=True)
        cfg = _with(cfg, data__embeddings=str(emb_path.resolve()))
    if needs_sids:
        cfg = _with(cfg, sid__path=str(sid_dir.resolve()))
    if embeddings is None and cfg.model.hid_init == "pca":
        embeddings = _load_embeddings_for(cfg, dataset)
    _compare(cfg, dataset, kinds, True, embeddings)
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
    root.setLevel(level if _is_main_process() else logging.WARNING)  # torchrun: rank 0 logs


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
