"""The losses' step (forward and backward) against the plain autograd form a PyTorch user
writes, at the shapes of the scale benchmark's training batches.

- ``shared sampled softmax``: 2,178 positions (the mean of a batch of the 1M-interaction
  generated log), 4,096 shared popularity negatives (``train.loss=auto`` past
  ``full_softmax_max_items``), width 64, logQ-corrected, with accidental hits. h2rec's fused
  function turns the negative logits into probabilities in place; the peer concatenates the
  positive and negative logits, masks the hits and calls ``torch.logsumexp``.
- ``full softmax``: MovieLens-1M's shape (21,000 positions, 3,416 items, width 128), h2rec's
  fused function against ``F.cross_entropy(user @ items.T)``.

Each fused loss also runs with a fresh logits buffer every step ("fresh buffers"), as it did
before the buffer pool of ``h2rec.losses``: the difference is the kernel's page faulting and
zeroing of a block that glibc hands back and maps again each step.

One thread (``torch.set_num_threads(1)``), as the training benchmarks run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FULL, record
from h2rec.losses import shared_sampled_softmax

V, S, E, N_ITEMS = (2178, 4096, 64, 10_000) if FULL else (300, 512, 32, 2_000)


def _plain(user, pos, neg, targets, negatives, lq_pos, lq_neg):
    p = (user * pos).sum(-1) - lq_pos
    n = user @ neg.T - lq_neg[None, :]
    n = n.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([p[:, None], n], dim=1), dim=1) - p).mean()


@pytest.mark.parametrize("impl", ["h2rec-fused", "fused, fresh buffers", "plain-autograd"])
def test_shared_sampled_softmax_step(benchmark, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        table = torch.randn(N_ITEMS, E, generator=g) * 0.1
        popularity = torch.rand(N_ITEMS, generator=g) ** 4 + 1e-3
        log_q = torch.log(popularity / popularity.sum())
        targets = torch.multinomial(popularity, V, replacement=True, generator=g)
        negatives = torch.multinomial(popularity, S, replacement=True, generator=g)
        user = torch.randn(V, E, generator=g).requires_grad_()
        items = table.requires_grad_()
        fn = _plain if impl == "plain-autograd" else shared_sampled_softmax
        if impl == "fused, fresh buffers":  # a fresh (V, S) block each step, as before the pool
            from h2rec import losses

            monkeypatch.setattr(losses._POOL, "take", lambda numel, like: None)
        losses: list[float] = []

        def step() -> None:
            user.grad = items.grad = None
            loss = fn(user, items[targets], items[negatives], targets, negatives,
                      log_q[targets], log_q[negatives])
            loss.backward()
            losses.append(float(loss.detach()))

        benchmark.group = "shared sampled softmax, forward + backward"
        benchmark.pedantic(step, rounds=5 if FULL else 1, iterations=1, warmup_rounds=1)
        record(benchmark, positions=V, negatives=S, width=E, loss=losses[-1])
        # both compute the same loss (the tests check the gradients against each other)
        want = _plain(user.detach(), table.detach()[targets], table.detach()[negatives], targets,
                      negatives, log_q[targets], log_q[negatives])
        assert losses[-1] == pytest.approx(float(want), rel=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", ["h2rec-fused", "fused, fresh buffers", "plain-autograd"])
def test_full_softmax_step(benchmark, impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # MovieLens-1M's shape when full (21,000 positions of a max_len-200 batch, 3,416 items,
    # width 128): h2rec's fused function with its buffer pool, the same without the pool (a
    # fresh 287 MB block each step, page-faulted and zeroed by the kernel), and the plain
    # F.cross_entropy of the logits
    from h2rec import losses
    from h2rec.losses import fused_full_softmax

    v, n, e = (21_000, 3_416, 128) if FULL else (2_000, 1_000, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        user = torch.randn(v, e, generator=g).requires_grad_()
        items = (torch.randn(n, e, generator=g) * 0.1).requires_grad_()
        targets = torch.randint(0, n, (v,), generator=g)
        if impl == "fused, fresh buffers":
            monkeypatch.setattr(losses._POOL, "take", lambda numel, like: None)
        if impl == "plain-autograd":
            def fn() -> torch.Tensor:
                return torch.nn.functional.cross_entropy(user @ items.T, targets)
        else:
            def fn() -> torch.Tensor:
                return fused_full_softmax(user, items, targets, max_logits=128 * 2**20)
        values: list[float] = []

        def step() -> None:
            user.grad = items.grad = None
            loss = fn()
            loss.backward()
            values.append(float(loss.detach()))

        benchmark.group = "full softmax, forward + backward"
        benchmark.pedantic(step, rounds=5 if FULL else 1, iterations=1, warmup_rounds=1)
        record(benchmark, positions=v, items=n, width=e, loss=values[-1])
        want = torch.nn.functional.cross_entropy(user.detach() @ items.detach().T, targets)
        assert values[-1] == pytest.approx(float(want), rel=1e-5)
    finally:
        torch.set_num_threads(threads)
        losses._POOL.clear()
