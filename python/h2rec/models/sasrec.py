"""SASRec: the hash-ID-only baseline (one embedding per item, causal transformer)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from h2rec.models.backbone import SingleStream
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding


class SASRec(SingleStream):
    """Hash-ID sequential recommender; user state and item vectors are D = cfg.hidden wide.

    Input and output item embeddings are shared (as in SASRec). ``aux_losses`` is empty.
    """

    def __init__(
        self, cfg: ModelConfig, n_items: int, item_embeddings: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = n_items
        self.out_dim = cfg.hidden
        self.hid = HidEmbedding(n_items, cfg.hidden, cfg.init_std, cfg.hid_init, item_embeddings)
        self._build_stream(n_items, item_embeddings)

    def base_item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D)."""
        return self.hid(items)

    def base_all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        return self.hid.weight
