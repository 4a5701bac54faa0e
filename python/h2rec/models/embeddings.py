"""Item embedding tables: hash-ID (HID) table, with optional PCA init, and semantic-ID (SID) tables.

Item ids are 1..n_items with 0 = padding; per-item input arrays have n_items rows (row r is item
r+1) and the tables here prepend the padding row themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from h2rec.errors import ConfigError, DataError
from h2rec.models.config import ModelConfig


def pca_scores(x: np.ndarray, dim: int) -> np.ndarray:
    """Principal-component scores of the rows of ``x`` on its top ``dim`` components.

    Args:
        x: (N, Dt) float array.
        dim: number of components, at most min(N, Dt).

    Returns:
        (N, dim) float64: centred ``x`` times the top right-singular vectors. The sign of each
        component is fixed so that its largest-magnitude loading is positive.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"item_embeddings: expected a 2-D array, got shape {x.shape}")
    if dim > min(x.shape):
        raise ConfigError(
            f"model.hid_init='pca': hidden={dim} exceeds min(n_items, embedding dim)="
            f"{min(x.shape)} of item_embeddings with shape {x.shape}"
        )
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:dim]  # (dim, Dt)
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return centred @ (comps * signs[:, None]).T  # (N, dim)


def _check_embeddings(item_embeddings: np.ndarray, n_items: int) -> np.ndarray:
    emb = np.asarray(item_embeddings)
    if emb.ndim != 2 or emb.shape[0] != n_items:
        raise DataError(
            f"item_embeddings: shape {emb.shape} does not match n_items={n_items} rows"
        )
    if not np.isfinite(emb).all():
        raise DataError("item_embeddings: contains NaN or inf")
    return emb


