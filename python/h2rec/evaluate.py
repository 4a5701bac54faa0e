"""Leave-one-out evaluation: full ranking and the sampled protocol, metrics and groups.

Protocols
    ``full``: every user's target is ranked against all items. The user's history (the
    items of the evaluation input) is excluded by default, the target itself always stays in.
    ``sampled``: the target against ``n_negatives`` items the user never touched, drawn by
    :func:`h2rec._core.sample_candidates` with a fixed seed (the paper's protocol).

Ranks and ties
    The rank of the target (0 = first) is the number of competing items scoring strictly higher
    *plus the number of competing items scoring exactly the same*: ties are resolved
    pessimistically, so a model that gives every item the same score ranks every target last
    rather than first. NaN scores count as ``-inf``.

Metrics (per user, averaged)
    HR@K = 1 if rank < K (with one target per user this is Recall@K);
    NDCG@K = 1 / log2(rank + 2) if rank < K else 0; MRR = 1 / (rank + 1) over the full list.

Groups
    ``head``/``tail``: the target's popularity in the *training* prefixes
    (``store.popularity(holdout=2)``). Pareto split: sort items by that popularity; the tail is the
    ``tail_share`` (80%) least popular items, items tied with the last tail item included; or, with
    ``head_threshold > 0``, head = popularity >= threshold. ``pop_<a>-<b>``: the popularity buckets
    1-9, 10-29, 30-59, 60-99, >=100; targets never seen in training form the group ``unseen``.
    ``short``/``long``: users by evaluation input length (before truncation to ``max_len``); the
    ``short_share`` (80%) users with the shortest inputs are short (ties included), or with
    ``long_threshold > 0``, long = input length >= threshold.

Users: every user with at least three interactions (a training item, a validation target and a
test target), the same set for both splits.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from h2rec import _core
from h2rec.config import EvalConfig
from h2rec.errors import ConfigError
from h2rec.ops import core_inference

__all__ = [
    "EvalResult",
    "ScoringModel",
    "add_text_scores",
    "added_scores",
    "bucket_labels",
    "eval_users",
    "evaluate",
    "full_ranks",
    "left_padded_inputs",
    "metric_names",
    "per_user_metrics",
    "rank_metrics",
    "ranks_against",
    "recommend_top_k",
    "result_from_ranks",
    "states_of",
]

logger = logging.getLogger(__name__)

Split = Literal["valid", "test"]


class ScoringModel(Protocol):
    """What evaluation needs of a model (every ``h2rec.models`` model provides it)."""

    training: bool

    def __call__(self, seq: torch.Tensor) -> torch.Tensor: ...  # (B, T) -> (B, T, E)
    def item_vectors(self, items: torch.Tensor) -> torch.Tensor: ...  # (...) -> (..., E)
    def all_item_vectors(self) -> torch.Tensor: ...  # (n_items + 1, E)
    def parameters(self) -> Iterator[nn.Parameter]: ...
    def eval(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...


_HOLDOUT = {"valid": 2, "test": 1}


@dataclass(frozen=True)
class EvalResult:
    """Per-user ranks and the metrics computed from them."""

    split: str  # "valid" or "test"
    protocol: str  # "full" or "sampled"
    users: np.ndarray  # (U,) store rows of the evaluated users
    targets: np.ndarray  # (U,) target item ids
    ranks: np.ndarray  # (U,) 0-based rank of each target
    input_lengths: np.ndarray  # (U,) evaluation input length before truncation
    n_candidates: int  # items competing per user (n_items for full ranking)
    metrics: dict[str, float]  # overall metrics
    groups: dict[str, dict[str, Any]]  # group -> {"n": users, metric: value or None}
    thresholds: dict[str, float] = field(default_factory=dict)  # the group boundaries used

    @property
    def ndcg10(self) -> float:
        """NDCG@10 over all users (the model-selection metric)."""
        return self.metrics["NDCG@10"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-user arrays)."""
        return {
            "split": self.split,
            "protocol": self.protocol,
            "n_users": int(self.users.size),
            "n_candidates": self.n_candidates,
            "metrics": self.metrics,
            "groups": self.groups,
            "thresholds": self.thresholds,
        }


