"""Naive fusion baseline: an item is its hash-ID vector plus its SID vector, in one backbone."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from h2rec.models.backbone import Backbone, SequenceInput, attention_mask
from h2rec.models.config import ModelConfig
from h2rec.models.embeddings import HidEmbedding, SidEmbedding


class FusionRec(nn.Module):
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
        x = self.input(self.item_vectors(seq), real)  # (B, T, D)
        return self.backbone(x, real, allowed)

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D); zero for item 0."""
        return self.hid(items) + self.sid(items)

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, D); row 0 (padding) is zero."""
        return self.hid.weight + self.sid(torch.arange(self.n_items + 1, device=self.sid.codes.device))

    def aux_losses(
        self,
        seq: Tensor,
        states: Tensor,
        pos_items: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """No auxiliary losses for the fusion baseline."""
        return {}