class HidEmbedding(nn.Module):
    """Hash-ID table (n_items + 1, D); row 0 is padding and stays zero.

    ``init="pca"`` fills rows 1.. with the PCA scores of ``item_embeddings`` (n_items, Dt),
    rescaled by one scalar so that the table's std equals ``init_std``.
    """

    def __init__(
        self,
        n_items: int,
        hidden: int,
        init_std: float,
        init: str = "random",
        item_embeddings: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.table = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        with torch.no_grad():
            if init == "pca":
                if item_embeddings is None:
                    raise ConfigError("model.hid_init='pca' needs item_embeddings, got None")
                emb = _check_embeddings(item_embeddings, n_items)
                scores = pca_scores(emb, hidden)
                std = scores.std()
                scores = scores * (init_std / std) if std > 0 else scores
                self.table.weight[1:] = torch.from_numpy(scores).to(self.table.weight.dtype)
            elif init == "random":
                nn.init.normal_(self.table.weight, std=init_std)
            else:
                raise ConfigError(f"model.hid_init={init!r}: must be 'random' or 'pca'")
            self.table.weight[0].zero_()

    @property
    def weight(self) -> Tensor:
        """(n_items + 1, D) table; row 0 is padding."""
        return self.table.weight

    def forward(self, items: Tensor) -> Tensor:
        """items (...) -> (..., D); zero for item 0."""
        return self.table(items)


class _CodeBag(torch.autograd.Function):
    """``F.embedding_bag(idx, table, mode)`` (mean or sum of each row's L table rows), with a
    backward of L ``index_add_`` calls, one per level: PyTorch's dense embedding-bag backward
    sorts the indices first and took about 7 ms of every H2Rec step on Beauty (12k items x 3
    levels into a 768-row table), the per-level adds about 2.5. ``index_add_`` accumulates each
    destination row in index order, so the gradient has the same bits for any thread count."""

    @staticmethod
    def forward(ctx: Any, idx: Tensor, table: Tensor, mode: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx)
        ctx.rows, ctx.mode = table.shape[0], mode
        return F.embedding_bag(idx, table, mode=mode)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        g = grad.contiguous()
        if ctx.mode == "mean":
            g = g * (1.0 / idx.shape[1])
        out = g.new_zeros((ctx.rows, g.shape[1]))
        for lvl in range(idx.shape[1]):
            out.index_add_(0, idx[:, lvl], g)
        return None, out, None


class SidEmbedding(nn.Module):
    """Semantic-ID embeddings: per-level code tables through a learned projection.

    Level l's table has one row per code value; with k-means ``codebooks`` (L0, K, Dt) the first
    L0 levels start from the centroids (``init="centroids"``) and a shared bias-free
    ``Linear(Dt, D)`` maps them to the model width. Levels beyond L0 (the "dedup" level) and
    ``init="random"`` start from a normal draw of the centroids' std. Without codebooks the
    tables are D wide and there is no projection. ``trainable=False`` freezes the tables.

    Item 0 (padding) embeds to zero at every level.
    """

    codes: Tensor  # (N+1, L) buffer, row 0 = padding
    offsets: Tensor  # (L,) buffer, start of each level in ``table``

    def __init__(
        self,
        codes: np.ndarray,
        hidden: int,
        codebooks: np.ndarray | None = None,
        init: str = "centroids",
        trainable: bool = True,
        pooling: str = "mean",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] < 1 or not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"codes: expected an integer (n_items, L) array, got {codes.dtype} "
                            f"{codes.shape}")
        n_items, n_levels = codes.shape
        if n_items > 0 and codes.min() < 0:
            raise DataError(f"codes: negative code {int(codes.min())}")
        sizes = [int(codes[:, lvl].max()) + 1 if n_items else 1 for lvl in range(n_levels)]
        n_centroid_levels = 0
        if codebooks is not None:
            codebooks = np.asarray(codebooks, dtype=np.float32)
            if codebooks.ndim != 3 or codebooks.shape[0] > n_levels:
                raise DataError(
                    f"codebooks: shape {codebooks.shape} does not fit codes with {n_levels} levels"
                )
            n_centroid_levels, k, d_raw = codebooks.shape
            for lvl in range(n_centroid_levels):
                if sizes[lvl] > k:
                    raise DataError(
                        f"codes[:, {lvl}]: value {sizes[lvl] - 1} >= codebook_size={k}"
                    )
                sizes[lvl] = k
            ref_std = float(codebooks.std()) or init_std
        else:
            d_raw = hidden
            ref_std = init_std
        if pooling not in ("mean", "sum"):
            raise ConfigError(f"model.sid_pooling={pooling!r}: must be 'mean' or 'sum'")
        self.pooling = pooling
        self.n_levels = n_levels
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        padded = np.zeros((n_items + 1, n_levels), dtype=np.int64)
        padded[1:] = codes
        self.register_buffer("codes", torch.from_numpy(padded))  # (N+1, L)
        self.register_buffer("offsets", torch.from_numpy(offsets))  # (L,)
        table = torch.empty(int(sum(sizes)), d_raw)
        nn.init.normal_(table, std=ref_std)
        if codebooks is not None and init == "centroids":
            for lvl in range(n_centroid_levels):
                start = int(offsets[lvl])
                table[start : start + sizes[lvl]] = torch.from_numpy(codebooks[lvl])
        elif init not in ("centroids", "random"):
            raise ConfigError(f"model.sid_init={init!r}: must be 'centroids' or 'random'")
        self.table = nn.Parameter(table, requires_grad=trainable)  # (sum K_l, Dt)
        self.proj: nn.Module = (
            nn.Linear(d_raw, hidden, bias=False) if codebooks is not None else nn.Identity()
        )

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0]) - 1

    def levels(self, items: Tensor) -> Tensor:
        """items (...) -> per-level code embeddings (..., L, D); zero for item 0."""
        table = self.proj(self.table)  # (sum K_l, D)
        idx = self.codes[items] + self.offsets  # (..., L)
        out = F.embedding(idx, table)  # (..., L, D); a cheaper backward than table[idx]
        return out * (items > 0)[..., None, None].to(out.dtype)

    def pool(self, levels: Tensor) -> Tensor:
        """(..., L, D) -> (..., D) by the configured mean or sum over levels."""
        return levels.mean(dim=-2) if self.pooling == "mean" else levels.sum(dim=-2)

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, codes: np.ndarray, codebooks: np.ndarray | None = None
    ) -> SidEmbedding:
        """The SID embedding a model configuration asks for (width, init, pooling, freezing)."""
        return cls(
            codes,
            cfg.hidden,
            codebooks,
            init=cfg.sid_init,
            trainable=cfg.codebooks_trainable,
            pooling=cfg.sid_pooling,
            init_std=cfg.init_std,
        )

    def forward(self, items: Tensor) -> Tensor:
        """items (...) -> fused SID item embedding (..., D); zero for item 0.

        Equal to ``pool(levels(items))``, computed as one embedding bag per item."""
        table = self.proj(self.table)  # (sum K_l, D)
        idx = (self.codes[items] + self.offsets).reshape(-1, self.n_levels)  # (M, L)
        if table.device.type == "cpu":  # elsewhere index_add_ is atomic: order not fixed
            out = _CodeBag.apply(idx, table, self.pooling)  # (M, D)
        else:
            out = F.embedding_bag(idx, table, mode=self.pooling)
        out = out.view(*items.shape, -1)
        return out * (items > 0)[..., None].to(out.dtype)
