"""What a run reads and what it leaves: the Semantic IDs and item embeddings a model needs for a
dataset (checked against the dataset's item ids), and a trained run loaded back as
(model, config, dataset).

Used by :mod:`h2rec.pipeline` (training) and :mod:`h2rec.serving` (a trained recommender);
it sits above training and evaluation and below both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from h2rec.errors import ConfigError, DataError, H2RecError

if TYPE_CHECKING:  # the config pulls in torch: imported where used
    from h2rec.config import RunConfig

__all__ = [
    "absolute",
    "check_serving_overrides",
    "checkpoint_path",
    "device_for",
    "load_embeddings_for",
    "load_run",
    "load_sids_for",
    "replace_config",
    "with_values",
]

# the settings evaluate/recommend (and a loaded recommender) may change; the model's come from
# its checkpoint
SERVING_OVERRIDES = ("eval.", "train.device=", "train.num_threads=")


def with_values(cfg: RunConfig, **section_values: Any) -> RunConfig:
    """``cfg`` with ``section__key=value`` pairs replaced (type-checked like overrides)."""
    from h2rec.config import config_from_dict, config_to_dict

    values = config_to_dict(cfg)
    for key, value in section_values.items():
        section, field = key.split("__")
        values[section][field] = value
    return config_from_dict(values)


def absolute(path: str | Path | None) -> str:
    """``path`` made absolute (``~`` expanded); "" for no path."""
    return str(Path(path).expanduser().resolve()) if path else ""


def load_sids_for(cfg: RunConfig, dataset: Any) -> Any:
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


def load_embeddings_for(cfg: RunConfig, dataset: Any) -> np.ndarray | None:
    """Item embeddings when the model wants them (PCA init of the HID table, text match), checked against
    the dataset's item ids."""
    from h2rec.embed import check_item_fingerprint, read_npy

    dataset_path = dataset.path
    path = Path(cfg.data.embeddings) if cfg.data.embeddings else None
    if path is None and dataset_path is not None and (dataset_path / "embeddings.npy").exists():
        path = dataset_path / "embeddings.npy"
    if path is None:
        if cfg.model.hid_init == "pca":
            raise ConfigError("model.hid_init='pca' needs item embeddings: give data.embeddings")
        if cfg.model.text_match:
            raise ConfigError(
                "model.text_match needs item embeddings: give data.embeddings (--embeddings) "
                "or run 'h2rec embed' on the dataset"
            )
        return None
    emb = read_npy(path)
    if emb.dtype != np.float32 or emb.ndim != 2:
        raise DataError(f"{path}: expected float32 (n_items, D), got {emb.dtype} {emb.shape}")
    check_item_fingerprint(path, dataset.item_fingerprint, emb.shape[0])
    return emb


def device_for(cfg: RunConfig) -> Any:
    """The torch device ``train.device`` names (``auto``: CUDA when available)."""
    from h2rec.train import resolve_device

    return resolve_device(cfg.train.device)


def checkpoint_path(target: str | Path) -> Path:
    """``target``'s checkpoint: ``<run>/best.pt`` for a run folder, else the file itself."""
    p = Path(target)
    if p.is_dir():
        p = p / "best.pt"
    if not p.exists():
        raise H2RecError(f"{p}: no checkpoint (give a run directory or a .pt file)")
    return p


def check_serving_overrides(overrides: Iterable[str]) -> list[str]:
    """``overrides`` if each is one a trained model may take (``eval.*``, ``train.device``,
    ``train.num_threads``); a ConfigError naming the first that is not."""
    overrides = list(overrides)
    for override in overrides:
        if not override.strip().startswith(SERVING_OVERRIDES):
            raise ConfigError(
                f"--set {override}: evaluate and recommend take only eval.* settings (and "
                "train.device, train.num_threads); the model's come from its checkpoint"
            )
    return overrides


def load_run(
    run: str | Path,
    data: str | Path | None = None,
    sids: str | Path | None = None,
    overrides: Sequence[str] = (),
    apply_blend: bool = True,
) -> tuple[Any, RunConfig, Any]:
    """(model in eval mode, config, dataset) of a run folder or checkpoint file; ``data`` and
    ``sids`` replace the dataset and SID folders the run was trained on, ``overrides`` may set
    ``eval.*``, ``train.device`` and ``train.num_threads``."""
    import torch

    from h2rec.config import apply_overrides, config_from_saved
    from h2rec.data import load_dataset
    from h2rec.train import load_checkpoint

    ckpt_path = checkpoint_path(run)
    overrides = check_serving_overrides(overrides)
    try:
        raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        cfg = config_from_saved(raw["config"])
    except H2RecError:
        raise
    except Exception as err:
        raise H2RecError(f"{ckpt_path}: not a readable h2rec checkpoint: {err}") from err
    data_path = absolute(data) if data else cfg.data.path
    if sids:
        cfg = with_values(cfg, sid__path=absolute(sids))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    if data:
        cfg = with_values(cfg, data__path=data_path)
    dataset = load_dataset(data_path)
    sid_codes = load_sids_for(cfg, dataset)
    embeddings = load_embeddings_for(cfg, dataset)
    model, _ = load_checkpoint(
        ckpt_path, dataset.store, sid_codes, embeddings, device_for(cfg), dataset.item_fingerprint,
        apply_blend, dataset.item_text,
    )
    return model, cfg, dataset


def replace_config(cfg: RunConfig, **changes: Any) -> RunConfig:
    """``dataclasses.replace`` with a bad value turned into a ConfigError."""
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
