"""SASRec: the hash-ID-only baseline (one embedding per item, causal transformer)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from h2rec.models.backbone import Backbone, SequenceInput, attention_mask
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding


class SASRec(nn.Module):
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
        self.input = SequenceInput(cfg.hidden, cfg.max_len, cfg.dropout, cfg.init_std)
        self.backbone = Backbone(cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.ffn_mult)

    def forward(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded item ids -> user states (B, T, D), zero at padding."""
        real = seq > 0  # (B, T)
        allowed = attention_mask(real, self.cfg.causal)  # (B, 1, T, T)
        x = self.input(self.hid(seq), real)  # (B, T, D)
        return self.backbone(x, real, allowed)

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D)."""
        return self.hid(items)

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        return self.hid.weight

    def aux_losses(
        self,
        seq: Tensor,
        states: Tensor,
        pos_items: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """No auxiliary losses for SASRec."""
        return {}
