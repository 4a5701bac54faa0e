"""The SASRec transformer shared by every model, and the attention pieces it is built from.

Sequences are LEFT-padded with item 0: the last real item of every row sits at position T-1.
Positions are counted from the end of the row (the last slot has position 0), so adding more left
padding changes nothing at real positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h2rec.errors import DataError


def attention_mask(real: Tensor, causal: bool) -> Tensor:
    """Which keys each query may attend to.

    Args:
        real: (B, T) bool, True at real (non-padding) key positions.
        causal: if True, query t sees keys s <= t only.

    Returns:
        (B, 1, T, T) bool, True where query t may attend to key s. A query that may attend to
        nothing (padding before the first real item under a causal mask) is allowed its own slot,
        so the softmax stays finite; its output is zeroed by the caller.
    """
    b, t = real.shape
    allowed = real[:, None, :].expand(b, t, t)  # (B, T, T) key is real
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=real.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=real.device)
    allowed = allowed | (eye & ~allowed.any(dim=-1, keepdim=True))
    return allowed[:, None]  # (B, 1, T, T)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate query and key/value inputs."""

    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor) -> Tensor:
        """query (B, T, D), key_value (B, S, D), allowed (B, 1, T, S) bool -> (B, T, D)."""
        b, t, d = query.shape
        s = key_value.shape[1]
        h = self.n_heads
        q = self.q(query).view(b, t, h, d // h).transpose(1, 2)  # (B, H, T, D/H)
        k = self.k(key_value).view(b, s, h, d // h).transpose(1, 2)  # (B, H, S, D/H)
        v = self.v(key_value).view(b, s, h, d // h).transpose(1, 2)  # (B, H, S, D/H)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.out(y)


class FeedForward(nn.Module):
    """Point-wise feed-forward net: Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, hidden: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, mult * hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mult * hidden, hidden),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)); padding zeroed."""

    def __init__(self, hidden: int, n_heads: int, dropout: float, ffn_mult: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(hidden)
        self.attn = MultiHeadAttention(hidden, n_heads, dropout)
        self.ln_ffn = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, ffn_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, real: Tensor, allowed: Tensor) -> Tensor:
        """x (B, T, D), real (B, T) bool, allowed (B, 1, T, T) -> (B, T, D)."""
        h = self.ln_attn(x)
        x = x + self.drop(self.attn(h, h, allowed))
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x * real[..., None]


class CrossAttention(nn.Module):
    """Pre-LN cross-attention with a residual: q + Dropout(Attn(LN(q), LN(kv))); padding zeroed.

    Query position t reads key/value positions allowed by the mask (s <= t when causal, real
    items only), so it is exactly as causal and padding-safe as the backbone's self-attention.
    """

    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(hidden)
        self.ln_kv = nn.LayerNorm(hidden)
        self.attn = MultiHeadAttention(hidden, n_heads, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, key_value: Tensor, real: Tensor, allowed: Tensor) -> Tensor:
        """query (B, T, D), key_value (B, T, D), real (B, T), allowed (B, 1, T, T) -> (B, T, D)."""
        y = self.attn(self.ln_q(query), self.ln_kv(key_value), allowed)
        return (query + self.drop(y)) * real[..., None]


class SequenceInput(nn.Module):
    """Turns item embeddings into a stream: x * sqrt(D) + position, dropout, padding zeroed.

    Positions are learned and counted from the end of the row, so the last slot is position 0.
    Accepts extra middle dimensions: (B, T, D) or (B, T, L, D).
    """

    def __init__(self, hidden: int, max_len: int, dropout: float, init_std: float) -> None:
        super().__init__()
        self.max_len = max_len
        self.scale = math.sqrt(hidden)
        self.positions = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.positions.weight, std=init_std)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """x (B, T, ..., D), real (B, T) bool -> (B, T, ..., D)."""
        t = x.shape[1]
        if t > self.max_len:
            raise DataError(f"seq: length {t} > model.max_len={self.max_len}")
        idx = torch.arange(t - 1, -1, -1, device=x.device)  # (T,) distance from the end
        pos = self.positions(idx)  # (T, D)
        pos = pos.view(t, *([1] * (x.dim() - 3)), -1)  # (T, 1.., D)
        mask = real.view(*real.shape, *([1] * (x.dim() - 2))).to(x.dtype)  # (B, T, 1.., 1)
        return self.drop(x * self.scale + pos) * mask


class Backbone(nn.Module):
    """SASRec stack: pre-LN blocks (self-attention + point-wise FFN) and a final LayerNorm.

    Takes a prepared stream (see ``SequenceInput``) and returns states at every position,
    zero at padding.
    """

    def __init__(
        self, hidden: int, n_layers: int, n_heads: int, dropout: float, ffn_mult: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(hidden, n_heads, dropout, ffn_mult) for _ in range(n_layers)
        )
        self.ln_final = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, real: Tensor, allowed: Tensor) -> Tensor:
        """x (B, T, D), real (B, T) bool, allowed (B, 1, T, T) bool -> (B, T, D)."""
        for block in self.blocks:
            x = block(x, real, allowed)
        return self.ln_final(x) * real[..., None]
