"""Evaluation: metrics against hand-worked rankings, pessimistic ties, history exclusion,
the sampled protocol, groups, and a slow numpy oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from h2rec import _core
from h2rec.config import EvalConfig
from h2rec.errors import ConfigError
from h2rec.evaluate import (
    bucket_labels,
    evaluate,
    full_ranks,
    left_padded_inputs,
    rank_metrics,
    ranks_against,
    recommend_top_k,
)
from torch import nn


class LastItemModel(nn.Module):
    """Test oracle model: the score of item i after last item l is ``table[l, i]``.

    States are rows of ``table`` (one-hot item vectors), so every score is known by hand."""

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table[seq]  # (B, T, N + 1)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return torch.eye(self.table.shape[1])[items]

    def all_item_vectors(self) -> torch.Tensor:
        return torch.eye(self.table.shape[1])


def _hand_case() -> tuple[_core.SequenceStore, LastItemModel]:
    # users: u0 = 1 2 3 4 5, u1 = 2 3 6, u2 = 1 6 (too short: not evaluated)
    store = _core.SequenceStore.from_sequences([[1, 2, 3, 4, 5], [2, 3, 6], [1, 6]], n_items=6)
    table = np.zeros((7, 7))
    table[3] = [0, 5, 4, 3, 2, 2, 1]  # after item 3
    table[2] = [0, 1, 9, 7, 1, 8, 7]  # after item 2
    table[4] = 0.0  # after item 4: every item ties
    return store, LastItemModel(table)


KS = (1, 2, 10)


def test_hand_worked_valid_ranking_with_history_excluded() -> None:
    store, model = _hand_case()
    res = evaluate(model, store, "valid", EvalConfig(ks=KS), max_len=4)
    # u0: input 1 2 3 -> target 4 (score 2); history 1 2 3 excluded; 5 ties (2), 6 lower -> rank 1
    # u1: input 2 -> target 3 (score 7); 5 beats it (8), 6 ties (7) -> rank 2
    assert res.users.tolist() == [0, 1]
    assert res.targets.tolist() == [4, 3]
    assert res.ranks.tolist() == [1, 2]
    assert res.n_candidates == 6
    m = res.metrics
    assert m["HR@1"] == 0.0 and m["HR@2"] == 0.5 and m["HR@10"] == 1.0
    assert m["NDCG@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_history_included_on_request() -> None:
    store, model = _hand_case()
    res = evaluate(model, store, "valid", EvalConfig(ks=KS, exclude_history=False), max_len=4)
    # u0: 1 2 3 score higher (5 4 3), 5 ties -> 4; u1: 2 (9) and 5 (8) higher, 6 ties -> 3
    assert res.ranks.tolist() == [4, 3]


def test_ties_are_pessimistic() -> None:
    store, model = _hand_case()
    res = evaluate(model, store, "test", EvalConfig(ks=KS), max_len=4)
    # u0: input 1..4, target 5, all scores 0; only item 6 competes and it ties -> rank 1
    # u1: input 2 3, target 6 (score 1) below 1, 4, 5 (5, 2, 2); 2 and 3 excluded -> rank 3
    assert res.ranks.tolist() == [1, 3]
    res = evaluate(model, store, "test", EvalConfig(ks=KS, exclude_history=False), max_len=4)
    assert res.ranks.tolist() == [5, 5]  # u0: ties with all five others; u1: 1 2 3 4 5 beat it


def test_constant_model_gets_no_credit() -> None:
    store = _core.SequenceStore.from_sequences([[1, 2, 3], [4, 5, 6, 7]], n_items=9)
    model = LastItemModel(np.zeros((10, 10)))
    res = evaluate(model, store, "test", EvalConfig(), max_len=5)
    # every competitor ties: rank = n_items - 1 - len(history)
    assert res.ranks.tolist() == [9 - 1 - 2, 9 - 1 - 3]
    assert res.metrics["HR@5"] == 0.0 and res.metrics["NDCG@5"] == 0.0


def test_nan_scores_rank_last() -> None:
    store, _ = _hand_case()
    table = np.zeros((7, 7))
    table[3] = [0, 1, 1, 1, np.nan, 1, 1]
    res = evaluate(LastItemModel(table), store, "valid", EvalConfig(ks=KS), max_len=4)
    assert res.ranks[0] == 2  # target 4 is NaN: items 5 and 6 beat it


def test_rank_metrics_hand_computed() -> None:
    m = rank_metrics(np.array([0, 1, 4, 10, 25]), (5, 10, 20))
    assert m["HR@5"] == pytest.approx(0.6)
    assert m["HR@10"] == pytest.approx(0.6)  # rank 10 is the 11th item
    assert m["HR@20"] == pytest.approx(0.8)
    assert m["NDCG@5"] == pytest.approx((1 + 0.6309297536 + 0.3868528072) / 5)
    assert m["NDCG@20"] == pytest.approx((1 + 0.6309297536 + 0.3868528072 + 0.2789429456) / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11 + 1 / 26) / 5)


def _random_case(seed: int, n_items: int = 40, n_users: int = 30, integer: bool = False):
    rng = np.random.default_rng(seed)
    seqs = [
        rng.integers(1, n_items + 1, size=int(rng.integers(3, 15))).tolist() for _ in range(n_users)
    ]
    store = _core.SequenceStore.from_sequences(seqs, n_items=n_items)
    table = (
        rng.integers(0, 4, (n_items + 1, n_items + 1))
        if integer
        else rng.normal(size=(n_items + 1, n_items + 1))
    )
    return seqs, store, LastItemModel(table), table


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("exclude", [True, False])
def test_full_ranking_matches_numpy_oracle(integer: bool, split: str, exclude: bool) -> None:
    seqs, store, model, table = _random_case(7, integer=integer)
    holdout = 2 if split == "valid" else 1
    res = evaluate(
        model, store, split, EvalConfig(exclude_history=exclude, batch_size=7), max_len=6
    )
    expected = []
    for seq in seqs:
        if len(seq) < 3:
            continue
        inputs, target = seq[: len(seq) - holdout], seq[len(seq) - holdout]
        scores = table[inputs[-1]]
        seen = set(inputs) if exclude else set()
        rank = sum(
            1
            for i in range(1, len(scores))
            if i != target and i not in seen and scores[i] >= scores[target]
        )
        expected.append(rank)
    assert res.ranks.tolist() == expected


def test_sampled_protocol_is_fixed_by_seed_and_matches_oracle() -> None:
    seqs, store, model, table = _random_case(3, n_items=300, n_users=25)
    cfg = EvalConfig(protocol="sampled", n_negatives=100, seed=11, batch_size=8)
    a = evaluate(model, store, "test", cfg, max_len=6)
    b = evaluate(model, store, "test", cfg, max_len=6)
    assert a.ranks.tolist() == b.ranks.tolist()
    assert a.n_candidates == 101
    # oracle: the same candidates scored in numpy
    cands = _core.sample_candidates(store, a.users, a.targets, 100, 11)
    assert (cands[:, 0] == a.targets).all()
    for row, u in enumerate(a.users):
        touched = set(seqs[u])
        assert not touched & set(cands[row, 1:].tolist())
        assert len(set(cands[row, 1:].tolist())) == 100
    last = np.array([seqs[u][-2] for u in a.users])
    scores = table[last[:, None], cands]  # (U, 101)
    expected = (scores[:, 1:] >= scores[:, :1]).sum(1)
    assert a.ranks.tolist() == expected.tolist()
    other = evaluate(model, store, "test", EvalConfig(protocol="sampled", seed=12), max_len=6)
    assert not np.array_equal(_core.sample_candidates(store, a.users, a.targets, 100, 12), cands)
    assert other.users.tolist() == a.users.tolist()


def test_popularity_groups_pareto_and_threshold() -> None:
    # training prefix = first item only, so training popularity = users starting with the item:
    # item 1: 0, items 2..8: 1 each, item 9: 5, item 10: 9 (21 users)
    firsts = [2, 3, 4, 5, 6, 7, 8] + [9] * 5 + [10] * 9
    valid_targets = [10] * 4 + [9] * 3 + [1] * 2 + [2] * 12
    seqs = [[f, t, 3] for f, t in zip(firsts, valid_targets)]
    store = _core.SequenceStore.from_sequences(seqs, n_items=10)
    assert store.popularity(holdout=2).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 5, 9]
    model = LastItemModel(np.random.default_rng(0).normal(size=(11, 11)))
    res = evaluate(model, store, "valid", EvalConfig(), max_len=3)
    g = res.groups
    # Pareto: the 8 least popular items (popularity <= 1) are the tail; head = items 9 and 10
    assert res.thresholds["head_min_popularity"] == 2
    assert g["head"]["n"] == 7 and g["tail"]["n"] == 14
    assert g["unseen"]["n"] == 2
    assert g["pop_1-9"]["n"] == 19 and g["pop_10-29"]["n"] == 0 and g["pop_>=100"]["n"] == 0
    assert g["pop_10-29"]["NDCG@10"] is None
    head = np.isin(res.targets, [9, 10])
    assert g["head"]["MRR"] == pytest.approx(np.mean(1 / (res.ranks[head] + 1)))
    assert g["tail"]["HR@20"] == pytest.approx(np.mean(res.ranks[~head] < 20))
    # fixed threshold: head = popularity >= 6 -> only item 10
    res = evaluate(model, store, "valid", EvalConfig(head_threshold=6), max_len=3)
    assert res.groups["head"]["n"] == 4 and res.groups["tail"]["n"] == 17


def test_user_length_groups() -> None:
    # valid input lengths 1..10
    seqs = [list(range(1, n + 1)) + [11, 12] for n in range(1, 11)]
    store = _core.SequenceStore.from_sequences(seqs, n_items=12)
    model = LastItemModel(np.random.default_rng(1).normal(size=(13, 13)))
    res = evaluate(model, store, "valid", EvalConfig(), max_len=4)
    assert res.input_lengths.tolist() == list(range(1, 11))
    assert res.groups["long"]["n"] == 2 and res.groups["short"]["n"] == 8
    res = evaluate(model, store, "valid", EvalConfig(long_threshold=5), max_len=4)
    assert res.groups["long"]["n"] == 6 and res.groups["short"]["n"] == 4


def test_bucket_labels() -> None:
    assert bucket_labels((10, 30, 60, 100)) == ["1-9", "10-29", "30-59", "60-99", ">=100"]


def test_left_padded_inputs_match_sequences() -> None:
    seqs = [[1, 2, 3, 4, 5], [6], [7, 8]]
    store = _core.SequenceStore.from_sequences(seqs, n_items=8)
    x, lengths = left_padded_inputs(store, np.array([0, 1, 2]), 1, 3)
    assert x.tolist() == [[2, 3, 4], [0, 0, 0], [0, 0, 7]]
    assert lengths.tolist() == [4, 0, 1]
    inputs, _ = store.eval_inputs(np.array([0]), 3, "test")  # the Rust split agrees
    assert inputs.tolist() == x[[0]].tolist()


def test_recommend_excludes_history_and_breaks_ties_by_id() -> None:
    store, _ = _hand_case()
    table = np.zeros((7, 7))
    table[5] = [0, 9, 9, 9, 9, 9, 1]  # u0 ends with 5: all seen items score high
    table[6] = [0, 3, 3, 2, 4, 3, 0]  # u1 and u2 end with 6
    model = LastItemModel(table)
    items, scores = recommend_top_k(model, store, np.array([0, 1, 2]), 3, max_len=5)
    # u0 has seen 1..5: only 6 is left, then padding
    assert items[0].tolist() == [6, 0, 0] and scores[0, 0] == 1 and np.isneginf(scores[0, 1])
    # u1 has seen 2 3 6: 4 (4) then 1 and 5 tie at 3 -> lower id first
    assert items[1].tolist() == [4, 1, 5]
    # u2 has seen 1 6: 4, then 2 and 5 tie at 3
    assert items[2].tolist() == [4, 2, 5]
    items, _ = recommend_top_k(model, store, np.array([0]), 2, max_len=5, exclude_history=False)
    assert items[0].tolist() == [1, 2]


def test_full_ranks_equal_the_masked_ranking() -> None:
    # the counting ranker against the mask-based one, with ties (repeated item vectors),
    # duplicated history items and targets that are also in the history; 150 users span three
    # of the CPU's row blocks, the last one partial
    rng = np.random.default_rng(5)
    n, b, e = 30, 150, 4
    base = rng.integers(-2, 3, size=(n + 1, e)).astype(np.float32)  # many exact ties
    base[0] = 0.0
    items_all = torch.from_numpy(base)
    states = torch.from_numpy(rng.integers(-2, 3, size=(b, e)).astype(np.float32))
    targets = rng.integers(1, n + 1, size=b)
    lengths = rng.integers(0, 8, size=b)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hist = rng.integers(1, n + 1, size=int(offsets[-1]))
    hist[offsets[:-1][lengths > 0]] = targets[lengths > 0]  # the target was seen before
    got = full_ranks(states, items_all, targets, offsets, hist)
    scores = states @ items_all.T
    competing = torch.ones_like(scores, dtype=torch.bool)
    competing[:, 0] = False
    rows = np.repeat(np.arange(b), lengths)
    competing[torch.from_numpy(rows), torch.from_numpy(hist)] = False
    tgt = torch.from_numpy(targets)
    competing[torch.arange(b), tgt] = False
    want = ranks_against(scores, scores[torch.arange(b), tgt], competing)
    assert got.tolist() == want.tolist()
    no_hist = full_ranks(states, items_all, targets, None, None)
    competing = torch.ones_like(scores, dtype=torch.bool)
    competing[:, 0] = False
    competing[torch.arange(b), tgt] = False
    assert no_hist.tolist() == ranks_against(scores, scores[torch.arange(b), tgt], competing).tolist()


def test_score_budget_and_batch_size_do_not_change_ranks() -> None:
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 41, size=rng.integers(3, 15)).tolist() for _ in range(60)]
    store = _core.SequenceStore.from_sequences(seqs, n_items=40)
    model = LastItemModel(rng.normal(size=(41, 41)))
    ref = evaluate(model, store, "test", EvalConfig(ks=KS), max_len=6)
    for batch, mb in ((1, 256), (7, 256), (500, 256), (256, 1)):
        res = evaluate(model, store, "test", EvalConfig(ks=KS, batch_size=batch, max_scores_mb=mb), 6)
        assert res.ranks.tolist() == ref.ranks.tolist()
        assert res.targets.tolist() == ref.targets.tolist()


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_thread_count_does_not_change_ranks_and_is_restored(protocol: str) -> None:
    # with n > 1 torch threads the batches run on n worker threads of one op-thread each: the
    # ranks must be the same bits as one thread's, in the users' order, and the count restored
    from h2rec.models import ModelConfig, build_model

    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, 81, size=rng.integers(3, 25)).tolist() for _ in range(300)]
    store = _core.SequenceStore.from_sequences(seqs, n_items=80)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="sasrec", hidden=16, max_len=12), 80)
    cfg = EvalConfig(ks=KS, batch_size=16, protocol=protocol, n_negatives=20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = evaluate(model, store, "test", cfg, max_len=12)
        torch.set_num_threads(3)
        three = evaluate(model, store, "test", cfg, max_len=12)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert one.ranks.tolist() == three.ranks.tolist()
    assert one.targets.tolist() == three.targets.tolist()
    assert one.users.tolist() == three.users.tolist()
    # and the ranks are those of a plain per-user loop (the oracle: the model's own scores)
    with torch.no_grad():
        model.eval()
        for i, u in enumerate(one.users[:40].tolist()):
            seq = store.sequence(u)
            inp, tgt = seq[:-1][-12:], int(seq[-1])
            state = model(torch.as_tensor(inp)[None])[0, -1]
            scores = (model.all_item_vectors() @ state).numpy()
            if protocol == "sampled":
                continue
            hist = set(seq[:-1].tolist()) - {tgt}
            rivals = [j for j in range(1, 81) if j != tgt and j not in hist]
            assert one.targets[i] == tgt
            assert one.ranks[i] == sum(scores[j] >= scores[tgt] for j in rivals)


def test_batches_of_the_plan_evaluate_to_the_bits_of_the_whole() -> None:
    # how DDP ranks share an evaluation: the users of some batches of the plan, passed in plan
    # order, are evaluated in those very batches (the same trims), so a SASRec's ranks are the
    # whole evaluation's bits; the batches cover every evaluated user once, longest first
    from h2rec.evaluate import batch_plan, eval_users
    from h2rec.models import ModelConfig, build_model

    rng = np.random.default_rng(8)
    seqs = [rng.integers(1, 61, size=rng.integers(3, 30)).tolist() for _ in range(150)]
    store = _core.SequenceStore.from_sequences(seqs, n_items=60)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="sasrec", hidden=16, max_len=24), 60)
    cfg = EvalConfig(ks=KS, batch_size=16)
    whole = evaluate(model, store, "valid", cfg, max_len=24)
    plan = batch_plan(model, store, "valid", cfg, max_len=24)
    assert all(b.size == 16 for b in plan[:-1]) and 1 <= plan[-1].size <= 16
    assert sorted(np.concatenate(plan).tolist()) == eval_users(store).tolist()
    lengths = [min(store.lengths()[b].max(), 26) for b in plan]
    assert lengths == sorted(lengths, reverse=True)
    by_user = dict(zip(whole.users.tolist(), whole.ranks.tolist()))
    for rank, world in ((0, 2), (1, 2), (2, 3)):
        share = np.concatenate(plan[rank::world])
        # the batches evaluate runs on the share are those very batches (a user's state
        # depends on its batch's trim: users[rank::world] would regroup them)
        again = batch_plan(model, store, "valid", cfg, max_len=24, users=share)
        assert [b.tolist() for b in again] == [b.tolist() for b in plan[rank::world]]
        part = evaluate(model, store, "valid", cfg, max_len=24, users=share)
        assert part.ranks.tolist() == [by_user[u] for u in part.users.tolist()]
    with pytest.raises(ConfigError, match="split"):
        batch_plan(model, store, "train", cfg, max_len=24)  # type: ignore[arg-type]


def test_a_worker_error_reaches_the_caller() -> None:
    store = _core.SequenceStore.from_sequences([[1, 2, 3, 4, 5, 6]] * 40, n_items=6)
    model = LastItemModel(np.zeros((7, 7)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ConfigError, match="eval.n_negatives=50"):
            evaluate(model, store, "test", EvalConfig(protocol="sampled", n_negatives=50, batch_size=4), 6)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_user_sample_is_fixed_by_the_seed_and_ranks_as_those_users_alone() -> None:
    seqs, store, model, _ = _random_case(5, n_users=60)
    every = evaluate(model, store, "test", EvalConfig(batch_size=7), max_len=6)
    cfg = EvalConfig(batch_size=7, sample_users=17, seed=4)
    a = evaluate(model, store, "valid", cfg, max_len=6)
    b = evaluate(model, store, "test", cfg, max_len=6)
    # the same 17 users for both splits, in user order, all of them evaluable
    assert a.users.tolist() == b.users.tolist() and len(set(b.users.tolist())) == 17
    assert b.users.tolist() == sorted(b.users.tolist())
    assert set(b.users.tolist()) <= set(every.users.tolist())
    # each sampled user's rank is its rank in the evaluation of everyone
    rank_of = dict(zip(every.users.tolist(), every.ranks.tolist()))
    assert b.ranks.tolist() == [rank_of[u] for u in b.users.tolist()]
    other = evaluate(model, store, "test", EvalConfig(batch_size=7, sample_users=17, seed=5), 6)
    assert other.users.tolist() != b.users.tolist()
    # a sample as large as the population is the population
    whole = evaluate(model, store, "test", EvalConfig(batch_size=7, sample_users=10_000), 6)
    assert whole.users.tolist() == every.users.tolist()
    with pytest.raises(ConfigError, match="eval.sample_users"):
        EvalConfig(sample_users=-1)