# --------------------------------------------------------------------------- metrics


def metric_names(ks: tuple[int, ...]) -> list[str]:
    """Metric names in report order: HR@K..., NDCG@K..., MRR."""
    return [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]


def per_user_metrics(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each metric per user (float64 arrays) from 0-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"HR@{k}"] = (r < k).astype(np.float64)
    for k in ks:
        out[f"NDCG@{k}"] = np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)
    out["MRR"] = 1.0 / (r + 1.0)
    return out


def rank_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR of 0-based ranks; NaN for no users."""
    per = per_user_metrics(ranks, ks)
    return {k: (float(v.mean()) if v.size else math.nan) for k, v in per.items()}


def ranks_against(
    scores: torch.Tensor, target_scores: torch.Tensor, competing: torch.Tensor
) -> torch.Tensor:
    """0-based pessimistic ranks: #(competing > target) + #(competing == target).

    scores (B, C) float, target_scores (B,), competing (B, C) bool (False for the target's own
    column, padding and excluded items). NaN counts as -inf."""
    neg_inf = float("-inf")
    s = torch.nan_to_num(scores.float(), nan=neg_inf)
    t = torch.nan_to_num(target_scores.float(), nan=neg_inf).unsqueeze(1)  # (B, 1)
    beats = (s >= t) & competing  # (B, C)
    return beats.sum(dim=1)


# --------------------------------------------------------------------------- inputs


def left_padded_inputs(store: _core.SequenceStore, users: np.ndarray, holdout: int, max_len: int):
    """(B, max_len) int64 inputs: each user's sequence without its last ``holdout`` items,
    the most recent ``max_len`` kept, left-padded with 0; and the untruncated lengths (B,)."""
    offsets = store.offsets
    items = store.items
    users = np.asarray(users, dtype=np.int64)
    starts = offsets[users]
    ends = np.maximum(offsets[users + 1] - holdout, starts)
    lengths = ends - starts
    take = np.minimum(lengths, max_len)
    out = np.zeros((users.size, max_len), dtype=np.int64)
    col = np.arange(max_len, dtype=np.int64)[None, :]  # (1, T)
    first = (max_len - take)[:, None]  # first filled column per row
    src = ends[:, None] - max_len + col  # source index if filled
    mask = col >= first
    out[mask] = items[src[mask]]
    return out, lengths


def eval_users(store: _core.SequenceStore, sample: int = 0, seed: int = 0) -> np.ndarray:
    """Users evaluated by both splits: at least three interactions; with ``sample`` > 0, a
    fixed sample of that many of them (in user order), drawn by ``seed`` alone, so validation
    and test, every epoch and every process rank the same users."""
    users = np.flatnonzero(store.lengths() >= 3).astype(np.int64)
    if 0 < sample < users.size:
        pick = np.random.default_rng([seed, 0x5A3]).choice(users.size, size=sample, replace=False)
        users = users[np.sort(pick)]
    return users


def _device_of(model: ScoringModel) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def added_scores(
    model: Any, seq: torch.Tensor, candidates: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Scores to add to the inner products of left-padded inputs (B, T) with every item
    (B, N + 1), or with ``candidates`` (B, C): the sparse text blend of h2rec.blend, when the
    model carries one."""
    term = getattr(model, "text_blend", None)
    return None if term is None else term(seq, candidates).float()


def add_text_scores(model: Any, seq: torch.Tensor, scores: torch.Tensor) -> None:
    """``scores += added_scores(model, seq)`` in place, to the bit, for scores (B, N + 1) of
    every item (see ``TextScores.add_to``); nothing when the model carries no text blend."""
    term = getattr(model, "text_blend", None)
    if term is not None:
        term.add_to(scores, seq)


