"""Sequential recommenders: SASRec (hash IDs), SID-only, and H2Rec (both, dual branch).

Every model maps left-padded item sequences (B, T) to user states (B, T, E) with ``forward``;
``item_vectors`` / ``all_item_vectors`` give the item side, and score = (state * item).sum(-1).
``aux_losses`` gives the weighted alignment losses (H2Rec only; {} otherwise).
"""

from __future__ import annotations

import logging
from typing import Protocol, Union

import numpy as np

from h2rec.errors import ConfigError, DataError
from h2rec.models.backbone import (
    Backbone,
    CrossAttention,
    LevelCrossAttention,
    SequenceInput,
    attention_mask,
)
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding, SidEmbedding, pca_scores
from h2rec.models.fusion import FusionRec
from h2rec.models.h2rec import H2Rec, LevelGate
from h2rec.models.positives import CooccurrencePositives, tuple_groups
from h2rec.models.sasrec import SASRec
from h2rec.models.sid import SidRec

logger = logging.getLogger(__name__)

Recommender = Union[SASRec, SidRec, FusionRec, H2Rec]


class _SidsLike(Protocol):
    """What ``build_model`` reads from ``h2rec.semantic_ids.SemanticIds``."""

    codes: np.ndarray
    codebooks: np.ndarray


def build_model(
    cfg: ModelConfig,
    n_items: int,
    sids: _SidsLike | None = None,
    item_embeddings: np.ndarray | None = None,
    cooccur: CooccurrencePositives | None = None,
    popularity: np.ndarray | None = None,
) -> Recommender:
    """Build the model ``cfg.kind`` for a catalogue of ``n_items`` items (ids 1..n_items).

    Args:
        cfg: model configuration.
        n_items: number of real items.
        sids: semantic IDs (``codes`` (n_items, L), ``codebooks`` (L, K, Dt)); required by
            "sid", "fusion" and "h2rec".
        item_embeddings: (n_items, Dt) text embeddings; required by ``hid_init="pca"`` and
            ``text_match``.
        cooccur: co-occurrence positives for H2Rec's item-level alignment (None: positives
            are the item itself and items sharing its SID tuple).
        popularity: (n_items + 1,) training popularity of each item (row 0: padding); required
            by ``hid_pop_gate``.

    Raises:
        ConfigError: a missing input the configuration needs.
        DataError: inputs whose shapes do not match ``n_items``.
    """
    if n_items < 1:
        raise DataError(f"n_items={n_items}: must be >= 1")
    if cfg.kind != "sid" and cfg.hid_init == "pca" and item_embeddings is None:
        raise ConfigError("model.hid_init='pca' needs item embeddings, got None")
    codes = codebooks = None
    if cfg.uses_sids:
        if sids is None:
            raise ConfigError(f"model.kind={cfg.kind!r} needs semantic IDs, got None")
        codes = np.asarray(sids.codes)
        codebooks = None if sids.codebooks is None else np.asarray(sids.codebooks)
        if codes.ndim != 2 or codes.shape[0] != n_items:
            raise DataError(
                f"codes: shape {codes.shape} does not match the dataset's n_items={n_items}"
            )
    if cooccur is not None and cooccur.n_items != n_items:
        raise DataError(f"cooccur: built for n_items={cooccur.n_items}, dataset has {n_items}")
    model: Recommender
    if cfg.kind == "sasrec":
        model = SASRec(cfg, n_items, item_embeddings)
    elif cfg.kind == "sid":
        assert codes is not None
        model = SidRec(cfg, codes, codebooks, item_embeddings)
    elif cfg.kind == "fusion":
        assert codes is not None
        model = FusionRec(cfg, n_items, codes, codebooks, item_embeddings)
    else:
        assert codes is not None
        model = H2Rec(cfg, n_items, codes, codebooks, item_embeddings, cooccur, popularity)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %s: %d items, %d parameters", cfg.kind, n_items, n_params)
    return model


__all__ = [
    "Backbone",
    "CooccurrencePositives",
    "CrossAttention",
    "FusionRec",
    "H2Rec",
    "HidEmbedding",
    "LevelCrossAttention",
    "LevelGate",
    "ModelConfig",
    "Recommender",
    "SASRec",
    "SequenceInput",
    "SidEmbedding",
    "SidRec",
    "attention_mask",
    "build_model",
    "pca_scores",
    "tuple_groups",
]
