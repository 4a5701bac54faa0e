"""Recommendation losses and the two H2Rec alignment losses.

Recommendation losses take the logits of the target (positive) item and of sampled negatives,
or of every item, at each position; positions whose target is 0 (padding) are ignored, and
``last_only=True`` keeps the last position of each row only (rows are left-padded, so that is
the most recent item).

Alignment losses:
- item level: a symmetric multi-positive InfoNCE between L2-normalised SID and HID embeddings of
  the batch's items, each anchor's positives weighted by a (M, M) matrix (itself, same SID tuple,
  PPMI co-occurrence);
- sequence level: a symmetric InfoNCE between two views of each user (masked-granularity SID
  state and full SID or HID state), in-batch negatives.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from h2rec.errors import ConfigError

LossKind = Literal["bce", "sampled_softmax", "softmax"]
LOSS_KINDS = ("bce", "sampled_softmax", "softmax")


class ItemVectors(Protocol):
    """The item side of a model, all that :func:`recommendation_loss` reads from it (every model
    of ``h2rec.models`` has it; losses sit below the models and do not import them)."""

    def item_vectors(self, items: Tensor) -> Tensor:
        """items (...) -> (..., E); zero for item 0 (padding)."""
        ...

    def all_item_vectors(self) -> Tensor:
        """(n_items + 1, E); row 0 (padding) is zero."""
        ...


def _last(x: Tensor, last_only: bool) -> Tensor:
    """Keep position T-1 only (as a length-1 time axis) when ``last_only``."""
    return x[:, -1:] if last_only else x


def _masked_mean(per_position: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_position`` over ``valid`` entries; 0 (with a graph) when there are none."""
    valid_f = valid.to(per_position.dtype)
    return (per_position * valid_f).sum() / valid_f.sum().clamp(min=1.0)


def bce_loss(
    pos_logits: Tensor, neg_logits: Tensor, targets: Tensor, last_only: bool = False
) -> Tensor:
    """Binary cross-entropy with sampled negatives (SASRec's loss, the paper's).

    Per valid position: -log sigmoid(pos) - sum_n log(1 - sigmoid(neg_n)); mean over positions.

    Args:
        pos_logits: (B, T) scores of the targets.
        neg_logits: (B, T, n) scores of the negatives.
        targets: (B, T) target ids; 0 marks positions without a target.
        last_only: use position T-1 only.
    """
    pos = _last(pos_logits, last_only).float()  # losses in float32, also under autocast
    neg = _last(neg_logits, last_only).float()
    valid = _last(targets, last_only) > 0  # (B, T')
    per_position = F.softplus(-pos) + F.softplus(neg).sum(dim=-1)  # (B, T')
    return _masked_mean(per_position, valid)


def sampled_softmax_loss(
    pos_logits: Tensor,
    neg_logits: Tensor,
    targets: Tensor,
    negatives: Tensor | None = None,
    last_only: bool = False,
) -> Tensor:
    """Softmax cross-entropy of the target against its sampled negatives.

    Per valid position: -log( e^pos / (e^pos + sum_n e^neg_n) ); mean over positions. When
    ``negatives`` (B, T, n) is given, negatives equal to the target are left out.
    """
    pos = _last(pos_logits, last_only).float()
    neg = _last(neg_logits, last_only).float()
    tgt = _last(targets, last_only)
    if negatives is not None:
        hit = _last(negatives, last_only) == tgt[..., None]  # (B, T', n)
        neg = neg.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos[..., None], neg], dim=-1)  # (B, T', 1 + n)
    per_position = torch.logsumexp(logits, dim=-1) - pos  # (B, T')
    return _masked_mean(per_position, tgt > 0)


