"""One epoch of training batches on Amazon Beauty (max_len 50, batch 256), four ways:

- ``python_loop``: a per-user Python loop, as in SASRec.pytorch's sampler (random_neq per item);
- ``torch_dataloader``: a torch ``Dataset`` + ``DataLoader`` (workers 0), as in LLM-ESR;
- ``numpy_vectorised``: our best vectorised numpy version (fancy indexing + vectorised
  rejection sampling against sorted (user, item) keys);
- ``h2rec``: the Rust ``TrainSampler``.

All four produce the same arrays for one epoch: inputs, targets (B, 50) and one negative per
position, drawn from items outside the user's training prefix, users shuffled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FULL, beauty_sequences
from h2rec import SequenceStore, TrainSampler

MAX_LEN, BATCH = 50, 256


@pytest.fixture(scope="module")
def beauty():
    seqs = beauty_sequences()
    store = SequenceStore.from_sequences(seqs)
    return seqs, store


def consume(batches) -> int:
    """Iterates an epoch the way a training loop does (one batch alive at a time) and returns
    the number of rows seen."""
    return sum(b[0].shape[0] for b in batches)


def python_loop_epoch(seqs, n_items, rng):
    users = rng.permutation(len(seqs))
    for start in range(0, len(users), BATCH):
        batch = []
        for u in users[start:start + BATCH]:
            train = seqs[u][:-2]
            if len(train) < 2:
                continue
            seen = set(train)
            seq = np.zeros(MAX_LEN, dtype=np.int64)
            pos = np.zeros(MAX_LEN, dtype=np.int64)
            neg = np.zeros(MAX_LEN, dtype=np.int64)
            nxt = train[-1]
            idx = MAX_LEN - 1
            for it in reversed(train[:-1]):
                seq[idx], pos[idx] = it, nxt
                t = rng.integers(1, n_items + 1)
                while t in seen:
                    t = rng.integers(1, n_items + 1)
                neg[idx] = t
                nxt = it
                idx -= 1
                if idx == -1:
                    break
            batch.append((seq, pos, neg))
        yield tuple(np.stack(a) for a in zip(*batch))


class SeqDataset(torch.utils.data.Dataset):
    def __init__(self, seqs, n_items, seed):
        self.seqs = [s for s in seqs if len(s) >= 4]
        self.seen = [set(s[:-2]) for s in self.seqs]
        self.n_items = n_items
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        train = self.seqs[i][:-2]
        inp = train[:-1][-MAX_LEN:]
        tgt = train[1:][-MAX_LEN:]
        neg = []
        for _ in tgt:
            t = int(self.rng.integers(1, self.n_items + 1))
            while t in self.seen[i]:
                t = int(self.rng.integers(1, self.n_items + 1))
            neg.append(t)
        pad = MAX_LEN - len(inp)
        return (torch.tensor([0] * pad + inp), torch.tensor([0] * pad + tgt),
                torch.tensor([0] * pad + neg))


class NumpySampler:
    """Vectorised numpy: all training positions of an epoch with fancy indexing, negatives by
    vectorised rejection against sorted user * (n + 1) + item keys."""

    def __init__(self, seqs, n_items, seed):
        keep = [s for s in seqs if len(s) >= 4]
        self.n_items = n_items
        lens = np.array([len(s) for s in keep])
        self.offsets = np.concatenate([[0], np.cumsum(lens)])
        self.items = np.concatenate([np.array(s) for s in keep])
        self.n_train = lens - 2  # training prefix length per user
        users = np.repeat(np.arange(len(keep)), lens)
        pos = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], lens)
        train = pos < np.repeat(self.n_train, lens)  # the training prefix of each user
        self.keys = np.unique(users[train] * (n_items + 1) + self.items[train])
        self.rng = np.random.default_rng(seed)

    def epoch(self):
        n_users = len(self.n_train)
        perm = self.rng.permutation(n_users)
        for start in range(0, n_users, BATCH):
            u = perm[start:start + BATCH]
            k = np.minimum(self.n_train[u] - 1, MAX_LEN)  # positions per row
            col = np.arange(MAX_LEN)[None, :]
            valid = col >= MAX_LEN - k[:, None]
            # index of the input item: prefix_end - 1 - (MAX_LEN - 1 - col)
            src = self.offsets[u][:, None] + self.n_train[u][:, None] - 1 - (MAX_LEN - col)
            inputs = np.where(valid, self.items[np.where(valid, src, 0)], 0)
            targets = np.where(valid, self.items[np.where(valid, src + 1, 0)], 0)
            rows = np.broadcast_to(u[:, None], valid.shape)[valid]
            neg = self.rng.integers(1, self.n_items + 1, size=rows.shape)
            bad = np.ones(rows.shape, dtype=bool)
            while bad.any():
                key = rows[bad] * (self.n_items + 1) + neg[bad]
                pos = np.searchsorted(self.keys, key)
                hit = self.keys[np.minimum(pos, len(self.keys) - 1)] == key
                idx = np.flatnonzero(bad)
                bad[idx[~hit]] = False
                neg[idx[hit]] = self.rng.integers(1, self.n_items + 1, size=hit.sum())
            negatives = np.zeros_like(inputs)
            negatives[valid] = neg
            yield inputs, targets, negatives


@pytest.mark.benchmark(group="sampling-epoch-beauty")
def test_python_loop(benchmark, beauty):
    seqs, store = beauty
    rng = np.random.default_rng(0)
    rows = benchmark.pedantic(lambda: consume(python_loop_epoch(seqs, store.n_items, rng)),
                              rounds=3 if FULL else 1)
    assert rows == TrainSampler(store, MAX_LEN, BATCH).n_users


@pytest.mark.benchmark(group="sampling-epoch-beauty")
def test_torch_dataloader(benchmark, beauty):
    seqs, store = beauty
    loader = torch.utils.data.DataLoader(SeqDataset(seqs, store.n_items, 0), batch_size=BATCH,
                                         shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    rows = benchmark.pedantic(lambda: consume(loader), rounds=3 if FULL else 1)
    assert rows == TrainSampler(store, MAX_LEN, BATCH).n_users


@pytest.mark.benchmark(group="sampling-epoch-beauty")
def test_numpy_vectorised(benchmark, beauty):
    seqs, store = beauty
    smp = NumpySampler(seqs, store.n_items, 0)
    rows = benchmark(lambda: consume(smp.epoch()))
    ours = TrainSampler(store, MAX_LEN, BATCH)
    assert rows == ours.n_users
    # the same number of training positions as the Rust sampler
    mine = sum(int((b[1] != 0).sum()) for b in smp.epoch())
    assert mine == sum(int((b[1] != 0).sum()) for b in ours.epoch(0))


@pytest.mark.benchmark(group="sampling-epoch-beauty")
def test_h2rec(benchmark, beauty):
    _, store = beauty
    smp = TrainSampler(store, MAX_LEN, BATCH, n_negatives=1, seed=0)
    epochs = iter(range(10**6))
    rows = benchmark(lambda: consume(smp.epoch(next(epochs))))
    assert rows == smp.n_users
