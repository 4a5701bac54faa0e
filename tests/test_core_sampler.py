"""TrainSampler and evaluation candidates, against a per-user Python oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2rec import SequenceStore, TrainSampler, sample_candidates


def random_store(seed: int, n_users: int = 300, n_items: int = 200) -> tuple[list[list[int]], SequenceStore]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, n_items + 1, size=rng.integers(3, 40)).tolist() for _ in range(n_users)]
    return seqs, SequenceStore.from_sequences(seqs, n_items=n_items)


def collect(sampler: TrainSampler, epoch: int, **kw) -> list[tuple[np.ndarray, ...]]:
    return [tuple(a.copy() for a in b) for b in sampler.epoch(epoch, **kw)]


def test_batches_match_the_oracle():
    seqs, store = random_store(0)
    smp = TrainSampler(store, max_len=10, batch_size=64, n_negatives=3, seed=7)
    order = smp.batch_users(2)
    # users with a training prefix of >= 2 items (all here: length >= 3 -> prefix >= 1; filter)
    eligible = [u for u, q in enumerate(seqs) if len(q) >= 4]
    assert sorted(order.tolist()) == eligible
    assert smp.n_users == len(eligible) and smp.n_batches == len(smp) == -(-len(eligible) // 64)
    batches = collect(smp, 2)
    assert len(batches) == smp.n_batches
    rows = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    negs = np.concatenate([b[2] for b in batches])
    for r, u in enumerate(order):
        prefix = seqs[u][:-2]
        inp, tgt = prefix[:-1][-10:], prefix[1:][-10:]
        pad = 10 - len(inp)
        assert rows[0][r].tolist() == [0] * pad + inp
        assert rows[1][r].tolist() == [0] * pad + tgt
        hist = set(seqs[u][:-2])  # the training prefix: held-out items may be negatives
        for t in range(10):
            if t < pad:
                assert (negs[r, t] == 0).all()
            else:
                assert all(1 <= v <= 200 and v not in hist for v in negs[r, t])


def test_last_only_keeps_one_target_per_row():
    seqs, store = random_store(1)
    smp = TrainSampler(store, max_len=8, batch_size=50, seed=1, last_only=True)
    for inp, tgt, neg in smp.epoch(0):
        assert ((tgt != 0).sum(1) == 1).all()
        assert (tgt[:, -1] != 0).all()
        assert ((neg[..., 0] != 0) == (tgt != 0)).all()
        assert (inp[:, -1] != 0).all()


def test_seeds_epochs_and_threads():
    _, store = random_store(2)
    a = collect(TrainSampler(store, 12, 32, n_negatives=2, seed=3, n_threads=1), 4)
    b = collect(TrainSampler(store, 12, 32, n_negatives=2, seed=3, n_threads=2), 4)
    c = collect(TrainSampler(store, 12, 32, n_negatives=2, seed=3), 5)
    d = collect(TrainSampler(store, 12, 32, n_negatives=2, seed=4), 4)
    assert all(all((x == y).all() for x, y in zip(p, q)) for p, q in zip(a, b))
    assert not all((p[0] == q[0]).all() for p, q in zip(a, c))
    assert not all((p[2] == q[2]).all() for p, q in zip(a, d))


def test_negatives_do_not_depend_on_batch_size():
    _, store = random_store(3)
    big = TrainSampler(store, 6, 1000, seed=9)
    small = TrainSampler(store, 6, 7, seed=9)
    (inp, tgt, neg), = list(big.epoch(1))
    rows = {}
    for (i2, t2, n2), users in zip(small.epoch(1), np.array_split(small.batch_users(1), range(7, small.n_users, 7))):
        for r, u in enumerate(users):
            rows[int(u)] = n2[r]
    for r, u in enumerate(big.batch_users(1)):
        np.testing.assert_array_equal(neg[r], rows[int(u)])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_partition_the_epoch(world: int):
    # every training user once an epoch across the ranks, as many steps on every rank, and
    # batch r + world * i of the one-process epoch on rank r until the last round
    _, store = random_store(4, n_users=101)
    smp = TrainSampler(store, 5, 10, seed=0)
    full = collect(smp, 0)
    ranks = [collect(smp, 0, rank=r, world_size=world) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1
    order = smp.batch_users(0)
    # the oracle: which users a batch holds, read from its inputs (each row is one user's
    # left-padded prefix; users' prefixes differ in this store)
    prefixes = {}
    for u in order.tolist():
        seq = store.sequence(int(u))[:-2]
        prefixes[tuple(seq[-(5 + 1):-1][-5:].tolist())] = int(u)
    def users_of(batch) -> list[int]:
        return [prefixes[tuple(row[row > 0].tolist())] for row in batch[0]]
    trained = sorted(u for r in ranks for b in r for u in users_of(b))
    assert trained == sorted(order.tolist())
    for r, batches in enumerate(ranks):
        for i, b in enumerate(batches[:-1]):
            assert (b[0] == full[r + world * i][0]).all()
        assert 1 <= batches[-1][0].shape[0] <= 10 + 1


def test_popularity_negatives_follow_popularity():
    # item 1 is in every training prefix; items 2..50 appear once each
    seqs = [[1, 1 + (u % 49) + 1, 60, 61] for u in range(2000)]
    store = SequenceStore.from_sequences(seqs, n_items=200)
    smp = TrainSampler(store, 3, 256, n_negatives=4, seed=0, negative_sampling="popularity")
    negs = np.concatenate([b[2][b[1] != 0].ravel() for b in smp.epoch(0)])
    assert negs.min() >= 2 and negs.max() <= 50  # drawn only where training popularity is > 0


@given(st.integers(0, 2**32), st.integers(1, 5), st.integers(1, 30))
@settings(max_examples=25, deadline=None)
def test_properties_hold_for_any_seed(seed, n_neg, max_len):
    seqs, store = random_store(seed % 1000, n_users=40, n_items=60)
    smp = TrainSampler(store, max_len, 16, n_negatives=n_neg, seed=seed)
    order = smp.batch_users(0)
    row = 0
    for inp, tgt, neg in smp.epoch(0):
        assert inp.shape == tgt.shape and neg.shape == inp.shape + (n_neg,)
        for r in range(inp.shape[0]):
            real = np.flatnonzero(inp[r])
            # padding only on the left, targets are the next items
            assert (real == np.arange(max_len - len(real), max_len)).all()
            seq = seqs[order[row]]
            prefix = seq[:-2]
            assert tgt[r][real].tolist() == prefix[1:][-len(real):]
            assert not set(neg[r][real].ravel()) & set(prefix) and (neg[r][real] > 0).all()
            row += 1


def test_candidates():
    seqs, store = random_store(5)
    users = np.arange(store.n_users)
    targets = np.array([q[-1] for q in seqs])
    c1 = sample_candidates(store, users, targets, n_negatives=50, seed=11, n_threads=1)
    c2 = sample_candidates(store, users, targets, n_negatives=50, seed=11, n_threads=2)
    np.testing.assert_array_equal(c1, c2)
    assert c1.shape == (store.n_users, 51)
    np.testing.assert_array_equal(c1[:, 0], targets)
    for u in users:
        negs = c1[u, 1:]
        assert len(set(negs)) == 50 and not set(negs) & set(seqs[u])
    # a user's candidates do not depend on who else is in the batch
    part = sample_candidates(store, users[::-3], targets[::-3], n_negatives=50, seed=11)
    np.testing.assert_array_equal(part, c1[::-3])
    assert not (sample_candidates(store, users, targets, n_negatives=50, seed=12) == c1).all()


def test_candidates_exhaust_the_catalogue_exactly():
    store = SequenceStore.from_sequences([[1, 2, 3]], n_items=6)
    c = sample_candidates(store, [0], [3], n_negatives=3)
    assert sorted(c[0, 1:].tolist()) == [4, 5, 6]
    with pytest.raises(ValueError, match="only 3 untouched items"):
        sample_candidates(store, [0], [3], n_negatives=4)


def test_trimmed_bucketed_batches_are_the_full_batches_without_padding_columns():
    seqs, store = random_store(5)
    full = TrainSampler(store, 12, 16, n_negatives=2, seed=3, bucket_batches=4)
    cut = TrainSampler(store, 12, 16, n_negatives=2, seed=3, bucket_batches=4, trim=True)
    assert full.batch_users(1).tolist() == cut.batch_users(1).tolist()
    widths = []
    for (fi, ft, fn), (ci, ct, cn) in zip(full.epoch(1), cut.epoch(1)):
        w = ci.shape[1]
        widths.append(w)
        assert (fi[:, : 12 - w] == 0).all() and (ci[:, 0] != 0).any()  # cut to the longest row
        np.testing.assert_array_equal(ci, fi[:, 12 - w :])
        np.testing.assert_array_equal(ct, ft[:, 12 - w :])
        np.testing.assert_array_equal(cn, fn[:, 12 - w :])
    assert min(widths) < 12


def test_length_buckets_keep_every_user_once_and_group_lengths():
    seqs, store = random_store(6, n_users=500)
    plain = TrainSampler(store, 50, 20, seed=1)
    buck = TrainSampler(store, 50, 20, seed=1, bucket_batches=8, trim=True)
    one = TrainSampler(store, 50, 20, seed=1, bucket_batches=8, trim=True, n_threads=1)
    for epoch in (0, 1):
        order = buck.batch_users(epoch)
        assert sorted(order.tolist()) == sorted(plain.batch_users(epoch).tolist())
        a, b = collect(buck, epoch), collect(one, epoch)
        assert all(all((x == y).all() for x, y in zip(p, q)) for p, q in zip(a, b))
    assert buck.batch_users(0).tolist() != buck.batch_users(1).tolist()
    # positions per row: in bucketed batches rows have similar lengths (little padding)
    def padding(sampler):
        real = total = 0
        for inp, _, _ in sampler.epoch(0):
            real += int((inp != 0).sum())
            total += inp.size
        return 1 - real / total
    plain_cut = TrainSampler(store, 50, 20, seed=1, trim=True)
    assert padding(buck) < 0.5 * padding(plain_cut)
    # ranks still take the epoch's batches whole, but for the last round (split between them)
    full = collect(buck, 0)
    r0, r1 = collect(buck, 0, rank=0, world_size=2), collect(buck, 0, rank=1, world_size=2)
    assert len(r0) == len(r1)
    for i, batch in enumerate(r1[:-1]):
        assert (batch[0] == full[2 * i + 1][0]).all()
    assert sum(b[0].shape[0] for b in r0 + r1) == sum(b[0].shape[0] for b in full)


def test_bucket_batches_must_not_be_negative():
    _, store = random_store(7, n_users=20)
    with pytest.raises(ValueError, match="bucket_batches=-1"):
        TrainSampler(store, 5, 4, bucket_batches=-1)


@pytest.mark.parametrize("buckets,trim", [(0, False), (3, True)])
def test_windows_rows_are_every_window_of_every_long_prefix(buckets: int, trim: bool):
    seqs, store = random_store(5)
    L = 6
    smp = TrainSampler(store, max_len=L, batch_size=32, n_negatives=2, seed=3, windows=True,
                       bucket_batches=buckets, trim=trim)
    # the oracle: a prefix of P transitions gives ceil(P / L) windows, the last L transitions,
    # the L before them, ... (the first may be shorter), each padded on the left to L
    want: dict[int, list[tuple[list[int], list[int]]]] = {}
    for u, q in enumerate(seqs):
        prefix = q[:-2]
        p = len(prefix) - 1
        for w in range(-(-p // L)):
            end = p - w * L
            start = max(end - L, 0)
            pad = L - (end - start)
            want.setdefault(u, []).append(
                ([0] * pad + prefix[start:end], [0] * pad + prefix[start + 1 : end + 1])
            )
    assert smp.n_rows == sum(len(v) for v in want.values()) > smp.n_users
    for epoch in (0, 1):
        order = smp.batch_users(epoch)
        got: dict[int, list[tuple[list[int], list[int]]]] = {}
        r = 0
        for inp, tgt, neg in smp.epoch(epoch):
            width = inp.shape[1]
            for i in range(inp.shape[0]):
                u = int(order[r])
                row = ([0] * (L - width) + inp[i].tolist(), [0] * (L - width) + tgt[i].tolist())
                got.setdefault(u, []).append(row)
                hist = set(seqs[u][:-2])
                real = tgt[i] != 0
                assert all(1 <= v <= 200 and v not in hist for v in neg[i][real].ravel())
                assert (neg[i][~real] == 0).all()
                r += 1
        assert r == smp.n_rows
        assert {u: sorted(v) for u, v in got.items()} == {u: sorted(v) for u, v in want.items()}


def test_without_windows_a_long_prefix_trains_its_last_positions_only():
    seqs, store = random_store(6)
    plain = TrainSampler(store, max_len=6, batch_size=32, seed=3)
    assert plain.n_rows == plain.n_users
    # window 0 of each user is its row without windows, negatives included
    windowed = TrainSampler(store, max_len=6, batch_size=32, seed=3, windows=True)
    firsts: dict[int, tuple[list[int], list[int], list[list[int]]]] = {}
    r = 0
    order = windowed.batch_users(4)
    for inp, tgt, neg in windowed.epoch(4):
        for i in range(inp.shape[0]):
            u = int(order[r])
            prefix = seqs[u][:-2]
            k = min(len(prefix) - 1, 6)
            last = ([0] * (6 - k) + prefix[-k - 1 : -1], [0] * (6 - k) + prefix[-k:])
            if (inp[i].tolist(), tgt[i].tolist()) == last:  # the window ending the prefix
                assert u not in firsts
                firsts[u] = (inp[i].tolist(), tgt[i].tolist(), neg[i].tolist())
            r += 1
    r = 0
    order = plain.batch_users(4)
    for inp, tgt, neg in plain.epoch(4):
        for i in range(inp.shape[0]):
            assert firsts[int(order[r])] == (inp[i].tolist(), tgt[i].tolist(), neg[i].tolist())
            r += 1
    assert r == len(firsts)