def full_softmax_loss(logits: Tensor, targets: Tensor, last_only: bool = False) -> Tensor:
    """Softmax cross-entropy over all items.

    Args:
        logits: (B, T, n_items + 1) scores; column 0 (padding) is never a candidate.
        targets: (B, T) target ids, 0 = no target.
    """
    lg = _last(logits, last_only).float().clone()
    tgt = _last(targets, last_only)
    lg[..., 0] = float("-inf")
    per_position = torch.logsumexp(lg, dim=-1) - lg.gather(-1, tgt[..., None]).squeeze(-1)
    per_position = per_position.masked_fill(tgt == 0, 0.0)
    return _masked_mean(per_position, tgt > 0)


def _float32(method: Callable[..., Any]) -> Callable[..., Any]:
    """A custom autograd function's ``forward`` or ``backward`` with autocast off and its
    floating-point tensor arguments cast to float32: float32 math whatever the caller's autocast
    (training on CUDA runs under bf16 autocast; backward runs outside it)."""

    @functools.wraps(method)
    def run(ctx: Any, *args: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        args = tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a
                     for a in args)
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)

    return run


class _FullSoftmaxCE(torch.autograd.Function):
    """Per-row softmax cross-entropy of ``user @ items.T`` against ``targets``, fused.

    The (V, N) logits are never kept beside their softmax: forward turns them into
    probabilities in place, and backward reads those probabilities as the gradient of the
    logits (minus the one-hot target). When V * N exceeds ``chunk_rows`` * N, rows go in chunks
    of ``chunk_rows``; forward keeps only each row's log-sum-exp and backward recomputes the
    chunk's logits, so memory stays at one chunk of logits whatever the catalogue size.
    """

    @staticmethod
    @_float32
    def forward(  # type: ignore[override]
        ctx: Any, user: Tensor, items: Tensor, targets: Tensor, chunk_rows: int,
        bias: Tensor | None = None, frozen: int = 0,
    ) -> Tensor:
        """user (V, E), items (N, E), targets (V,) in 0..N-1, bias (N,) or None (a constant
        added to every row's logits), frozen: how many trailing columns of ``items`` need no
        gradient (their gradient is returned as zero, uncomputed) -> per-row losses (V,)."""
        v = user.shape[0]
        ctx.frozen = frozen
        target_logits = (user * items[targets]).sum(-1)  # (V,)
        if bias is not None:
            target_logits = target_logits + bias[targets]
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.chunk_rows = chunk_rows
        ctx.bias = bias
        ctx.buffer = None  # the pooled buffer that backward hands back
        if v <= chunk_rows:
            buffer = _POOL.take(v * items.shape[0], user)
            # (V, N), turned into probabilities in place
            probs = _logits(user, items, bias, buffer)
            top = probs.amax(dim=1, keepdim=True)  # (V, 1)
            total = probs.sub_(top).exp_().sum(dim=1, keepdim=True)  # (V, 1)
            probs.div_(total)
            lse = (total.log_() + top).squeeze(1)  # (V,)
            ctx.save_for_backward(user, items, targets, probs if keep else None)
            if keep:
                ctx.buffer = buffer
            else:
                _POOL.give(buffer)
        else:
            lse = torch.empty(v, dtype=user.dtype, device=user.device)
            buffer = _POOL.take(min(v, chunk_rows) * items.shape[0], user)
            for a in range(0, v, chunk_rows):
                logits = _logits(user[a : a + chunk_rows], items, bias, buffer)
                # torch.logsumexp's own steps, in place (the same floats, no temporary)
                top = logits.amax(dim=1, keepdim=True)
                top.masked_fill_(top.abs() == float("inf"), 0.0)
                torch.sum(logits.sub_(top).exp_(), dim=1, out=lse[a : a + chunk_rows])
                lse[a : a + chunk_rows].log_().add_(top.squeeze(1))
            _POOL.give(buffer)
            ctx.save_for_backward(user, items, targets, lse)
        ctx.backward_done = False
        return lse - target_logits

    @staticmethod
    @_float32
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.backward_done:  # forward's probabilities were consumed in place
            raise RuntimeError("the fused full-softmax loss can be differentiated once only")
        ctx.backward_done = True
        user, items, targets, saved = ctx.saved_tensors
        v = user.shape[0]
        buffer = ctx.buffer if ctx.buffer is not None else (
            None if v <= ctx.chunk_rows else _POOL.take(ctx.chunk_rows * items.shape[0], user)
        )
        grad_user = torch.empty_like(user) if ctx.needs_input_grad[0] else None
        e_train = items.shape[1] - ctx.frozen  # columns whose gradient is computed
        grad_items = (
            items.new_zeros((items.shape[0], e_train)) if ctx.needs_input_grad[1] else None
        )
        step = max(v, 1) if v <= ctx.chunk_rows else ctx.chunk_rows
        for a in range(0, v, step):
            rows = slice(a, a + step)
            if v <= ctx.chunk_rows:
                g = saved  # (V, N) probabilities from forward
            else:
                g = _logits(user[rows], items, ctx.bias, buffer)
                g.sub_(saved[rows, None]).exp_()  # (c, N)
            idx = torch.arange(g.shape[0], device=g.device)
            g[idx, targets[rows]] -= 1.0
            g.mul_(grad[rows, None])
            if grad_user is not None:
                grad_user[rows] = g @ items
            if grad_items is not None:
                grad_items.addmm_(g.T, user[rows, :e_train])
        ctx.buffer = None
        if buffer is not None:
            del g, saved
            _POOL.give(buffer)
        if grad_items is not None and ctx.frozen:
            grad_items = torch.cat([grad_items, items.new_zeros((items.shape[0], ctx.frozen))], 1)
        return grad_user, grad_items, None, None, None, None


