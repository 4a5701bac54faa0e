"""One training step: the loss a run trains with, its negatives, and how a batch's loss is scaled.

``loss_plan`` resolves ``train.loss`` ("auto": full softmax up to ``full_softmax_max_items``
items, sampled softmax with shared popularity negatives beyond); ``SharedNegatives`` draws the
negatives a whole batch shares; ``TrainStep`` is the model plus its whole loss in one ``forward``
(what DDP synchronises), scaled per position over the epoch (``train.loss_scale="epoch"``,
with ``positions_per_batch``) or averaged per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from h2rec import _core
from h2rec.config import RunConfig
from h2rec.errors import ConfigError

if TYPE_CHECKING:
    from h2rec.models import Recommender


# loss="auto" beyond full_softmax_max_items: this many popularity negatives shared per batch
AUTO_SHARED_NEGATIVES = 4096


@dataclass(frozen=True)
class LossPlan:
    """The recommendation loss a run trains with, once ``train.loss="auto"`` is resolved."""

    kind: str  # "bce", "sampled_softmax" or "softmax" (full)
    shared: int  # sampled_softmax: negatives shared by the batch; 0 = the sampler's per position
    popularity: bool  # shared negatives drawn by training popularity (logQ-corrected)


def loss_plan(cfg: RunConfig, n_items: int) -> LossPlan:
    """Resolve ``train.loss``: "auto" is full softmax for catalogues of at most
    ``train.full_softmax_max_items`` items, and sampled softmax with AUTO_SHARED_NEGATIVES (or
    ``train.shared_negatives``) popularity negatives, logQ-corrected, beyond."""
    t = cfg.train
    if t.loss == "auto":
        if n_items <= t.full_softmax_max_items:
            return LossPlan("softmax", 0, False)
        return LossPlan("sampled_softmax", t.shared_negatives or AUTO_SHARED_NEGATIVES, True)
    if t.loss == "full_softmax":
        return LossPlan("softmax", 0, False)
    if t.loss == "sampled_softmax":
        return LossPlan("sampled_softmax", t.shared_negatives, t.negative_sampling == "popularity")
    return LossPlan("bce", 0, False)


class SharedNegatives:
    """Negatives shared by a whole batch, drawn from a fixed distribution over items 1..n.

    Each draw is a pure function of (seed, epoch, step, rank), so runs replay exactly on resume
    and for any thread count. ``log_q`` (n_items + 1,) is the log-probability of each item under
    the distribution (row 0, padding, is -inf), for the logQ correction."""

    def __init__(self, store: _core.SequenceStore, count: int, popularity: bool, seed: int) -> None:
        n = int(store.n_items)
        weights = (
            store.popularity(holdout=2)[1:].astype(np.float64) + 1.0
            if popularity
            else np.ones(n, dtype=np.float64)
        )  # add-one smoothing: every item can be drawn
        q = weights / weights.sum()
        self.count = count
        self.seed = seed
        self.cdf = np.cumsum(q)
        self.cdf[-1] = 1.0
        log_q = np.full(n + 1, -np.inf)
        log_q[1:] = np.log(q)
        self.log_q = torch.from_numpy(log_q).float()  # (n_items + 1,)

    def draw(self, epoch: int, step: int, rank: int) -> np.ndarray:
        """(count,) int64 item ids in 1..n_items, with replacement."""
        rng = np.random.default_rng([self.seed, epoch, step, rank])
        u = rng.random(self.count)
        return np.searchsorted(self.cdf, u, side="right").astype(np.int64) + 1


class TrainStep(nn.Module):
    """Wraps the model so that the whole loss is one ``forward`` (what DDP synchronises)."""

    log_q: torch.Tensor | None

    def __init__(
        self,
        model: Recommender,
        cfg: RunConfig,
        plan: LossPlan | None = None,
        log_q: torch.Tensor | None = None,
        popularity: np.ndarray | None = None,
    ) -> None:
        """``popularity`` (n_items + 1,): training interactions of each item, needed when
        ``train.logit_adjust`` is set (the loss then adds logit_adjust * log(1 + count) to each
        item's logit)."""
        super().__init__()
        self.model: Recommender = model
        self.plan = plan or loss_plan(cfg, model.n_items)
        self.last_only = cfg.train.last_only
        self.max_logits = max(cfg.train.loss_memory_mb * 2**20 // 4, 1)
        self.log_q = log_q if self.plan.popularity else None
        self.logit_bias: torch.Tensor | None
        self.register_buffer("logit_bias", None, persistent=False)  # moves with .to(device)
        tau = cfg.train.logit_adjust
        if tau != 0.0:
            if popularity is None or np.asarray(popularity).shape != (model.n_items + 1,):
                raise ConfigError(
                    f"train.logit_adjust={tau}: needs the training popularity of every item, "
                    f"shape ({model.n_items + 1},), got "
                    f"{None if popularity is None else np.asarray(popularity).shape}"
                )
            bias = tau * np.log1p(np.asarray(popularity, dtype=np.float64))
            self.logit_bias = torch.from_numpy(bias).float()  # (n_items + 1,), a buffer
        # train.loss_scale="epoch": mean positions per batch over the epoch (see positions_per_batch)
        self.position_scale: float | None = None

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs (B, T), targets (B, T), negatives (B, T, n) or shared (S,) -> (loss, parts)."""
        from h2rec.losses import recommendation_loss

        states = self.model(inputs)  # (B, T, E)
        log_q = self.log_q.to(states.device) if self.log_q is not None else None
        bias = self.logit_bias.to(states.device) if self.logit_bias is not None else None
        # with the per-epoch scale: the sum over positions / the epoch's mean per batch
        real = targets[:, -1:] if self.last_only else targets
        scale = None if self.position_scale is None else (real > 0).sum() / self.position_scale

        def loss_of(user: torch.Tensor, tgt: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            loss = recommendation_loss(
                self.model, user, tgt, neg, kind=self.plan.kind, last_only=self.last_only,
                max_logits=self.max_logits, log_q=log_q, logit_bias=bias,
            )
            return loss if scale is None else loss * scale.to(loss.dtype)

        parts = {"rec": loss_of(states, targets, negatives)}
        take = getattr(self.model, "take_branch_states", None)
        pair = take(inputs) if take is not None else None  # (2B, T, E): model.branch_loss
        if pair is not None:  # the mean over both branches' positions, twice: their sum
            neg2 = torch.cat([negatives, negatives]) if negatives.dim() == 3 else negatives
            branch = loss_of(pair, torch.cat([targets, targets]), neg2)
            parts["branch"] = 2.0 * self.model.cfg.branch_loss * branch  # type: ignore[union-attr]
        for name, value in self.model.aux_losses(inputs, states, targets).items():
            parts[name] = value
        total = sum(parts.values(), torch.zeros((), device=states.device))
        return total, parts


def positions_per_batch(sampler: _core.TrainSampler, last_only: bool) -> float:
    """Mean number of trained positions per batch over an epoch (the same for every epoch:
    only the grouping of users into batches changes)."""
    total = batches = 0
    for _, targets, _ in sampler.epoch(0):
        real = targets[:, -1:] if last_only else targets
        total += int((real > 0).sum())
        batches += 1
    return total / max(batches, 1)
