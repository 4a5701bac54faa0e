"""Seed the run and build the model a configuration describes, after checking its inputs."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from h2rec import _core
from h2rec.config import RunConfig
from h2rec.errors import ConfigError, DataError, H2RecError

if TYPE_CHECKING:
    from h2rec.models import Recommender


def check_codes(sids: Any, n_items: int, where: str = "codes") -> None:
    """Codes must have one row per item of the dataset."""
    codes = getattr(sids, "codes", None)
    if codes is None:
        return
    if codes.ndim != 2 or codes.shape[0] != n_items:
        raise DataError(
            f"{where}: codes have shape {tuple(codes.shape)} but the dataset has "
            f"n_items={n_items}; build the semantic IDs from this dataset's embeddings"
        )


def _check_embeddings(embeddings: np.ndarray | None, n_items: int, where: str) -> None:
    if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[0] != n_items):
        raise DataError(
            f"{where}: embeddings have shape {tuple(embeddings.shape)} but the dataset has "
            f"n_items={n_items}"
        )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: the one place a run's global RNGs are set."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cooccurrence_for(cfg: RunConfig, store: _core.SequenceStore, sids: Any) -> Any:
    """PPMI co-occurrence positives mined in Rust from the training prefixes, when H2Rec's
    item-level alignment uses them (None otherwise: the model falls back to same-tuple items)."""
    m = cfg.model
    if m.kind != "h2rec" or not m.align_item or not m.align_item_cooccur or sids is None:
        return None
    from h2rec.models import CooccurrencePositives

    return CooccurrencePositives.from_store(
        store, codes=np.asarray(sids.codes), window=m.align_item_window, holdout=2
    )


def build_for(
    cfg: RunConfig, store: _core.SequenceStore, sids: Any, embeddings: np.ndarray | None
) -> Recommender:
    """The model ``cfg.model`` describes, for this dataset and these codes."""
    from h2rec.models import build_model

    try:
        popularity = store.popularity(holdout=2) if cfg.model.hid_pop_gate else None
        return build_model(
            cfg.model,
            store.n_items,
            sids,
            embeddings,
            _cooccurrence_for(cfg, store, sids),
            popularity,
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, H2RecError):
            raise
        raise ConfigError(f"model: {err}") from err