def _logits(
    user: Tensor, items: Tensor, bias: Tensor | None, buffer: Tensor | None = None
) -> Tensor:
    """``user @ items.T`` (+ ``bias`` on every row): a (V, N) tensor, written into the front of
    ``buffer`` (flat, at least V * N elements) when given, else fresh. The same floats either way
    (one matrix product, same kernel)."""
    if buffer is None:
        out = user @ items.T
    else:
        out = torch.matmul(user, items.T, out=buffer[: user.shape[0] * items.shape[0]].view(
            user.shape[0], items.shape[0]))
    return out if bias is None else out.add_(bias)


class _BufferPool:
    """Large CPU float buffers of the fused softmax losses, kept from one step to the next.

    The losses' logits are tens to hundreds of MB. Freed, glibc hands such a block back to the
    kernel at once (it is above the mmap threshold), and the next step's fresh block is
    page-faulted and zeroed again: a sixth to a fifth of the step on one thread (full softmax at
    MovieLens-1M's shape 1.01 s -> 836 ms, shared sampled softmax at 2,178 x 4,096 94.7 ->
    75.6 ms; ``benches/test_bench_losses.py``). A buffer taken here is returned by the backward
    (or by the full softmax's forward when nothing needs a gradient) and reused by the next
    step. Only CPU tensors are pooled (CUDA has its own caching allocator); at most ``keep``
    buffers are held, the largest first, and those too small for a request are dropped; :func:`release_loss_buffers` (called when training
    ends) frees them. A buffer whose graph is dropped before backward is simply freed by Python,
    never handed out twice.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat buffer of at least ``numel`` elements of ``like``'s dtype (CPU), or None for
        tensors on another device (then the caller allocates as before)."""
        if like.device.type != "cpu":
            return None
        with self._lock:
            fits = [b for b in self._free if b.numel() >= numel and b.dtype == like.dtype]
            if fits:
                best = min(fits, key=Tensor.numel)
                self._free = [b for b in self._free if b is not best]
                return best
            # none is large enough: the held ones are smaller than what steps now need, and a
            # larger one replaces them (held memory stays one buffer per loss of a step)
            self._free.clear()
        return torch.empty(numel, dtype=like.dtype)

    def give(self, buffer: Tensor | None) -> None:
        """Hand a buffer back for the next ``take``."""
        if buffer is None:
            return
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=Tensor.numel, reverse=True)
            del self._free[self.keep :]

    def clear(self) -> None:
        """Free every held buffer."""
        with self._lock:
            self._free.clear()


