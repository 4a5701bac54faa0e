"""Text match: a dense item-text similarity term in every score.

Semantic IDs quantise an item's text embedding into a few codes; the fine similarity between two
items' texts (same brand, same product line) is lost in the quantisation, and it is what tells
which rare item a user buys next. On Amazon Beauty (validation, full ranking) scoring items by
their text similarity alone to the user's recent items reaches NDCG@10 0.039 on tail items, more
than SASRec (0.037), where the codes' prefix overlap gives 0.021.

The term adds to a model's score of item i at position t

    w_t * <q_t, e_i>,   q_t = sum_{s <= t} exp(-decay * (t - s)) * e_{x_s},
    w_t = softplus(b + <a, h_t>),

with e the frozen, L2-normalised text embeddings (row 0, padding, zero), h_t the model's state
at t, and a (D,), b learned (a starts at zero, b at softplus^-1(init)). q_t reads positions up to
t only, so it is causal whatever ``model.causal`` says. It is exposed as extra columns of the
user state and of the item vectors, [h_t ; w_t q_t] . [v_i ; e_i], so that every loss, the
evaluation, the top-K export and the serving path score it without knowing of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h2rec.errors import ConfigError, DataError


class TextMatch(nn.Module):
    """The text-match term of a model whose states are ``hidden`` wide (see the module doc).

    ``text`` (n_items + 1, Dt) is a buffer saved with the model: a checkpoint scores exactly as
    it was trained even if the embeddings file changes afterwards. With ``learned=False`` (the
    text blend of h2rec.blend) w_t is the constant ``weight``, nothing is trained and nothing
    is added to the model's state_dict.
    """

    text: Tensor  # (N + 1, Dt) buffer

    def __init__(
        self, hidden: int, item_embeddings: np.ndarray | None, n_items: int, decay: float,
        init: float, learned: bool = True, weight: float | None = None,
    ) -> None:
        super().__init__()
        if item_embeddings is None:
            raise ConfigError(
                "model.text_match needs item text embeddings: give data.embeddings or run "
                "'h2rec embed' on the dataset first"
            )
        emb = np.asarray(item_embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != n_items:
            raise DataError(
                f"item_embeddings: shape {emb.shape} does not match n_items={n_items} rows"
            )
        if not np.isfinite(emb).all():
            raise DataError("item_embeddings: contains NaN or inf")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        unit = np.where(norms > 0, emb / np.maximum(norms, 1e-12), 0.0)
        text = np.zeros((n_items + 1, emb.shape[1]), dtype=np.float32)
        text[1:] = unit
        self.register_buffer("text", torch.from_numpy(text), persistent=learned)
        self.decay = float(decay)
        self.learned = learned
        self.fixed = float(init if weight is None else weight)
        if learned:
            self.scale = nn.Parameter(torch.zeros(hidden))  # a: the state's say in the weight
            # b = softplus^-1(init) = init + log(1 - exp(-init)), stable for large init
            self.bias = nn.Parameter(torch.tensor(init + math.log(-math.expm1(-init))))

    @property
    def dim(self) -> int:
        """Dt: how many columns the term adds to states and item vectors."""
        return int(self.text.shape[1])

    def decay_matrix(self, t: int, device: torch.device) -> Tensor:
        """(T, T): exp(-decay * (t - s)) for s <= t, else 0."""
        pos = torch.arange(t, device=device, dtype=torch.float32)
        lag = pos[:, None] - pos[None, :]  # (T, T) t - s
        return torch.where(lag >= 0, torch.exp(-self.decay * lag.clamp(min=0)), 0.0)

    def profiles(self, seq: Tensor) -> Tensor:
        """seq (B, T) left-padded -> q (B, T, Dt): each position's decayed sum of text vectors."""
        e = self.text[seq]  # (B, T, Dt); padding rows are zero
        return torch.einsum("ts,bsd->btd", self.decay_matrix(seq.shape[1], seq.device), e)

    def last_profile(self, seq: Tensor) -> Tensor:
        """seq (B, T) -> q at the last position (B, Dt)."""
        w = self.decay_matrix(seq.shape[1], seq.device)[-1]  # (T,)
        return torch.einsum("s,bsd->bd", w, self.text[seq])

    def weight(self, states: Tensor) -> Tensor:
        """states (..., D) -> w (..., 1) > 0 (``learned=False``: the constant weight)."""
        if not self.learned:
            return states.new_full((*states.shape[:-1], 1), self.fixed)
        return F.softplus(self.bias + states @ self.scale)[..., None]

    def user_columns(self, states: Tensor, seq: Tensor) -> Tensor:
        """states (B, T, D) (all positions) or (B, D) (the last), with seq (B, T) ->
        [states ; w q] (..., D + Dt)."""
        q = self.profiles(seq) if states.dim() == 3 else self.last_profile(seq)
        return torch.cat([states, self.weight(states) * q.to(states.dtype)], dim=-1)

    def item_columns(self, vectors: Tensor, items: Tensor) -> Tensor:
        """vectors (..., D) of items (...) -> [vectors ; e] (..., D + Dt)."""
        return torch.cat([vectors, self.text[items].to(vectors.dtype)], dim=-1)

    def all_item_columns(self, vectors: Tensor) -> Tensor:
        """vectors (N + 1, D) of every item -> [vectors ; e] (N + 1, D + Dt)."""
        return torch.cat([vectors, self.text.to(vectors.dtype)], dim=-1)
