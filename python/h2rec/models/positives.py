"""Positive pairs for the item-level alignment loss, stored sparse (CSR), never as N x N.

An item's positives are itself (weight 1), the items sharing its full SID tuple (weight 1) and
the items that co-occur with it within a window in TRAINING sequences, weighted by PPMI scaled
to [min_weight, max_weight] (mined in Rust by ``h2rec._core.cooccurrence``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from h2rec.errors import DataError

if TYPE_CHECKING:
    from h2rec._core import SequenceStore

logger = logging.getLogger(__name__)


def tuple_groups(codes: np.ndarray) -> np.ndarray:
    """Group id per item id 0..n_items: items with the same full code tuple share an id.

    Args:
        codes: (n_items, L) integer codes, row r = item r+1.

    Returns:
        (n_items + 1,) int64; entry 0 (padding) is -1, real items get 0..n_groups-1.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise DataError(f"codes: expected a 2-D (n_items, L) array, got shape {codes.shape}")
    groups = np.full(codes.shape[0] + 1, -1, dtype=np.int64)
    if codes.shape[0]:
        _, inverse = np.unique(codes, axis=0, return_inverse=True)
        groups[1:] = inverse.reshape(-1)
    return groups


class CooccurrencePositives:
    """Sparse per-item positives (CSR rows indexed by item id 0..n_items) plus SID tuple groups.

    Args:
        indptr: (n_items + 2,) int64 row offsets; row i holds item i's co-occurrence positives.
        indices: (nnz,) int64 positive item ids in 1..n_items.
        weights: (nnz,) float32 weights > 0 (PPMI scaled to [0.3, 1] by default).
        n_items: number of real items.
        codes: optional (n_items, L) SID codes; items sharing a full tuple become positives.
    """

    def __init__(
        self,
        indptr: np.ndarray | Tensor,
        indices: np.ndarray | Tensor,
        weights: np.ndarray | Tensor,
        n_items: int,
        codes: np.ndarray | None = None,
    ) -> None:
        ip = np.asarray(indptr, dtype=np.int64)
        ix = np.asarray(indices, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float32)
        if ip.shape != (n_items + 2,):
            raise DataError(
                f"indptr: shape {ip.shape}, expected ({n_items + 2},) for n_items={n_items}"
            )
        if ip[0] != 0 or (np.diff(ip) < 0).any() or ip[-1] != ix.shape[0]:
            raise DataError(
                f"indptr: must start at 0, not decrease and end at len(indices)={ix.shape[0]}"
            )
        if ix.shape != w.shape or ix.ndim != 1:
            raise DataError(f"indices {ix.shape} and weights {w.shape}: expected equal 1-D shapes")
        if ix.size and (ix.min() < 1 or ix.max() > n_items):
            bad = int(np.flatnonzero((ix < 1) | (ix > n_items))[0])
            raise DataError(f"indices[{bad}]={int(ix[bad])}: outside 1..n_items={n_items}")
        if w.size and not (np.isfinite(w).all() and (w > 0).all()):
            bad = int(np.flatnonzero(~(np.isfinite(w) & (w > 0)))[0])
            raise DataError(f"weights[{bad}]={float(w[bad])}: must be finite and > 0")
        self.n_items = n_items
        self.indptr = torch.from_numpy(ip)
        self.indices = torch.from_numpy(ix)
        self.weights = torch.from_numpy(w)
        self.groups: Tensor | None = None
        if codes is not None:
            if np.asarray(codes).shape[0] != n_items:
                raise DataError(
                    f"codes: {np.asarray(codes).shape[0]} rows, expected n_items={n_items}"
                )
            self.groups = torch.from_numpy(tuple_groups(codes))

    @classmethod
    def from_store(
        cls,
        store: SequenceStore,
        codes: np.ndarray | None = None,
        window: int = 3,
        top_k: int = 50,
        min_weight: float = 0.3,
        max_weight: float = 1.0,
        holdout: int = 2,
        n_threads: int | None = None,
    ) -> CooccurrencePositives:
        """Mine PPMI co-occurrence positives from the training prefixes of ``store``.

        ``holdout=2`` leaves each user's validation and test items out (leave-one-out).
        """
        from h2rec import _core

        indptr, indices, weights, _ = _core.cooccurrence(
            store,
            window=window,
            top_k=top_k,
            min_weight=min_weight,
            max_weight=max_weight,
            holdout=holdout,
            n_threads=n_threads,
        )
        logger.info(
            "co-occurrence positives: %d pairs over %d items (window=%d, top_k=%d)",
            len(indices), store.n_items, window, top_k,
        )
        return cls(indptr, indices, weights, store.n_items, codes)

    @classmethod
    def same_tuple_only(cls, codes: np.ndarray) -> CooccurrencePositives:
        """No co-occurrence pairs; positives are the items sharing a full SID tuple."""
        n_items = int(np.asarray(codes).shape[0])
        empty = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(n_items + 2, np.int64), empty, empty.astype(np.float32), n_items, codes)

    def with_codes(self, codes: np.ndarray) -> CooccurrencePositives:
        """A copy that also treats items sharing a full SID tuple as positives."""
        if np.asarray(codes).shape[0] != self.n_items:
            raise DataError(
                f"codes: {np.asarray(codes).shape[0]} rows, expected n_items={self.n_items}"
            )
        other = object.__new__(CooccurrencePositives)
        other.__dict__.update(self.__dict__)
        other.groups = torch.from_numpy(tuple_groups(codes)).to(self.device)
        return other

    @property
    def n_pairs(self) -> int:
        """Stored co-occurrence pairs."""
        return int(self.indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device: torch.device | str) -> CooccurrencePositives:
        """A copy whose tensors live on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        other = object.__new__(CooccurrencePositives)
        other.n_items = self.n_items
        other.indptr = self.indptr.to(device)
        other.indices = self.indices.to(device)
        other.weights = self.weights.to(device)
        other.groups = None if self.groups is None else self.groups.to(device)
        return other

    def batch_pairs(
        self, items: Tensor, use_cooccur: bool = True, use_same_tuple: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The non-zero entries of :meth:`batch_matrix` for distinct ``items``, without the
        (M, M) matrix.

        Args:
            items: (M,) distinct item ids in 1..n_items, on this object's device.

        Returns:
            rows (P,), cols (P,) int64 positions in ``items`` and their weights (P,) float32,
            one entry per non-zero (i, j) of ``batch_matrix(items)``, sorted by (row, col).
        """
        m = items.shape[0]
        dev = items.device
        pos = torch.arange(m, device=dev)
        rows, cols = [pos], [pos]
        vals = [torch.ones(m, dtype=torch.float32, device=dev)]
        if use_cooccur and self.n_pairs > 0 and m > 0:
            order = torch.argsort(items)
            uniq = items[order]  # (M,) sorted
            starts = self.indptr[items]  # (M,)
            counts = self.indptr[items + 1] - starts  # (M,)
            r = torch.repeat_interleave(pos, counts)  # (Q,)
            first = torch.cumsum(counts, 0) - counts
            flat = torch.arange(r.shape[0], device=dev)
            at = flat - first[r] + starts[r]  # (Q,) into indices / weights
            nbr = self.indices[at]
            k = torch.searchsorted(uniq, nbr).clamp(max=m - 1)
            hit = uniq[k] == nbr  # the neighbour is in the batch
            rows.append(r[hit])
            cols.append(order[k[hit]])
            vals.append(self.weights[at[hit]])
        if use_same_tuple and self.groups is not None and m > 0:
            g = self.groups[items]  # (M,)
            same = (g[:, None] == g[None, :]).nonzero()  # (S, 2), the diagonal included
            rows.append(same[:, 0])
            cols.append(same[:, 1])
            vals.append(torch.ones(same.shape[0], dtype=torch.float32, device=dev))
        key = torch.cat(rows) * m + torch.cat(cols)
        val = torch.cat(vals)
        uniq_key, inverse = torch.unique(key, sorted=True, return_inverse=True)
        best = torch.zeros(uniq_key.shape[0], dtype=torch.float32, device=dev)
        best = best.scatter_reduce(0, inverse, val, reduce="amax", include_self=False)
        return uniq_key // max(m, 1), uniq_key % max(m, 1), best

    def batch_matrix(
        self, items: Tensor, use_cooccur: bool = True, use_same_tuple: bool = True
    ) -> Tensor:
        """Positive weights among a batch of items, built from the sparse rows only.

        Args:
            items: (M,) item ids in 1..n_items, on this object's device; repeats allowed.
            use_cooccur: include co-occurrence positives (their PPMI weight).
            use_same_tuple: include items with the same full SID tuple (weight 1).

        Returns:
            (M, M) float32: entry (i, j) is the weight of items[j] as a positive of items[i]:
            1 when items[i] == items[j] or (use_same_tuple and their tuples match), else the
            co-occurrence weight of items[j] in row items[i] (if use_cooccur), else 0.
        """
        uniq, inverse = torch.unique(items, sorted=True, return_inverse=True)  # (U,), (M,)
        u = uniq.shape[0]
        w = torch.eye(u, dtype=torch.float32, device=items.device)  # (U, U)
        if use_cooccur and self.n_pairs > 0 and u > 0:
            starts = self.indptr[uniq]  # (U,)
            counts = self.indptr[uniq + 1] - starts  # (U,)
            rows = torch.repeat_interleave(torch.arange(u, device=items.device), counts)  # (P,)
            first = torch.cumsum(counts, 0) - counts  # (U,) where each row begins in the flat list
            flat = torch.arange(rows.shape[0], device=items.device)
            pos = flat - first[rows] + starts[rows]  # (P,) index into indices/weights
            nbr = self.indices[pos]  # (P,)
            col = torch.searchsorted(uniq, nbr).clamp(max=u - 1)  # (P,)
            hit = uniq[col] == nbr  # neighbour is in the batch
            rows, col, vals = rows[hit], col[hit], self.weights[pos][hit]
            w = w.flatten().scatter_reduce(0, rows * u + col, vals, reduce="amax").view(u, u)
        if use_same_tuple and self.groups is not None:
            g = self.groups[uniq]  # (U,)
            w = torch.maximum(w, (g[:, None] == g[None, :]).to(w.dtype))
        return w[inverse][:, inverse]  # (M, M)