_POOL = _BufferPool()


def release_loss_buffers() -> None:
    """Free the buffers the fused softmax losses keep between steps (see ``_BufferPool``)."""
    _POOL.clear()


def fused_full_softmax(
    user: Tensor, items: Tensor, targets: Tensor, max_logits: int = 64 * 2**20,
    bias: Tensor | None = None, frozen: int = 0,
) -> Tensor:
    """Mean softmax cross-entropy of ``user @ items.T`` over all items, in bounded memory.

    Equal to ``F.cross_entropy(user @ items.T, targets)`` (computed in float32), without
    materialising more than ``max_logits`` logits at once.

    Args:
        user: (V, E) user states at the positions that have a target.
        items: (N, E) candidate item vectors (the padding row left out).
        targets: (V,) target rows of ``items``.
        max_logits: most logits held at once (rows are chunked to stay below it).
        bias: (N,) a constant added to every row's logits (logit adjustment), or None.
        frozen: how many trailing columns of ``items`` are constants (the text-match columns):
            their gradient is not computed (zero), a third less work on those columns.
    """
    if user.shape[0] == 0:
        return (user.sum() + items.sum()) * 0.0
    chunk_rows = max(1, max_logits // max(items.shape[0], 1))
    b = None if bias is None else bias.float()
    per_row = _FullSoftmaxCE.apply(user.float(), items.float(), targets, chunk_rows, b, frozen)
    return per_row.mean()


def _accidental_hits(targets: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, cols) of every negative equal to its row's target: targets (V,), negatives (S,).

    Found by binary search in the sorted negatives, without a (V, S) comparison."""
    sorted_neg, order = torch.sort(negatives)
    lo = torch.searchsorted(sorted_neg, targets)  # (V,)
    hi = torch.searchsorted(sorted_neg, targets, right=True)
    count = hi - lo
    rows = torch.repeat_interleave(torch.arange(targets.shape[0], device=targets.device), count)
    if rows.numel() == 0:
        return rows, rows
    # the j-th hit of a row sits at lo[row] + j in the sorted negatives
    starts = torch.cumsum(count, 0) - count  # (V,) first hit of each row in ``rows``
    j = torch.arange(rows.shape[0], device=rows.device) - starts[rows]
    return rows, order[lo[rows] + j]


class _SharedSoftmaxCE(torch.autograd.Function):
    """Per-row sampled softmax of one positive against negatives shared by every row, fused.

    The (V, S) negative logits become probabilities in place (no concatenated copy, no
    masked copy): forward keeps them, or, past ``chunk_rows`` rows, only each row's
    log-sum-exp, and backward recomputes a chunk's logits from it.
    """

    @staticmethod
    @_float32
    def forward(  # type: ignore[override]
        ctx: Any, user: Tensor, pos: Tensor, neg: Tensor, p_bias: Tensor | None,
        n_bias: Tensor | None, hit_rows: Tensor, hit_cols: Tensor, chunk_rows: int,
    ) -> Tensor:
        """user (V, E), pos (V, E), neg (S, E); biases added to the logits, (V,) and (S,) or
        None; (hit_rows, hit_cols): negatives left out of their row -> per-row losses (V,)."""
        v = user.shape[0]
        p = (user * pos).sum(-1)  # (V,)
        if p_bias is not None:
            p = p + p_bias
        whole = v <= chunk_rows
        lse = torch.empty_like(p)
        probs = None
        buffer = _POOL.take(min(v, chunk_rows) * neg.shape[0], user)
        for a in range(0, v, chunk_rows):
            z = min(a + chunk_rows, v)
            n = _SharedSoftmaxCE._logits(user[a:z], neg, n_bias, hit_rows, hit_cols, a, z, buffer)
            top = torch.maximum(n.amax(dim=1), p[a:z])  # (c,)
            total = n.sub_(top[:, None]).exp_().sum(dim=1) + torch.exp(p[a:z] - top)
            lse[a:z] = total.log() + top
            if whole:
                probs = n.div_(total[:, None])  # (V, S) softmax of the negatives
        ctx.chunk = chunk_rows
        ctx.n_bias = n_bias
        ctx.save_for_backward(user, pos, neg, p, lse, hit_rows, hit_cols,
                              probs if probs is not None else lse.new_empty(0))
        ctx.whole = whole
        ctx.buffer = buffer if whole else None  # backward hands it back
        if not whole:
            _POOL.give(buffer)
        ctx.backward_done = False
        return lse - p

    @staticmethod
    def _logits(user: Tensor, neg: Tensor, n_bias: Tensor | None, hit_rows: Tensor,
                hit_cols: Tensor, a: int, z: int, buffer: Tensor | None = None) -> Tensor:
        """The negative logits of rows a..z (c, S), accidental hits at -inf; written into the
        front of ``buffer`` when given (see ``_logits`` of the full softmax)."""
        n = _logits(user, neg, None, buffer)
        if n_bias is not None:
            n.add_(n_bias)
        if hit_rows.numel():
            keep = (hit_rows >= a) & (hit_rows < z)
            n[hit_rows[keep] - a, hit_cols[keep]] = float("-inf")
        return n

    @staticmethod
    @_float32
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.backward_done:  # forward's probabilities were consumed in place
            raise RuntimeError("the fused sampled-softmax loss can be differentiated once only")
        ctx.backward_done = True
        user, pos, neg, p, lse, hit_rows, hit_cols, probs = ctx.saved_tensors
        v = user.shape[0]
        buffer = ctx.buffer if ctx.whole else _POOL.take(ctx.chunk * neg.shape[0], user)
        gp = (torch.exp(p - lse) - 1.0) * grad  # (V,): d loss / d positive logit
        grad_user = gp[:, None] * pos
        grad_pos = gp[:, None] * user
        grad_neg = torch.zeros_like(neg)
        for a in range(0, v, ctx.chunk):
            z = min(a + ctx.chunk, v)
            if ctx.whole:
                g = probs
            else:
                g = _SharedSoftmaxCE._logits(user[a:z], neg, ctx.n_bias, hit_rows, hit_cols, a, z,
                                             buffer)
                g = g.sub_(lse[a:z, None]).exp_()
            g = g.mul_(grad[a:z, None])  # (c, S): d loss / d negative logits
            grad_user[a:z] += g @ neg
            grad_neg.addmm_(g.T, user[a:z])
        ctx.buffer = None
        del g, probs
        _POOL.give(buffer)
        return grad_user, grad_pos, grad_neg, None, None, None, None, None


def shared_sampled_softmax(
    user: Tensor, pos: Tensor, neg: Tensor, targets: Tensor, negatives: Tensor,
    log_q_pos: Tensor | None = None, log_q_neg: Tensor | None = None,
    max_logits: int = 64 * 2**20,
) -> Tensor:
    """Sampled softmax with one set of negatives shared by every position, logQ-corrected.

    Per row: -log( e^(p - log q_t) / (e^(p - log q_t) + sum_j e^(n_j - log q_j)) ), where a
    negative equal to the row's target is left out (an accidental hit). Without ``log_q_*`` the
    negatives are taken as uniform draws (no correction). Computed in float32 by one fused
    function, holding at most ``max_logits`` negative logits at once.

    Args:
        user: (V, E) user states.
        pos: (V, E) target item vectors.
        neg: (S, E) vectors of the shared negatives.
        targets: (V,) target ids; negatives: (S,) negative ids.
        log_q_pos: (V,) log sampling probability of each target; log_q_neg: (S,) of each negative.
        max_logits: most (row, negative) logits held in memory at once.
    """
    if user.shape[0] == 0:
        return (user.sum() + pos.sum() + neg.sum()) * 0.0
    p_bias = n_bias = None
    if log_q_pos is not None and log_q_neg is not None:
        p_bias, n_bias = -log_q_pos.float(), -log_q_neg.float()
    hit_rows, hit_cols = _accidental_hits(targets, negatives)
    chunk_rows = max(1, max_logits // max(neg.shape[0], 1))
    per_row = _SharedSoftmaxCE.apply(
        user.float(), pos.float(), neg.float(), p_bias, n_bias, hit_rows, hit_cols, chunk_rows
    )
    return per_row.mean()


def recommendation_loss(
    model: ItemVectors,
    states: Tensor,
    targets: Tensor,
    negatives: Tensor | None = None,
    kind: str = "bce",
    last_only: bool = False,
    max_logits: int = 64 * 2**20,
    log_q: Tensor | None = None,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """The recommendation loss of a model's user states (score = dot product).

    Args:
        model: any model of ``h2rec.models`` (``item_vectors``, ``all_item_vectors``).
        states: (B, T, E) from ``model(seq)``.
        targets: (B, T) next items, 0 = no target.
        negatives: (B, T, n) sampled negatives ("bce" and "sampled_softmax"), or (S,) negatives
            shared by every position ("sampled_softmax" only).
        kind: "bce", "sampled_softmax" or "softmax" (full softmax over all items).
        last_only: train on the last position only.
        max_logits: full softmax: most logits held in memory at once.
        log_q: (n_items + 1,) log probability with which shared negatives were drawn (their
            logQ correction); None = uniform draws, no correction.
        logit_bias: (n_items + 1,) a constant added to each item's logit in the loss (logit
            adjustment, ``train.logit_adjust``); None = nothing added.
    """
    if kind not in LOSS_KINDS:
        raise ConfigError(f"loss={kind!r}: must be one of {', '.join(LOSS_KINDS)}")
    states = _last(states, last_only)  # (B, T', E)
    targets = _last(targets, last_only)  # (B, T')
    if kind == "softmax":
        valid = targets > 0
        user = states[valid]  # (V, E)
        items = model.all_item_vectors()[1:]  # (N, E), padding left out
        bias = None if logit_bias is None else logit_bias[1:]
        text = getattr(model, "text_match", None)  # its item columns are constants
        frozen = 0 if text is None else text.dim
        return fused_full_softmax(user, items, targets[valid] - 1, max_logits, bias, frozen)
    if negatives is None:
        raise ConfigError(f"loss={kind!r} needs sampled negatives, got None")
    if negatives.dim() == 1:  # shared by the whole batch
        if kind != "sampled_softmax":
            raise ConfigError(f"loss={kind!r}: shared negatives need loss='sampled_softmax'")
        valid = targets > 0
        tgt = targets[valid]  # (V,)
        lq_pos = lq_neg = None
        if log_q is not None:
            lq_pos, lq_neg = log_q[tgt], log_q[negatives]
        if logit_bias is not None:  # subtracted as log q is: the logit gains the bias
            zero = torch.zeros((), device=tgt.device)
            lq_pos = (zero if lq_pos is None else lq_pos) - logit_bias[tgt]
            lq_neg = (zero if lq_neg is None else lq_neg) - logit_bias[negatives]
        return shared_sampled_softmax(
            states[valid], model.item_vectors(tgt), model.item_vectors(negatives), tgt, negatives,
            lq_pos, lq_neg, max_logits,
        )
    negatives = _last(negatives, last_only)  # (B, T', n)
    pos_logits = (states * model.item_vectors(targets)).sum(-1)  # (B, T')
    neg_logits = torch.einsum("bte,btne->btn", states, model.item_vectors(negatives))
    if logit_bias is not None:
        pos_logits = pos_logits + logit_bias[targets]
        neg_logits = neg_logits + logit_bias[negatives]
    if kind == "bce":
        return bce_loss(pos_logits, neg_logits, targets)
    return sampled_softmax_loss(pos_logits, neg_logits, targets, negatives)


def multi_positive_info_nce(
    anchors: Tensor, candidates: Tensor, weights: Tensor, tau: float
) -> Tensor:
    """Multi-positive InfoNCE of anchors against in-batch candidates (inputs used as given).

    loss_i = -log( sum_j w_ij exp(s_ij / tau) / sum_j exp(s_ij / tau) ),  s_ij = <a_i, c_j>,
    averaged over anchors. Each row of ``weights`` must have a positive entry.

    Args:
        anchors: (M, D).
        candidates: (M, D).
        weights: (M, M) non-negative positive weights; row i = anchor i's positives.
        tau: temperature.
    """
    logits = (anchors @ candidates.T).float() / tau  # (M, M)
    log_w = torch.log(weights.clamp(min=0.0))  # -inf where not a positive
    pos = torch.logsumexp(logits + log_w, dim=-1)  # (M,)
    return (torch.logsumexp(logits, dim=-1) - pos).mean()


class _TwoWayMultiPositiveNCE(torch.autograd.Function):
    """Both directions of the multi-positive InfoNCE between unit rows, fused, with sparse
    positives.

    For unit rows every logit lies within 2 / tau of its row's (and column's) maximum, so
    ``exp(logit - max)`` cannot underflow to zero while 2 / tau stays well inside float32's
    exponent range (the caller checks): the positives' log-sum-exp is then the log of a
    weighted sum of the same exponentials the denominator uses, read at the P positive pairs
    only. The (M, M) work is one GEMM, two exponentials and their sums forward, three passes
    and two GEMMs backward; no (M, M) weight matrix and no logarithm of its zeros.
    """

    @staticmethod
    @_float32
    def forward(  # type: ignore[override]
        ctx: Any, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, tau: float
    ) -> Tensor:
        """a, b (M, D) unit rows; positives w[rows, cols] = vals (P,) ->
        0.5 * (loss(a -> b) + loss(b -> a)), anchor i's positives in direction a -> b being
        w[i, :] and anchor b_j's in direction b -> a being w[j, :]."""
        m = a.shape[0]
        logits = (a @ b.T).mul_(1.0 / tau)  # (M, M), logits[i, j] = <a_i, b_j> / tau
        e_row = (logits - logits.amax(dim=1, keepdim=True)).exp_()  # a_i's softmax, unnormalised
        e_col = logits.sub_(logits.amax(dim=0, keepdim=True)).exp_()  # b_j's, in place
        den_row, den_col = e_row.sum(dim=1), e_col.sum(dim=0)  # (M,)
        p_row = vals * e_row[rows, cols]  # (P,) anchor a_r's positive b_c
        p_col = vals * e_col[cols, rows]  # (P,) anchor b_r's positive a_c, logit <a_c, b_r>
        num_row = torch.zeros_like(den_row).index_add_(0, rows, p_row)
        num_col = torch.zeros_like(den_col).index_add_(0, rows, p_col)
        loss = 0.5 * (
            (den_row.log() - num_row.log()).mean() + (den_col.log() - num_col.log()).mean()
        )
        ctx.tau, ctx.m = tau, m
        ctx.save_for_backward(
            a, b, rows, cols, e_row, e_col, den_row, den_col, p_row / num_row[rows],
            p_col / num_col[rows],
        )
        return loss

    @staticmethod
    @_float32
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b, rows, cols, e_row, e_col, den_row, den_col, q_row, q_col = ctx.saved_tensors
        # d loss / d logits = 0.5 / M * (softmax over rows + softmax over columns
        #                                - each direction's posterior over its positives)
        g = e_row * (1.0 / den_row)[:, None]
        g.addcmul_(e_col, (1.0 / den_col)[None, :])
        g.index_put_((rows, cols), -q_row, accumulate=True)
        g.index_put_((cols, rows), -q_col, accumulate=True)
        g.mul_(grad * (0.5 / (ctx.m * ctx.tau)))  # d loss / d (a @ b.T)
        grad_a = g @ b if ctx.needs_input_grad[0] else None
        grad_b = g.T @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None


