"""SID-only baseline: an item is the mean (or sum) of the embeddings of its L codes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from h2rec.models.backbone import Backbone, SequenceInput, attention_mask
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import SidEmbedding


class SidRec(nn.Module):
    """Semantic-ID-only sequential recommender; states and item vectors are D = cfg.hidden wide.

    Items sharing their full code tuple share one vector (use the "dedup" collision policy to
    tell them apart). ``aux_losses`` is empty.
    """

    def __init__(
        self, cfg: ModelConfig, codes: np.ndarray, codebooks: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_items = int(np.asarray(codes).shape[0])
        self.out_dim = cfg.hidden
        self.sid = SidEmbedding(
            codes,
            cfg.hidden,
            codebooks,
            init=cfg.sid_init,
            trainable=cfg.codebooks_trainable,
            pooling=cfg.sid_pooling,
            init_std=cfg.init_std,
        )
        self.input = SequenceInput(cfg.hidden, cfg.max_len, cfg.dropout, cfg.init_std)
        self.backbone = Backbone(cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.ffn_mult)

    def forward(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded item ids -> user states (B, T, D), zero at padding."""
        real = seq > 0  # (B, T)
        allowed = attention_mask(real, self.cfg.causal)  # (B, 1, T, T)
        x = self.input(self.sid(seq), real)  # (B, T, D)
        return self.backbone(x, real, allowed)

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D); zero for item 0."""
        return self.sid(items)

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        return self.sid(torch.arange(self.n_items + 1, device=self.sid.codes.device))

    def aux_losses(
        self,
        seq: Tensor,
        states: Tensor,
        pos_items: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """No auxiliary losses for the SID-only model."""
        return {}
