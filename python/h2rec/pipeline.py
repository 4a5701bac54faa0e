"""The end-to-end run: prepare -> embed -> build-sid -> train -> evaluate, for the command line
(``h2rec-train``, ``h2rec train``, ``h2rec compare``) and Python callers alike.

The command line only parses arguments and prints; everything it runs is here, with the same
config objects (:class:`~h2rec.config.RunConfig`) and the same errors
(:class:`~h2rec.errors.H2RecError` and its kinds). In a few lines::

    import h2rec
    run = h2rec.fit("interactions.csv", items="items.csv", model="h2rec")
    rec = h2rec.load(run.run_dirs["h2rec"])
    rec.recommend([["B004756YJA", "B0020YLEYK"], ["7806397051"]], k=10)

Outputs follow :mod:`h2rec.outputs`: refused unless ``overwrite``, replaced only when h2rec
wrote them, run folders locked while a run writes them and swapped in when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from h2rec.errors import ConfigError, OutputError
from h2rec.outputs import (
    MARKER,
    check_output_dir,
    locked,
    marker_kind,
    recover,
    swap_in,
    write_marker,
)
from h2rec.runs import (
    absolute,
    device_for,
    load_embeddings_for,
    load_sids_for,
    replace_config,
    with_values,
)

if TYPE_CHECKING:  # the config pulls in torch: imported where used, so that the command line
    # starts fast and a Ctrl-C while the libraries load is inside its error path
    from h2rec.config import RunConfig

__all__ = [
    "BUILTIN_PRESET",
    "MODEL_KINDS",
    "FitResult",
    "compare_dataset",
    "fit",
    "load",
    "parse_models",
    "run_pipeline",
    "train_dataset",
]

logger = logging.getLogger("h2rec")

MODEL_KINDS = ("sasrec", "sid", "fusion", "h2rec")
PIPELINE_SIDS = "semantic_ids"  # the pipeline's SID folder inside the run folder
# the pipeline without data: the built-in dataset, every model kind, a short schedule
BUILTIN_PRESET = ("name=builtin", "train.epochs=20", "train.patience=5")


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` (and ``h2rec-train``) left: the run folder, each model's run folder
    and test metrics (``EvalResult.to_dict()``), and the results table in Markdown."""

    run_dir: Path
    run_dirs: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    table: str

    @classmethod
    def read(cls, run_dir: Path) -> FitResult:
        """The result of a finished pipeline or compare run in ``run_dir``."""
        summary = json.loads((run_dir / "metrics.json").read_text())
        models = summary.get("models", {})
        table_path = run_dir / "results.md"
        return cls(
            run_dir=run_dir,
            run_dirs={kind: run_dir / kind for kind in models},
            metrics=models,
            table=table_path.read_text() if table_path.exists() else "",
        )