# exp(x) stays a normal float32 for x > -87: the fused path needs 2 / tau below that
_FUSED_MAX_SPREAD = 80.0


def item_alignment_loss(sid: Tensor, hid: Tensor, weights: Tensor, tau: float = 0.5) -> Tensor:
    """Code-guided item-level alignment: symmetric multi-positive InfoNCE, L2-normalised inputs.

    Args:
        sid: (M, D) SID item embeddings of the batch's items.
        hid: (M, D) HID item embeddings of the same items.
        weights: (M, M) positive weights, row i = positives of item i (1 on the diagonal).
        tau: temperature.

    Returns:
        mean of the SID->HID and HID->SID directions (each a :func:`multi_positive_info_nce`).
        Negative weights count as zero.
    """
    rows, cols = (weights > 0).nonzero(as_tuple=True)
    return item_alignment_loss_pairs(sid, hid, rows, cols, weights[rows, cols], tau)


def item_alignment_loss_pairs(
    sid: Tensor, hid: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, tau: float = 0.5
) -> Tensor:
    """:func:`item_alignment_loss` with the positive weights given sparse: weight ``vals[p]``
    at (``rows[p]``, ``cols[p]``), distinct pairs, every row with a positive (the diagonal).

    Computed fused (see ``_TwoWayMultiPositiveNCE``) unless tau is so small that the
    exponentials could underflow; then by :func:`multi_positive_info_nce` on the dense weights.
    """
    if sid.shape[0] == 0:
        return (sid.sum() + hid.sum()) * 0.0
    s = F.normalize(sid.float(), dim=-1)
    h = F.normalize(hid.float(), dim=-1)
    if 2.0 / tau < _FUSED_MAX_SPREAD:
        return _TwoWayMultiPositiveNCE.apply(s, h, rows, cols, vals.float(), tau)
    m = s.shape[0]
    weights = torch.zeros(m, m, dtype=s.dtype, device=s.device)
    weights[rows, cols] = vals.to(s.dtype)
    return 0.5 * (
        multi_positive_info_nce(s, h, weights, tau) + multi_positive_info_nce(h, s, weights, tau)
    )