def states_of(model: Any, seq: torch.Tensor) -> torch.Tensor:
    """Each user's state (B, E) float32 from left-padded inputs (B, T): the model's
    ``user_states`` (the last position only) where it has one, else ``model(seq)[:, -1]``."""
    user_states = getattr(model, "user_states", None)
    if user_states is not None:
        return user_states(seq).float()
    return model(seq)[:, -1, :].float()


# --------------------------------------------------------------------------- groups


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """(10, 30, 60, 100) -> ["1-9", "10-29", "30-59", "60-99", ">=100"]."""
    lows = (1, *edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)]
    return [*labels, f">={edges[-1]}"] if edges else [">=1"]


def _pareto_cut(values: np.ndarray, share: float) -> float:
    """The value at the ``share`` quantile of ``values`` sorted ascending (ties join the low side)."""
    if values.size == 0:
        return math.inf
    ordered = np.sort(values)
    return float(ordered[max(math.ceil(share * values.size) - 1, 0)])


def _groups(
    result_ranks: np.ndarray,
    targets: np.ndarray,
    input_lengths: np.ndarray,
    popularity: np.ndarray,
    cfg: EvalConfig,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    item_pop = popularity[1:]
    if cfg.head_threshold > 0:
        head_min = float(cfg.head_threshold)
    else:
        head_min = _pareto_cut(item_pop, cfg.tail_share) + 1  # head: popularity above the cut
    if cfg.long_threshold > 0:
        long_min = float(cfg.long_threshold)
    else:
        long_min = _pareto_cut(input_lengths, cfg.short_share) + 1
    tpop = popularity[targets]
    masks: dict[str, np.ndarray] = {
        "head": tpop >= head_min,
        "tail": tpop < head_min,
    }
    lows = (1, *cfg.buckets)
    highs = (*cfg.buckets, None)
    for label, lo, hi in zip(bucket_labels(cfg.buckets), lows, highs):
        masks[f"pop_{label}"] = (tpop >= lo) & (tpop < hi) if hi is not None else tpop >= lo
    masks["unseen"] = tpop == 0
    masks["short"] = input_lengths < long_min
    masks["long"] = input_lengths >= long_min
    per = per_user_metrics(result_ranks, cfg.ks)
    groups: dict[str, dict[str, Any]] = {}
    for name, m in masks.items():
        n = int(m.sum())
        entry: dict[str, Any] = {"n": n}
        for metric, values in per.items():
            entry[metric] = float(values[m].mean()) if n else None
        groups[name] = entry
    thresholds = {
        "head_min_popularity": head_min,
        "head_item_share": float((item_pop >= head_min).mean()) if item_pop.size else math.nan,
        "long_min_input_length": long_min,
    }
    return groups, thresholds


# --------------------------------------------------------------------------- evaluation


def result_from_ranks(
    split: str,
    cfg: EvalConfig,
    store: _core.SequenceStore,
    users: np.ndarray,
    targets: np.ndarray,
    ranks: np.ndarray,
    input_lengths: np.ndarray,
    n_candidates: int,
) -> EvalResult:
    """Metrics and groups of per-user ranks (also used to merge the shards of several processes)."""
    popularity = store.popularity(holdout=2)
    groups, thresholds = _groups(ranks, targets, input_lengths, popularity, cfg)
    return EvalResult(
        split=split,
        protocol=cfg.protocol,
        users=users,
        targets=targets,
        ranks=ranks,
        input_lengths=input_lengths,
        n_candidates=n_candidates,
        metrics=rank_metrics(ranks, cfg.ks),
        groups=groups,
        thresholds=thresholds,
    )


def _workers(device: torch.device) -> int:
    """How many batches evaluation runs side by side: the torch thread count on the CPU."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


# evaluations in other threads of this process wait: the torch thread count is process-wide
_PARALLEL = threading.Lock()


def _run_batches(work: Any, batches: list[np.ndarray], device: torch.device) -> None:
    """``work(batch)`` for every batch. On the CPU with n > 1 torch threads, n worker threads
    take the batches, each running its ops on one thread: evaluation's ops are small (a few
    users' short sequences), so batches side by side use the cores better than threads inside
    each op. Every batch is computed on one thread whatever n is, so the ranks are the same
    bits for any thread count. Elsewhere (or with one thread) the batches run in order. The
    first error cancels the batches not started and is raised here."""
    n = min(_workers(device), len(batches))
    if n <= 1:
        for pos in batches:
            work(pos)
        return
    from concurrent.futures import wait

    with _PARALLEL:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        futures: list[Any] = []
        try:
            pool = _pool(_workers(device))
            futures = [pool.submit(work, pos) for pos in batches]
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            wait(futures)  # the batches already running finish before the error is raised
            raise
        finally:
            torch.set_num_threads(threads)


# the workers of _run_batches, kept between evaluations (a validation every epoch): new threads
# each time start with cold allocator arenas; a forked child starts without them
_POOLS: dict[int, Any] = {}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(n: int) -> Any:
    """The pool of n evaluation workers (the torch thread count), started on first use and
    started again when it was shut down (as at interpreter exit)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = _POOLS.get(n)
    if pool is None or getattr(pool, "_shutdown", False):
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="h2rec-eval")
    return pool