def parse_models(models: str | Sequence[str]) -> list[str]:
    """Model kinds from ``"sasrec,h2rec"`` or a list; a ConfigError for an unknown one."""
    text = models if isinstance(models, str) else ",".join(models)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if not kinds or bad:
        raise ConfigError(f"--models {text!r}: choose from {', '.join(MODEL_KINDS)}")
    return kinds


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or not a distributed job)."""
    return int(os.environ.get("RANK", "0")) == 0


def _first_input(folder: Path, inputs: Sequence[Any]) -> bool:
    from h2rec.outputs import _first_input_inside

    return _first_input_inside(folder, inputs) is not None


def check_run_base(base: Path, inputs: Sequence[Any]) -> None:
    """A compare/pipeline folder: absent, empty, or written by h2rec, and holding no input."""
    if base.exists() and not base.is_dir():
        check_output_dir(base, "run", True, inputs)
    if (base.is_dir() and any(base.iterdir())
            and (_first_input(base, inputs) or marker_kind(base) is None)):
        check_output_dir(base, "run", True, inputs)


# --------------------------------------------------------------------------- one model


def train_run(
    cfg: RunConfig,
    dataset: Any,
    sids: Any,
    embeddings: np.ndarray | None,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
) -> Any:
    """Train into ``run_dir`` under its lock. A new run goes into the folder itself (so a kill
    can be resumed); ``overwrite`` of an existing run writes a hidden folder beside it and
    swaps it in when complete, so readers see the old run or the whole new one."""
    from h2rec.train import train

    cfg = with_values(
        cfg,
        data__path=absolute(str(dataset.path)),
        data__embeddings=absolute(cfg.data.embeddings),
        sid__path=absolute(cfg.sid.path),
    )
    inputs = (dataset.path, cfg.sid.path, cfg.data.embeddings)
    pending = run_dir.parent / f".{run_dir.name}.new"  # an overwrite run being written

    def run(work: Path) -> Any:
        logger.info("training %s on %s -> %s", cfg.model.kind, dataset.name, work)
        return train(
            cfg, dataset.store, sids, embeddings, run_dir=work, resume=resume,
            overwrite=overwrite, item_fingerprint=dataset.item_fingerprint,
            item_text=dataset.item_text,
        )

    def replacing() -> bool:
        return (resume and (pending / "last.pt").exists()) or (
            overwrite and not resume and run_dir.is_dir() and any(run_dir.iterdir())
        )

    if not is_main_process():  # torchrun: rank 0 guards and swaps the folder
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


def train_dataset(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Any:
    """``h2rec train``: one model (``cfg.model.kind``) on the prepared dataset ``cfg.data.path``
    into ``cfg.run_dir``; the :class:`~h2rec.train.TrainResult`."""
    from h2rec.data import load_dataset

    if not cfg.data.path:
        raise ConfigError("no dataset: give DATA (a prepared dataset directory) or data.path")
    dataset = load_dataset(cfg.data.path)
    sids = load_sids_for(cfg, dataset)
    embeddings = load_embeddings_for(cfg, dataset)
    return train_run(cfg, dataset, sids, embeddings, cfg.run_dir, resume, overwrite)


# --------------------------------------------------------------------------- several models


def compare_runs(
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
    from h2rec.blend import blend_applies
    from h2rec.blend import choose as choose_blend
    from h2rec.blend import apply_record as apply_blend
    from h2rec.blend import is_outdated
    from h2rec.blend import write_copy as write_blend_copy
    from h2rec.train import load_checkpoint
    from h2rec.train.checkpoint import checkpoint_blend, set_checkpoint_blend

    base = cfg.run_dir
    results: dict[str, Any] = {}
    for kind in kinds:
        kcfg = with_values(cfg, model__kind=kind)
        run_dir = base / kind
        sids = load_sids_for(kcfg, dataset)
        done = (run_dir / "metrics.json").exists() and (run_dir / "best.pt").exists()
        if done and not overwrite:
            logger.info("loading finished run %s", run_dir)
            model, saved = load_checkpoint(
                run_dir / "best.pt", dataset.store, sids, embeddings, device_for(kcfg),
                dataset.item_fingerprint, apply_blend=False,
            )
            if saved.model != kcfg.model:  # e.g. trained before a default changed
                diff = [f"model.{f.name}: {getattr(saved.model, f.name)!r} -> "
                        f"{getattr(kcfg.model, f.name)!r}" for f in dataclasses.fields(kcfg.model)
                        if getattr(saved.model, f.name) != getattr(kcfg.model, f.name)]
                raise OutputError(
                    f"{run_dir}: holds a finished {kind} run with other model settings "
                    f"({', '.join(diff[:4])}); add --overwrite to train it again"
                )
            saved_blend = checkpoint_blend(run_dir / "best.pt")
            if not blend_applies(kcfg, embeddings, dataset.item_text):
                pass  # asked for without it (train.text_blend=off)
            elif is_outdated(saved_blend, dataset.item_text, kcfg.train.text_blend):
                # finished before the text blend (or its TF-IDF rows) existed: choose it now,
                # as h2rec blend --overwrite does
                record = choose_blend(model, embeddings, partial(
                    evaluate, store=dataset.store, split="valid", cfg=kcfg.eval,
                    max_len=kcfg.model.max_len), dataset.item_text,
                    dataset.store.popularity(holdout=2), kcfg.train.text_blend)
                set_checkpoint_blend(run_dir / "best.pt", record)
                write_blend_copy(run_dir, record)
            else:
                apply_blend(model, saved_blend, embeddings, str(run_dir / "best.pt"),
                            dataset.item_text, dataset.store.popularity(holdout=2))
            test = evaluate(model, dataset.store, "test", kcfg.eval, kcfg.model.max_len)
        else:
            test = train_run(kcfg, dataset, sids, embeddings, run_dir, False, overwrite).test
        results[kind] = test.to_dict()
    save_config(cfg, base / "config.json")
    write_report(
        base,
        results,
        bucket_labels(cfg.eval.buckets),
        extra={"dataset": str(dataset.path), "models_compared": list(kinds)},
    )
    return base


def compare_dataset(cfg: RunConfig, models: str | Sequence[str], overwrite: bool = False) -> Path:
    """``h2rec compare``: train or load each of ``models`` on the prepared dataset
    ``cfg.data.path``, under ``cfg.run_dir/<kind>``; the folder with the table."""
    from h2rec.data import load_dataset

    if not cfg.data.path:
        raise ConfigError("no dataset: give DATA (a prepared dataset directory) or data.path")
    kinds = parse_models(models)
    base = cfg.run_dir
    inputs = (cfg.data.path, cfg.sid.path, cfg.data.embeddings)
    check_run_base(base, inputs)
    dataset = load_dataset(cfg.data.path)
    embeddings = load_embeddings_for(cfg, dataset)
    with locked(base, "run folder"):
        recover(base)
        check_run_base(base, inputs)
        base.mkdir(parents=True, exist_ok=True)
        if marker_kind(base) is None:
            write_marker(base, "run")
        compare_runs(cfg, dataset, kinds, overwrite, embeddings)
    return base


# --------------------------------------------------------------------------- the whole pipeline


def run_pipeline(
    cfg: RunConfig,
    models: str | Sequence[str] | None = None,
    source: str | Path | None = None,
    items: str | Path | None = None,
    overwrite: bool = False,
    config_file: str | Path | None = None,
    builtin: bool = False,
) -> Path:
    """prepare -> embed -> build-sid -> train -> test into ``cfg.run_dir``.

    ``source``: an interaction file or a prepared dataset folder (default ``cfg.data.path``);
    none at all (or ``builtin``) uses the built-in generated dataset. ``models``: the kinds to
    train (default ``cfg.model.kind``; every kind when ``builtin``, the built-in preset's
    run). ``config_file`` only names an input the run folder must not hold."""
    source = str(source or cfg.data.path or "")
    items = str(items or cfg.data.items or "") or None
    if models:
        kinds = parse_models(models)
    else:
        kinds = list(MODEL_KINDS) if builtin else [cfg.model.kind]
    base = cfg.run_dir
    inputs = (source, items, cfg.sid.path, cfg.data.embeddings, config_file)
    check_output_dir(base, "run", overwrite, inputs)
    with locked(base, "run folder"):
        recover(base)
        check_output_dir(base, "run", overwrite, inputs)
        base.mkdir(parents=True, exist_ok=True)
        if marker_kind(base) is None:
            write_marker(base, "run")
        # an earlier run's results must not stand beside this one's if it is interrupted
        for name in ("config.json", "metrics.json", "results.md", "ndcg10_by_popularity.png"):
            (base / name).unlink(missing_ok=True)
        for kind in MODEL_KINDS:
            if kind not in kinds and marker_kind(base / kind) == "run":
                shutil.rmtree(base / kind)
        _pipeline_in(cfg, kinds, base, source, items)
    return base


def _pipeline_in(
    cfg: RunConfig,
    kinds: list[str],
    base: Path,
    source: str,
    items: str | None,
) -> None:
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
            if cfg.data.behaviour > 0:
                from h2rec.embed import behaviour_vectors, mix_behaviour

                embeddings = mix_behaviour(
                    embeddings, behaviour_vectors(dataset.store, seed=cfg.train.seed),
                    cfg.data.behaviour,
                )
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
        cfg = with_values(cfg, data__embeddings=str(emb_path.resolve()))
    if needs_sids:
        cfg = with_values(cfg, sid__path=str(sid_dir.resolve()))
    if embeddings is None and (
        cfg.model.hid_init == "pca" or cfg.model.text_match or cfg.train.text_blend == "auto"
    ):
        embeddings = load_embeddings_for(cfg, dataset)
    compare_runs(cfg, dataset, kinds, True, embeddings)


# --------------------------------------------------------------------------- Python API


def _config(
    config: RunConfig | str | Path | None, overrides: Sequence[str], builtin: bool
) -> RunConfig:
    """A RunConfig from an object, a TOML file or the defaults, with ``overrides`` applied
    (the built-in preset first when there is no data and no config)."""
    from h2rec.config import RunConfig, apply_overrides, load_config

    if isinstance(config, RunConfig):
        return apply_overrides(config, overrides) if overrides else config
    if builtin and config is None:
        overrides = [*BUILTIN_PRESET, *overrides]
    return load_config(config, overrides)


def fit(
    data: str | Path | None = None,
    items: str | Path | None = None,
    model: str | Sequence[str] | None = None,
    config: RunConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    name: str | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Run the whole pipeline, as ``h2rec-train`` does, and return what it left.

    ``data``: an interaction file (CSV/TSV/Parquet, sequence text, RecBole, MovieLens) or a
    prepared dataset folder; None (with no ``data.path`` in ``config``) uses the built-in
    generated dataset and its short preset. ``items``: the item text table. ``model``: one kind
    (``"h2rec"``, ``"sasrec"``, ``"sid"``, ``"fusion"``) or several; default ``model.kind``
    (every kind for the built-in data). ``config``: a :class:`RunConfig`, a TOML file or None
    (defaults); ``overrides``: ``"section.key=value"`` strings as with ``--set``. The run goes
    to ``<output_dir>/<name>/`` (defaults from the config: ``runs/h2rec``), one folder per
    model kind inside it; an existing run is replaced only with ``overwrite``.

    Errors are the CLI's: :class:`~h2rec.errors.ConfigError`, :class:`~h2rec.errors.DataError`,
    :class:`~h2rec.errors.OutputError` (all :class:`~h2rec.errors.H2RecError`), OSError."""
    from h2rec.config import RunConfig

    overrides = list(overrides)
    has_data = bool(data) or any(o.strip().startswith("data.path=") for o in overrides)
    if isinstance(config, RunConfig):
        has_data = has_data or bool(config.data.path)
    builtin = not has_data and config is None
    cfg = _config(config, overrides, builtin)
    changes: dict[str, Any] = {}
    if name:
        changes["name"] = name
    if output_dir:
        changes["output_dir"] = str(output_dir)
    if changes:
        cfg = replace_config(cfg, **changes)
    if isinstance(model, str) and "," not in model and model in MODEL_KINDS:
        cfg = with_values(cfg, model__kind=model)
    base = run_pipeline(
        cfg,
        models=model,
        source=data,
        items=items,
        overwrite=overwrite,
        config_file=None if isinstance(config, RunConfig) else config,
        builtin=builtin,
    )
    return FitResult.read(base)


def load(
    run: str | Path,
    data: str | Path | None = None,
    sids: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Any:
    """A trained recommender (:class:`h2rec.serving.Recommender`) from a run folder (its
    ``best.pt``) or a checkpoint file; ``data``/``sids`` replace the folders it was trained on,
    ``overrides`` may set ``eval.*``, ``train.device`` and ``train.num_threads``."""
    from h2rec.serving import Recommender

    return Recommender.load(run, data=data, sids=sids, overrides=overrides)