def symmetric_info_nce(a: Tensor, b: Tensor, tau: float = 1.0) -> Tensor:
    """Symmetric InfoNCE between paired rows of L2-normalised ``a`` and ``b`` (B, D).

    Row i of ``a`` and row i of ``b`` are the positive pair; other rows are negatives.
    """
    if a.shape[0] == 0:
        return (a.sum() + b.sum()) * 0.0
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = (a @ b.T).float() / tau  # (B, B)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def mask_lowest_levels(
    levels: Tensor, gate: Tensor, mask_vectors: Tensor, real: Tensor
) -> Tensor:
    """Replace, for each user, the floor(L/2) levels with the lowest gate weight.

    Args:
        levels: (B, T, L, D) per-level code embeddings of each user's sequence.
        gate: (B, L) the user's gate weights over levels (ties go to the finer level).
        mask_vectors: (L, D) learned replacement per level.
        real: (B, T) bool, True at real items (padding stays zero).

    Returns:
        (B, T, L, D) with masked levels replaced at every real position.
    """
    b, t, n_levels, d = levels.shape
    n_mask = n_levels // 2
    masked = torch.zeros(b, n_levels, dtype=torch.bool, device=levels.device)
    if n_mask > 0:
        # stable ascending sort of the gate with finer levels first among ties
        order = torch.argsort(gate.flip(-1), dim=-1, stable=True)[:, :n_mask]
        masked.scatter_(1, n_levels - 1 - order, True)
    keep = real[:, :, None, None].to(levels.dtype)  # (B, T, 1, 1)
    repl = mask_vectors[None, None].expand(b, t, n_levels, d) * keep  # (B, T, L, D)
    return torch.where(masked[:, None, :, None], repl, levels)
