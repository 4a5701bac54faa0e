"""Naive fusion baseline: an item is its hash-ID vector plus its SID vector, in one backbone."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from h2rec.models.backbone import SingleStream
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding, SidEmbedding


class FusionRec(SingleStream):
    """SASRec whose item vector is ``HID(item) + SID(item)`` (both D = cfg.hidden wide).

    The simplest way to give an ID model semantic IDs: one table lookup more per item, one
    backbone, the same fused vectors on the input and the output side. It is the baseline that
    H2Rec's two branches, cross-attentions, gate and alignment losses have to beat.
    ``aux_losses`` is empty.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_items: int,
        codes: np.ndarray,
        codebooks: np.ndarray | None = None,
        item_embeddings: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.out_dim = cfg.hidden
        self.hid = HidEmbedding(n_items, cfg.hidden, cfg.init_std, cfg.hid_init, item_embeddings)
        self.sid = SidEmbedding.from_config(cfg, codes, codebooks)
        self._build_stream(n_items, item_embeddings)

    def base_item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D); zero for item 0."""
        return self.hid(items) + self.sid(items)

    def base_all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        items = torch.arange(self.n_items + 1, device=self.sid.codes.device)
        return self.hid.weight + self.sid(items)