def _trim(inputs: np.ndarray) -> np.ndarray:
    """Left-padded rows (B, T) without the leading columns that are padding in every row."""
    real = inputs != 0
    if inputs.size == 0 or not real.any():
        return inputs[:, -1:]
    return inputs[:, int(real.any(axis=0).argmax()) :]


def _by_length(lengths: np.ndarray, max_len: int, batch_size: int) -> Iterator[np.ndarray]:
    """Positions of users in batches of similar input length (longest first), so that trimmed
    batches carry little padding; every position appears once."""
    order = np.argsort(-np.minimum(lengths, max_len), kind="stable")
    for start in range(0, order.size, batch_size):
        yield order[start : start + batch_size]


def _score_copies(model: Any) -> int:
    """(B, N + 1) matrices a batch holds at once: the scores, and off the CPU the text blend's
    term (on the CPU it is added into the scores in place)."""
    if getattr(model, "text_blend", None) is None or _device_of(model).type == "cpu":
        return 1
    return 2


def _score_rows(n_items: int, batch_size: int, max_scores: int) -> int:
    """Users scored at once: ``batch_size``, fewer when (users, n_items + 1) scores would exceed
    ``max_scores`` values (always at least one user)."""
    return max(1, min(batch_size, max_scores // (n_items + 1)))


def batch_rows(model: Any, n_items: int, cfg: EvalConfig) -> int:
    """Users an evaluation batch holds: ``cfg.batch_size``, fewer in full ranking when their
    scores would pass ``cfg.max_scores_mb`` (shared by the batches run side by side, as many
    as the torch threads on the CPU)."""
    device = _device_of(model)
    if cfg.protocol != "full":
        return cfg.batch_size
    budget = cfg.max_scores_mb * 2**20 // 4 // _workers(device) // _score_copies(model)
    return _score_rows(n_items, cfg.batch_size, budget)


def _plan(
    model: Any, store: _core.SequenceStore, split: Split, cfg: EvalConfig, max_len: int,
    users: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(users, their input lengths, the positions of the users of each batch) of an evaluation."""
    if split not in _HOLDOUT:
        raise ConfigError(f"split={split!r}: must be 'valid' or 'test'")
    if users is None:
        users = eval_users(store, cfg.sample_users, cfg.seed)
    else:
        users = np.asarray(users, dtype=np.int64)
    lengths = store.lengths()[users] - _HOLDOUT[split]
    rows = batch_rows(model, store.n_items, cfg)
    return users, lengths, list(_by_length(lengths, max_len, rows))


def batch_plan(model: ScoringModel, store: _core.SequenceStore, split: Split, cfg: EvalConfig,
               max_len: int, users: np.ndarray | None = None) -> list[np.ndarray]:
    """The users of each batch :func:`evaluate` runs, in its order (each batch cut to its
    longest row, so a user's bits depend on the batch they are in). Passing the users of some
    of these batches, in this order, to :func:`evaluate` runs those very batches: what lets
    processes share an evaluation and still get the one-process ranks to the bit."""
    users, _, batches = _plan(model, store, split, cfg, max_len, users)
    return [users[pos] for pos in batches]


def score_matrix(states: torch.Tensor, items_all: torch.Tensor) -> torch.Tensor:
    """Scores (B, N + 1) of users (B, E) against items (N + 1, E), a fresh tensor, laid out as
    the transpose of a contiguous (N + 1, B) matrix.

    On the CPU (float32) it is the Rust core's ``item_scores`` (the ``gemm`` crate, on the
    calling thread: about 2.6 x torch's MKL product for 64 users against Beauty's items on an
    AVX-512 CPU); elsewhere ``(items_all @ states.T).T``. Evaluation and recommendation both
    score through here, so their rankings agree to the bit."""
    if core_inference(states, items_all):
        out = torch.empty(items_all.shape[0], states.shape[0], dtype=torch.float32)
        _core.item_scores(items_all.contiguous().numpy(), states.contiguous().numpy(), out.numpy())
        return out.T
    return (items_all @ states.T).T


# counts of 0/1 in float32 are exact below 2**24 columns
_FLOAT_COUNT_LIMIT = 1 << 24


# users scored and counted together on the CPU: 64 rows of a 12k-item catalogue (3 MB) stay
# in cache between the GEMM that writes them and the comparison that reads them (a 256-row
# block went to memory and back: about a quarter slower on Beauty)
_CPU_RANK_ROWS = 64


def full_ranks(
    states: torch.Tensor,
    items_all: torch.Tensor,
    targets: np.ndarray,
    hist_offsets: np.ndarray | None,
    hist_items: np.ndarray | None,
    added: torch.Tensor | None = None,
    text: Callable[[torch.Tensor, slice], None] | None = None,
) -> torch.Tensor:
    """0-based pessimistic full-ranking ranks of each target (B,) among items 1..n.

    rank = #(items scoring >= the target) less the target itself, the padding column and, when
    histories are given (CSR ``hist_offsets`` (B+1,), ``hist_items``), the distinct history items
    other than the target. One pass of comparisons over the (B, n + 1) scores, no mask. NaN
    scores count as -inf, as in :func:`ranks_against`. On the CPU the users go in blocks of
    ``_CPU_RANK_ROWS``. ``added`` (B, n + 1): scores added to the inner products (the text
    blend); or ``text(scores, rows)``, which adds the term of users ``rows`` (a slice) to their
    scores in place (:func:`add_text_scores`), so that only a block's term is computed at once."""
    b = states.shape[0]
    step = _CPU_RANK_ROWS if states.device.type == "cpu" else max(b, 1)
    if b <= step:
        return _full_ranks(states, items_all, targets, hist_offsets, hist_items, added,
                           None if text is None else partial(text, rows=slice(0, b)))
    targets = np.asarray(targets)
    out = []
    for a in range(0, b, step):
        z = min(a + step, b)
        h_off = h_items = None
        if hist_offsets is not None and hist_items is not None:
            h_off = hist_offsets[a : z + 1] - hist_offsets[a]
            h_items = hist_items[hist_offsets[a] : hist_offsets[z]]
        out.append(_full_ranks(states[a:z], items_all, targets[a:z], h_off, h_items,
                               None if added is None else added[a:z],
                               None if text is None else partial(text, rows=slice(a, z))))
    return torch.cat(out)


def _full_ranks(
    states: torch.Tensor,
    items_all: torch.Tensor,
    targets: np.ndarray,
    hist_offsets: np.ndarray | None,
    hist_items: np.ndarray | None,
    added: torch.Tensor | None = None,
    text: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """:func:`full_ranks` of one block of users (``text``: adds the block's text term)."""
    device = states.device
    b = states.shape[0]
    n_cols = items_all.shape[0]
    rows = torch.arange(b, device=device)
    tgt = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(device)
    scores = score_matrix(states, items_all)  # (B, N + 1)
    if added is not None:
        scores += added
    if text is not None:
        text(scores)
    t = scores[rows, tgt]  # (B,)
    t = torch.nan_to_num(t, nan=float("-inf"))
    lost = torch.isneginf(t)  # a target at -inf (or NaN) ties with every column, NaN ones too

    def beats(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Whether column c of row r scores >= the row's target (NaN >= t is False)."""
        return (scores[r, c] >= t[r]) | lost[r]

    # what is not counted against the target, read before the scores are overwritten below
    not_counted = beats(rows, tgt).long() + beats(rows, torch.zeros_like(tgt)).long()
    if hist_offsets is not None and hist_items is not None and hist_items.size:
        h_rows = np.repeat(np.arange(b), np.diff(hist_offsets))
        keys = np.unique(h_rows * n_cols + hist_items)  # distinct (row, item)
        h_rows, h_items = keys // n_cols, keys % n_cols
        keep = (h_items != np.asarray(targets)[h_rows]) & (h_items != 0)
        hr = torch.from_numpy(h_rows[keep]).to(device)
        hi = torch.from_numpy(h_items[keep]).to(device)
        not_counted.index_add_(0, hr, beats(hr, hi).long())
    if n_cols < _FLOAT_COUNT_LIMIT:
        # in place: each score becomes 1.0 where it is >= the target (NaN: 0.0), summed as
        # float32, exact for these counts; no mask, no extra memory
        count = scores.ge_(t[:, None]).sum(dim=1).long()
    else:  # column slabs: a (B, N + 1) mask and its int64 sum would hold 9 bytes per score
        count = torch.zeros(b, dtype=torch.int64, device=device)
        step = max(1, (1 << 22) // max(b, 1))
        for c0 in range(0, n_cols, step):
            count += (scores[:, c0 : c0 + step] >= t[:, None]).sum(dim=1)
    count[lost] = n_cols
    return count - not_counted


@torch.inference_mode()
def evaluate(
    model: ScoringModel,
    store: _core.SequenceStore,
    split: Split,
    cfg: EvalConfig,
    max_len: int,
    users: np.ndarray | None = None,
) -> EvalResult:
    """Rank every evaluated user's ``split`` target with ``model`` (in eval mode, restored after).

    ``model`` follows the h2rec model interface: ``forward(seq (B, T)) -> (B, T, E)``,
    ``item_vectors(items (...)) -> (..., E)``, ``all_item_vectors() -> (n_items + 1, E)``.
    Users go in batches of similar input length, each cut to its longest row; full ranking holds
    at most ``cfg.max_scores_mb`` of scores at once (fewer users per batch on big catalogues)."""
    users, lengths, batches = _plan(model, store, split, cfg, max_len, users)
    holdout = _HOLDOUT[split]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        n_items = store.n_items
        ranks = np.empty(users.size, dtype=np.int64)
        targets = np.empty(users.size, dtype=np.int64)
        items_all = model.all_item_vectors().float() if cfg.protocol == "full" else None
        blended = getattr(model, "text_blend", None) is not None

        @torch.inference_mode()  # inference mode is per thread: the workers need it too
        def one_batch(pos: np.ndarray) -> None:
            bu = users[pos]
            inputs, tgt = store.eval_inputs(bu, max_len, split)
            targets[pos] = tgt
            seq = torch.from_numpy(_trim(inputs)).to(device)
            states = states_of(model, seq)  # (B, E)
            if cfg.protocol == "full":
                assert items_all is not None
                h_off = h_items = None
                if cfg.exclude_history:
                    h_off, h_items = store.histories(bu, holdout)

                def text(scores: torch.Tensor, rows: slice) -> None:
                    add_text_scores(model, seq[rows], scores)

                ranks[pos] = full_ranks(
                    states, items_all, tgt, h_off, h_items, text=text if blended else None
                ).cpu().numpy()
            else:
                try:
                    cands = _core.sample_candidates(store, bu, tgt, cfg.n_negatives, cfg.seed)
                except ValueError as err:  # a user has touched too many items
                    raise ConfigError(f"eval.n_negatives={cfg.n_negatives}: {err}") from err
                cand_t = torch.from_numpy(cands).to(device)  # (B, 1 + n)
                vecs = model.item_vectors(cand_t).float()  # (B, 1 + n, E)
                scores = (states.unsqueeze(1) * vecs).sum(-1)  # (B, 1 + n)
                added = added_scores(model, seq, cand_t)  # (B, 1 + n) or None
                if added is not None:
                    scores = scores + added
                competing = torch.ones_like(scores, dtype=torch.bool)
                competing[:, 0] = False
                ranks[pos] = ranks_against(scores, scores[:, 0], competing).cpu().numpy()

        _run_batches(one_batch, batches, device)
        n_candidates = n_items if cfg.protocol == "full" else cfg.n_negatives + 1
        return result_from_ranks(split, cfg, store, users, targets, ranks, lengths, n_candidates)
    finally:
        model.train(was_training)


@torch.inference_mode()
def recommend_top_k(
    model: ScoringModel,
    store: _core.SequenceStore,
    users: np.ndarray,
    k: int,
    max_len: int,
    exclude_history: bool = True,
    batch_size: int = 256,
    split: Split | None = None,
    max_scores_mb: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item ids (U, k) and scores (U, k) per user.

    The input is the user's whole sequence, or with ``split`` exactly the input that split's
    evaluation uses (valid: the training prefix; test: all but the last item), so that outside
    code can recompute :func:`evaluate`'s metrics from the lists. Items in that input are never
    recommended unless ``exclude_history=False``. Ties are broken by the lower item id; a user
    with fewer than ``k`` candidates gets 0 (padding) items with score -inf at the end."""
    if k < 1:
        raise ConfigError(f"k={k}: must be >= 1")
    if split is not None and split not in _HOLDOUT:
        raise ConfigError(f"split={split!r}: must be 'valid' or 'test'")
    holdout = 0 if split is None else _HOLDOUT[split]
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        users = np.asarray(users, dtype=np.int64)
        k_eff = min(k, store.n_items)
        items_all = model.all_item_vectors().float()  # (N + 1, E)
        top_items = np.zeros((users.size, k), dtype=np.int64)
        top_scores = np.full((users.size, k), -np.inf, dtype=np.float32)
        lengths = store.lengths()[users] - holdout
        budget = max_scores_mb * 2**20 // 4 // _score_copies(model)
        batch = _score_rows(store.n_items, batch_size, budget)
        for pos in _by_length(lengths, max_len, batch):
            bu = users[pos]
            if split is None:
                inputs, _ = left_padded_inputs(store, bu, 0, max_len)
            else:
                inputs, _ = store.eval_inputs(bu, max_len, split)
            seq = torch.from_numpy(_trim(inputs)).to(device)
            scores = score_matrix(states_of(model, seq), items_all)  # (B, N + 1)
            add_text_scores(model, seq, scores)
            scores = torch.nan_to_num(scores, nan=float("-inf"))
            scores[:, 0] = float("-inf")
            if exclude_history:
                h_off, h_items = store.histories(bu, holdout)
                h_rows = np.repeat(np.arange(bu.size), np.diff(h_off))
                scores[
                    torch.from_numpy(h_rows).to(device), torch.from_numpy(h_items).to(device)
                ] = float("-inf")
            # stable descending sort keeps the lower item id first among equal scores
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k_eff]
            vals = torch.gather(scores, 1, order)
            order = torch.where(torch.isneginf(vals), torch.zeros_like(order), order)
            top_items[pos, :k_eff] = order.cpu().numpy()
            top_scores[pos, :k_eff] = vals.cpu().numpy()
        return top_items, top_scores
    finally:
        model.train(was_training)
