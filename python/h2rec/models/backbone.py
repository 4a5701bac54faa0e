"""The SASRec transformer shared by every model, and the attention pieces it is built from.

Sequences are LEFT-padded with item 0: the last real item of every row sits at position T-1.
Positions are counted from the end of the row (the last slot has position 0), so adding more left
padding changes nothing at real positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h2rec import _core
from h2rec.errors import DataError
from h2rec.ops import grouped_linear, layer_norm, linear, softmax


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


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with a learned scale and shift (``nn.LayerNorm``'s
    parameters and state-dict names).

    With autograd the affine part is applied outside the fused kernel: the CPU kernel sums the
    scale and shift gradients over rows in per-thread chunks, so they change with the thread
    count, whereas autograd's broadcast reduction gives the same bits for any thread count.
    Without (evaluation), the fused kernel applies it (:func:`h2rec.ops.layer_norm`)."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``, with the CPU keep mask from the Rust core.

    PyTorch's CPU generator spends about 10 ns on each random element, and dropout runs a dozen
    times per H2Rec step (on attention weights too): it was a sixth of an H2Rec step. On CPU the
    mask comes from :func:`h2rec._core.dropout_mask`, a counter-based hash of one seed drawn
    from the global torch generator per call, so a seeded run is reproducible whatever the
    thread count and a resumed one continues exactly. The drop probability is quantised to
    2**-16 and kept elements are scaled by the inverse of the quantised keep probability. On other
    devices it is ``F.dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p}: must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        seed = int(torch.randint(0, 2**62, (1,)))
        mask = _core.dropout_mask(x.numel(), self.p, seed)
        return x * torch.from_numpy(mask).view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, drop: nn.Module) -> Tensor:
    """Scaled dot-product attention: q (..., H, T, d), k and v (..., H, S, d), allowed
    (..., 1, T, S) (broadcast over the leading dimensions).

    On CPU it is written out (scores, mask, softmax, dropout, weighted sum): PyTorch's fused
    CPU kernel accumulates the key and value gradients in per-thread blocks, so its results
    change with the thread count, and with short sequences the plain form is no slower. On GPU
    the fused kernel runs."""
    if q.device.type != "cpu":
        p = float(getattr(drop, "p", 0.0)) if drop.training else 0.0
        return fused_attention(q, k, v, allowed, p)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (N, H, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return drop(softmax(scores)) @ v  # (N, H, T, d)


def attend_scaled(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Softmax attention without dropout, logits scaled by ``scale``: q (..., T, E), k (..., S,
    E), v (..., S, F), allowed (..., T, S), broadcast over the leading dimensions -> (..., T, F).
    Written out on the CPU (as :func:`attend`), the fused kernel elsewhere."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    scores = (q @ k.transpose(-2, -1)) * scale
    return softmax(scores.masked_fill(~allowed, float("-inf"))) @ v


def fused_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` (what :func:`attend` runs off the CPU) on inputs with
    any number of leading dimensions: its fused kernels take 4-D inputs only, so the leading
    dimensions are folded into one (the mask expanded to match) and unfolded after."""
    lead = q.shape[:-3]
    if len(lead) <= 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
    mask = allowed.expand(*lead, *allowed.shape[-3:]).reshape(-1, *allowed.shape[-3:])
    y = F.scaled_dot_product_attention(
        q.reshape(-1, *q.shape[-3:]), k.reshape(-1, *k.shape[-3:]),
        v.reshape(-1, *v.shape[-3:]), attn_mask=mask, dropout_p=p,
    )
    return y.view(*lead, *y.shape[-3:])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose inference products run on the
    Rust core (:func:`h2rec.ops.linear`): off autograd on the CPU, about 2.3 x MKL's."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate query and key/value inputs."""

    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q = Linear(hidden, hidden)
        self.k = Linear(hidden, hidden)
        self.v = Linear(hidden, hidden)
        self.out = Linear(hidden, hidden)
        self.attn_drop = Dropout(dropout)  # on the attention weights

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor) -> Tensor:
        """query (B, T, D), key_value (B, S, D), allowed (B, 1, T, S) bool -> (B, T, D).

        In eval mode with one head, or one query position, it runs :meth:`folded`: the same
        function with the key and value projections folded into the query and output ones."""
        b, t, d = query.shape
        h = self.n_heads
        if not self.training and (h == 1 or t == 1):
            return self.folded(query, key_value, allowed)
        s = key_value.shape[1]
        q = self.q(query).view(b, t, h, d // h).transpose(1, 2)  # (B, H, T, D/H)
        k = self.k(key_value).view(b, s, h, d // h).transpose(1, 2)  # (B, H, S, D/H)
        v = self.v(key_value).view(b, s, h, d // h).transpose(1, 2)  # (B, H, S, D/H)
        y = attend(q, k, v, allowed, self.attn_drop)  # (B, H, T, D/H)
        y = y.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.out(y)

    def folded(self, query: Tensor, key_value: Tensor, allowed: Tensor) -> Tensor:
        """:meth:`forward` without dropout, with no key or value projection of the S keys.

        Head h's logits are q_h k_h^T = (q_h W_k,h) x^T + q_h . b_k,h, where x is key_value, and
        the second term is the same for every key of a query: the softmax drops it. Its rows
        sum to 1, so the output sum_h (p_h (x W_v,h^T + b_v,h)) W_o,h^T + b_o is
        sum_h (p_h x) (W_o,h W_v,h)^T + (W_o b_v + b_o). Each query costs H D^2 (instead of
        D^2) in both projections and reads D-wide keys (instead of D/H): it pays with one head
        (half the projections of every position) or one query (evaluation's last block, which
        then projects none of the keys). Equal to :meth:`forward` up to float rounding."""
        b, t, d = query.shape
        h = self.n_heads
        dh = d // h
        wk = self.k.weight.view(h, dh, d)
        a = torch.einsum("hji,hjk->ihk", self.q.weight.view(h, dh, d), wk).reshape(d, h * d)
        ba = torch.einsum("hj,hjk->hk", self.q.bias.view(h, dh), wk).reshape(h * d)
        q = linear(query, a.T, ba).view(b, t, h, d).transpose(1, 2)
        x = key_value[:, None]  # (B, 1, S, D), every head's keys and values
        if h > 1 and x.device.type != "cpu":  # the fused kernels take no broadcast heads
            x = x.expand(b, h, *key_value.shape[1:])
        z = attend_scaled(q, x, x, allowed, 1.0 / math.sqrt(dh))  # (B, H, T, D)
        c = torch.einsum(
            "ohj,hji->ohi", self.out.weight.view(d, h, dh), self.v.weight.view(h, dh, d)
        ).reshape(d, h * d)
        cb = torch.addmv(self.out.bias, self.out.weight, self.v.bias)
        return linear(z.transpose(1, 2).reshape(b, t, h * d), c, cb)


class FeedForward(nn.Module):
    """Point-wise feed-forward net: Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, hidden: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Linear(hidden, mult * hidden),
            nn.GELU(),
            Dropout(dropout),
            Linear(mult * hidden, hidden),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + FFN(LN(x)); padding zeroed."""

    def __init__(self, hidden: int, n_heads: int, dropout: float, ffn_mult: int) -> None:
        super().__init__()
        self.ln_attn = LayerNorm(hidden)
        self.attn = MultiHeadAttention(hidden, n_heads, dropout)
        self.ln_ffn = LayerNorm(hidden)
        self.ffn = FeedForward(hidden, ffn_mult, dropout)
        self.drop = Dropout(dropout)

    def forward(
        self, x: Tensor, real: Tensor, allowed: Tensor, last_only: bool = False
    ) -> Tensor:
        """x (B, T, D), real (B, T) bool, allowed (B, 1, T, T) -> (B, T, D).

        ``last_only``: compute the output at position T-1 only, (B, 1, D): its query still reads
        every key, so the value equals ``forward(...)[:, -1:]``."""
        h = self.ln_attn(x)
        if last_only:
            x, real, q, allowed = x[:, -1:], real[:, -1:], h[:, -1:], allowed[:, :, -1:]
        else:
            q = h
        x = x + self.drop(self.attn(q, h, allowed))
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x * real[..., None]


class CrossAttention(nn.Module):
    """Pre-LN cross-attention with a residual: q + Dropout(Attn(LN(q), LN(kv))); padding zeroed.

    Query position t reads key/value positions allowed by the mask (s <= t when causal, real
    items only), so it is exactly as causal and padding-safe as the backbone's self-attention.
    """

    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q = LayerNorm(hidden)
        self.ln_kv = LayerNorm(hidden)
        self.attn = MultiHeadAttention(hidden, n_heads, dropout)
        self.drop = Dropout(dropout)

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
        self.drop = Dropout(dropout)

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
        self.ln_final = LayerNorm(hidden)

    def forward(
        self, x: Tensor, real: Tensor, allowed: Tensor, last_only: bool = False
    ) -> Tensor:
        """x (B, T, D), real (B, T) bool, allowed (B, 1, T, T) bool -> (B, T, D).

        ``last_only``: the state at position T-1 only, (B, D); the last block then computes a
        single query (earlier blocks still run at every position, which it reads)."""
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, real, allowed, last_only=last_only and i == n - 1)
        if last_only:
            return (self.ln_final(x) * real[:, -1:, None])[:, 0]
        return self.ln_final(x) * real[..., None]


class LevelCrossAttention(nn.Module):
    """L pre-LN cross-attentions, one per SID level, run as one batched call.

    Level l's queries are that level's stream and its keys/values the shared HID stream; each
    level has its own LayerNorms and projections (the same parameters as L ``CrossAttention``
    modules, stacked), and output l = q_l + Dropout(Attn_l(LN_l(q_l), LN'_l(kv))), zero at
    padding. :meth:`from_modules` copies L ``CrossAttention`` modules in.
    """

    def __init__(self, n_levels: int, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_levels, self.hidden, self.n_heads, self.dropout = n_levels, hidden, n_heads, dropout
        d = hidden

        def stack(*shape: int, fill: float | None = None) -> nn.Parameter:
            t = torch.empty(n_levels, *shape)
            if fill is not None:
                t.fill_(fill)
            return nn.Parameter(t)

        self.ln_q_weight, self.ln_q_bias = stack(d, fill=1.0), stack(d, fill=0.0)
        self.ln_kv_weight, self.ln_kv_bias = stack(d, fill=1.0), stack(d, fill=0.0)
        self.weight = stack(4, d, d)  # (L, 4, out, in): q, k, v, out projections
        self.bias = stack(4, d)  # (L, 4, out)
        with torch.no_grad():  # nn.Linear's default init, per level and projection
            bound = 1.0 / math.sqrt(d)
            for lvl in range(n_levels):
                for j in range(4):
                    nn.init.kaiming_uniform_(self.weight[lvl, j], a=math.sqrt(5))
            nn.init.uniform_(self.bias, -bound, bound)
        self.drop = Dropout(dropout)
        self.attn_drop = Dropout(dropout)  # on the attention weights

    @classmethod
    def from_modules(cls, modules: list[CrossAttention]) -> LevelCrossAttention:
        """The batched equivalent of per-level ``CrossAttention`` modules (weights copied)."""
        first = modules[0]
        out = cls(len(modules), first.attn.q.in_features, first.attn.n_heads, first.attn.dropout)
        out.load_per_level([m.state_dict() for m in modules])
        return out

    def load_per_level(self, states: list[dict[str, Tensor]]) -> None:
        """Copy the state dicts of L ``CrossAttention`` modules into the stacked parameters."""
        with torch.no_grad():
            for lvl, st in enumerate(states):
                self.ln_q_weight[lvl] = st["ln_q.weight"]
                self.ln_q_bias[lvl] = st["ln_q.bias"]
                self.ln_kv_weight[lvl] = st["ln_kv.weight"]
                self.ln_kv_bias[lvl] = st["ln_kv.bias"]
                for j, name in enumerate(("q", "k", "v", "out")):
                    self.weight[lvl, j] = st[f"attn.{name}.weight"]
                    self.bias[lvl, j] = st[f"attn.{name}.bias"]

    def forward(self, levels: Tensor, kv: Tensor, real: Tensor, allowed: Tensor) -> Tensor:
        """levels (B, T, L, D), kv (B, T, D), real (B, T), allowed (B, 1, T, T) -> (B, T, L, D).

        The LayerNorm affines are folded into the projections that follow them
        ((LN(x) * g + c) W^T + e = LN(x) (W diag(g))^T + (W c + e)), so the keys and values of
        every level come from the one normalised HID stream in a single GEMM, and the per-level
        query and output projections run as one batched GEMM over the levels, level-major
        (L, B * T, D), with no per-level copies of the streams. In eval mode with one head it
        runs :meth:`folded`."""
        if not self.training and self.n_heads == 1:
            return self.folded(levels, kv, real, allowed)
        b, t, n_lv, d = levels.shape
        h = self.n_heads
        dh = d // h
        w, bias = self.weight, self.bias  # (L, 4, out, in), (L, 4, out)
        wq = w[:, 0] * self.ln_q_weight[:, None, :]  # (L, D, D)
        bq = torch.einsum("loi,li->lo", w[:, 0], self.ln_q_bias) + bias[:, 0]  # (L, D)
        wkv = w[:, 1:3] * self.ln_kv_weight[:, None, None, :]  # (L, 2, D, D): k, v
        bkv = torch.einsum("ljoi,li->ljo", w[:, 1:3], self.ln_kv_bias) + bias[:, 1:3]  # (L, 2, D)
        # keys and values of all levels: (B, T, D) @ (D, 2 L D), columns ordered (k|v, L, H, D/H)
        kvp = F.linear(
            F.layer_norm(kv, (d,)),
            wkv.transpose(0, 1).reshape(2 * n_lv * d, d),
            bkv.transpose(0, 1).reshape(2 * n_lv * d),
        ).view(b, t, 2, n_lv, h, dh)
        k = kvp[:, :, 0].permute(2, 0, 3, 1, 4)  # (L, B, H, T, D/H)
        v = kvp[:, :, 1].permute(2, 0, 3, 1, 4)
        qn = F.layer_norm(levels, (d,)).permute(2, 0, 1, 3).reshape(n_lv, b * t, d)
        q = torch.baddbmm(bq[:, None], qn, wq.transpose(1, 2))  # (L, B T, D)
        q = q.view(n_lv, b, t, h, dh).transpose(2, 3)  # (L, B, H, T, D/H)
        y = attend(q, k, v, allowed[None], self.attn_drop)  # (L, B, H, T, D/H)
        y = y.transpose(2, 3).reshape(n_lv, b * t, d)  # (L, B T, D)
        y = torch.baddbmm(bias[:, 3, None], y, w[:, 3].transpose(1, 2))  # (L, B T, D)
        y = y.view(n_lv, b, t, d).permute(1, 2, 0, 3)  # (B, T, L, D)
        return (levels + self.drop(y)) * real[:, :, None, None]

    def folded(self, levels: Tensor, kv: Tensor, real: Tensor, allowed: Tensor) -> Tensor:
        """:meth:`forward` with one head and no dropout, the key and value projections folded
        into the query and output ones (as :meth:`MultiHeadAttention.folded`): every level's
        queries read the one normalised HID stream as keys and values, so the HID stream is
        not projected at all, and the levels' attentions run as one batched product per user.
        Equal to :meth:`forward` up to float rounding."""
        b, t, n_lv, d = levels.shape
        w, bias = self.weight, self.bias  # (L, 4, out, in), (L, 4, out)
        wq = w[:, 0] * self.ln_q_weight[:, None, :]  # (L, D, D)
        bq = torch.einsum("loi,li->lo", w[:, 0], self.ln_q_bias) + bias[:, 0]  # (L, D)
        wk = w[:, 1] * self.ln_kv_weight[:, None, :]  # (L, D, D)
        wv = w[:, 2] * self.ln_kv_weight[:, None, :]
        bv = torch.einsum("loi,li->lo", w[:, 2], self.ln_kv_bias) + bias[:, 2]  # (L, D)
        a = wq.transpose(1, 2) @ wk  # (L, D, D): a query's logits are (x W_q^T + b_q) W_k . k
        ba = (bq[:, None, :] @ wk)[:, 0]  # (L, D)
        c = w[:, 3] @ wv  # (L, D, D): the output is (p k) (W_o W_v)^T + W_o b_v + b_o
        cb = (w[:, 3] @ bv[:, :, None])[:, :, 0] + bias[:, 3]  # (L, D)
        keys = layer_norm(kv)  # (B, T, D)
        qn = layer_norm(levels).permute(2, 0, 1, 3).reshape(n_lv, b * t, d)
        q = grouped_linear(qn, a.transpose(1, 2), ba)  # (L, B T, D)
        q = q.view(n_lv, b, t, d).transpose(0, 1).reshape(b, n_lv * t, d)  # (B, L T, D)
        scores = torch.bmm(q, keys.transpose(1, 2)).view(b, n_lv, t, t) * (1.0 / math.sqrt(d))
        p = softmax(scores.masked_fill(~allowed, float("-inf")))  # (B, L, T, T)
        z = torch.bmm(p.view(b, n_lv * t, t), keys)  # (B, L T, D)
        z = z.view(b, n_lv, t, d).transpose(0, 1).reshape(n_lv, b * t, d)  # (L, B T, D)
        y = grouped_linear(z, c, cb)  # (L, B T, D)
        y = y.view(n_lv, b, t, d).permute(1, 2, 0, 3)  # (B, T, L, D)
        return (levels + y) * real[:, :, None, None]


class SingleStream(nn.Module):
    """Base of the one-backbone recommenders (SASRec, SID-only, fusion): a subclass sets
    ``cfg`` and its item table(s) and defines ``base_item_vectors`` / ``base_all_item_vectors``;
    the input stream is the items' vectors, the user state the backbone's output, and there are
    no auxiliary losses. With ``model.text_match`` (``_build_stream`` gets the embeddings) states
    and item vectors carry the text-match columns as well (h2rec.models.text_match)."""

    cfg: Any
    text_match: Any  # TextMatch or None

    def _build_stream(self, n_items: int = 0, item_embeddings: Any = None) -> None:
        """Add the position/dropout input, the backbone and the text match ``self.cfg`` asks
        for (the latter from ``item_embeddings`` (n_items, Dt))."""
        from h2rec.models.text_match import TextMatch

        cfg = self.cfg
        self.input = SequenceInput(cfg.hidden, cfg.max_len, cfg.dropout, cfg.init_std)
        self.backbone = Backbone(cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.dropout, cfg.ffn_mult)
        self.text_match = None
        if cfg.text_match:
            self.text_match = TextMatch(
                cfg.hidden, item_embeddings, n_items, cfg.text_match_decay, cfg.text_match_init
            )
            self.out_dim = cfg.hidden + self.text_match.dim

    def base_item_vectors(self, items: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def base_all_item_vectors(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> what scores them (..., E): the table vectors, with the text columns."""
        v = self.base_item_vectors(items)
        return v if self.text_match is None else self.text_match.item_columns(v, items)

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, E); row 0 (padding) is zero."""
        v = self.base_all_item_vectors()
        return v if self.text_match is None else self.text_match.all_item_columns(v)

    def forward(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded item ids -> user states (B, T, E), zero at padding."""
        real = seq > 0  # (B, T)
        allowed = attention_mask(real, self.cfg.causal)  # (B, 1, T, T)
        x = self.input(self.base_item_vectors(seq), real)  # (B, T, D)
        states = self.backbone(x, real, allowed)
        return states if self.text_match is None else self.text_match.user_columns(states, seq)

    def user_states(self, seq: Tensor) -> Tensor:
        """seq (B, T) -> each user's state (B, E): ``forward(seq)[:, -1]``, with the last block
        computing the last position only (what evaluation and serving read)."""
        real = seq > 0
        allowed = attention_mask(real, self.cfg.causal)
        x = self.input(self.base_item_vectors(seq), real)
        states = self.backbone(x, real, allowed, last_only=True)
        return states if self.text_match is None else self.text_match.user_columns(states, seq)

    def aux_losses(
        self,
        seq: Tensor,
        states: Tensor,
        pos_items: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """No auxiliary losses."""
        return {}
