"""SID-only baseline: an item is the mean (or sum) of the embeddings of its L codes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from h2rec.models.backbone import SingleStream
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import SidEmbedding


class SidRec(SingleStream):
    """Semantic-ID-only sequential recommender; states and item vectors are D = cfg.hidden wide.

    Items sharing their full code tuple share one vector (use the "dedup" collision policy to
    tell them apart). ``aux_losses`` is empty.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        codes: np.ndarray,
        codebooks: np.ndarray | None = None,
        item_embeddings: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = int(np.asarray(codes).shape[0])
        self.out_dim = cfg.hidden
        self.sid = SidEmbedding.from_config(cfg, codes, codebooks)
        self._build_stream(self.n_items, item_embeddings)

    def base_item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D); zero for item 0."""
        return self.sid(items)

    def base_all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        return self.sid(torch.arange(self.n_items + 1, device=self.sid.codes.device))
