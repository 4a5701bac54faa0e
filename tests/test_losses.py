"""Losses against hand-computed values, the sparse positive matrix against a dense oracle, and
the H2Rec alignment losses wired to them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from h2rec.errors import ConfigError, DataError
from h2rec.losses import (
    bce_loss,
    full_softmax_loss,
    fused_full_softmax,
    item_alignment_loss,
    item_alignment_loss_pairs,
    mask_lowest_levels,
    multi_positive_info_nce,
    recommendation_loss,
    sampled_softmax_loss,
    shared_sampled_softmax,
    symmetric_info_nce,
)
from h2rec.models import CooccurrencePositives, H2Rec, ModelConfig, build_model, tuple_groups


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- recommendation


def test_bce_by_hand() -> None:
    pos = torch.tensor([[0.5, -1.0, 2.0]])
    neg = torch.tensor([[[0.1, 0.7], [0.3, -0.4], [-0.2, 1.5]]])
    targets = torch.tensor([[0, 3, 5]])  # position 0 has no target
    # -log sigmoid(p) = softplus(-p); -log(1 - sigmoid(n)) = softplus(n)
    p1 = softplus(1.0) + softplus(0.3) + softplus(-0.4)
    p2 = softplus(-2.0) + softplus(-0.2) + softplus(1.5)
    assert float(bce_loss(pos, neg, targets)) == pytest.approx((p1 + p2) / 2, rel=1e-6)
    assert float(bce_loss(pos, neg, targets, last_only=True)) == pytest.approx(p2, rel=1e-6)


def test_sampled_softmax_by_hand() -> None:
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])
    targets = torch.tensor([[4, 6]])
    negatives = torch.tensor([[[2, 3], [6, 9]]])  # negative 6 at position 1 is the target itself
    p0 = -math.log(math.e / (math.e + 1 + math.e**2))
    p1 = -math.log(1 / (1 + math.exp(-1)))  # the accidental hit is left out
    got = sampled_softmax_loss(pos, neg, targets, negatives)
    assert float(got) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    p1_all = -math.log(1 / (1 + math.e + math.exp(-1)))
    assert float(sampled_softmax_loss(pos, neg, targets)) == pytest.approx((p0 + p1_all) / 2)
    assert float(sampled_softmax_loss(pos, neg, targets, last_only=True)) == pytest.approx(p1_all)


def test_full_softmax_by_hand() -> None:
    logits = torch.tensor([[[9.0, 1.0, 2.0, 0.0], [9.0, 0.5, 0.5, 3.0], [0.0, 1.0, 1.0, 1.0]]])
    targets = torch.tensor([[2, 1, 0]])  # column 0 is padding and never a candidate
    p0 = -math.log(math.exp(2) / (math.exp(1) + math.exp(2) + 1))
    p1 = -math.log(math.exp(0.5) / (2 * math.exp(0.5) + math.exp(3)))
    assert float(full_softmax_loss(logits, targets)) == pytest.approx((p0 + p1) / 2, rel=1e-6)
    # the last position has no target: last_only gives an empty mean, i.e. 0
    assert float(full_softmax_loss(logits, targets, last_only=True)) == 0.0


def test_all_padding_gives_zero_with_a_graph() -> None:
    pos = torch.zeros(2, 3, requires_grad=True)
    loss = bce_loss(pos, torch.zeros(2, 3, 1), torch.zeros(2, 3, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and pos.grad is not None


@dataclass(frozen=True)
class FakeSids:
    codes: np.ndarray
    codebooks: np.ndarray | None


def _sids(n_items: int, seed: int = 0) -> FakeSids:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 3, size=(n_items, 3))
    return FakeSids(codes, rng.normal(scale=0.3, size=(3, 3, 8)).astype(np.float32))


@pytest.mark.parametrize("kind", ["bce", "sampled_softmax", "softmax"])
@pytest.mark.parametrize("last_only", [False, True])
def test_recommendation_loss_matches_a_loop(kind: str, last_only: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="h2rec", hidden=8, max_len=6), 12, _sids(12)).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 9], [2, 3, 4, 5, 7, 0]])
    negatives = torch.randint(1, 13, (2, 6, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model(seq)
        got = float(recommendation_loss(model, states, targets, negatives, kind, last_only))
        table = model.all_item_vectors().numpy().astype(np.float64)
    st = states.numpy().astype(np.float64)
    terms = []
    for b in range(2):
        for t in range(6):
            if targets[b, t] == 0 or (last_only and t != 5):
                continue
            s_pos = st[b, t] @ table[targets[b, t]]
            s_neg = [st[b, t] @ table[j] for j in negatives[b, t].tolist()]
            if kind == "bce":
                terms.append(softplus(-s_pos) + sum(softplus(x) for x in s_neg))
            elif kind == "sampled_softmax":
                keep = [x for x, j in zip(s_neg, negatives[b, t].tolist()) if j != targets[b, t]]
                terms.append(-s_pos + math.log(math.exp(s_pos) + sum(math.exp(x) for x in keep)))
            else:
                all_s = [st[b, t] @ table[j] for j in range(1, 13)]
                terms.append(-s_pos + math.log(sum(math.exp(x) for x in all_s)))
    want = sum(terms) / len(terms)
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("kind", ["bce", "sampled_softmax", "softmax", "shared"])
def test_logit_bias_is_added_to_every_scored_item(kind: str) -> None:
    # train.logit_adjust: each item's logit in the loss gains its bias, checked against a loop
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="fusion", hidden=8, max_len=5), 12, _sids(12)).eval()
    seq = torch.tensor([[0, 3, 4, 5, 6], [2, 3, 4, 5, 7]])
    targets = torch.tensor([[0, 4, 5, 6, 9], [3, 4, 5, 7, 0]])
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(13, generator=gen, dtype=torch.float32)
    if kind == "shared":
        negatives = torch.tensor([1, 4, 8, 11])  # one set for every position, 4 a target too
    else:
        negatives = torch.randint(1, 13, (2, 5, 3), generator=gen)
    with torch.no_grad():
        states = model(seq)
        loss_kind = "sampled_softmax" if kind == "shared" else kind
        got = float(recommendation_loss(model, states, targets, negatives, loss_kind, logit_bias=bias))
        table = model.all_item_vectors().numpy().astype(np.float64)
    st, bb = states.numpy().astype(np.float64), bias.numpy().astype(np.float64)
    terms = []
    for b in range(2):
        for t in range(5):
            y = int(targets[b, t])
            if y == 0:
                continue
            def s(j: int) -> float:
                return float(st[b, t] @ table[j] + bb[j])
            negs = negatives.tolist() if kind == "shared" else negatives[b, t].tolist()
            if kind == "bce":
                terms.append(softplus(-s(y)) + sum(softplus(s(j)) for j in negs))
            elif kind == "softmax":
                terms.append(-s(y) + math.log(sum(math.exp(s(j)) for j in range(1, 13))))
            else:
                keep = [j for j in negs if j != y]
                terms.append(-s(y) + math.log(math.exp(s(y)) + sum(math.exp(s(j)) for j in keep)))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # and the bias changes the loss (a test that could not fail otherwise)
    with torch.no_grad():
        plain = float(recommendation_loss(model, states, targets, negatives, loss_kind))
    assert abs(plain - got) > 1e-3


def test_recommendation_loss_rejects_unknown_kind_and_missing_negatives() -> None:
    model = build_model(ModelConfig(kind="sasrec", hidden=8, max_len=4), 5)
    states = model(torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(ConfigError, match="loss='hinge'"):
        recommendation_loss(model, states, torch.tensor([[2, 3, 4, 5]]), None, "hinge")
    with pytest.raises(ConfigError, match="needs sampled negatives"):
        recommendation_loss(model, states, torch.tensor([[2, 3, 4, 5]]), None, "bce")


# ----------------------------------------------------------------------------- alignment


def test_multi_positive_info_nce_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    w = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    # s = [[1, 0.6], [0, 0.8]], tau = 0.5
    l0 = -math.log((math.exp(2) + 0.5 * math.exp(1.2)) / (math.exp(2) + math.exp(1.2)))
    l1 = -math.log(math.exp(1.6) / (1 + math.exp(1.6)))
    got = multi_positive_info_nce(a, c, w, tau=0.5)
    assert float(got) == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_identity_positives_reduce_to_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    want = torch.nn.functional.cross_entropy(a @ c.T / 0.7, torch.arange(5))
    torch.testing.assert_close(multi_positive_info_nce(a, c, torch.eye(5), 0.7), want)


def _np_multi_nce(a: np.ndarray, c: np.ndarray, w: np.ndarray, tau: float) -> float:
    total = 0.0
    for i in range(a.shape[0]):
        e = [math.exp(float(a[i] @ c[j]) / tau) for j in range(c.shape[0])]
        total += -math.log(sum(w[i, j] * e[j] for j in range(len(e))) / sum(e))
    return total / a.shape[0]


def test_item_alignment_is_symmetric_and_normalised() -> None:
    rng = np.random.default_rng(2)
    sid, hid = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) * 5.0
    w = np.eye(4)
    w[0, 2] = w[2, 0] = 1.0
    w[1, 3] = 0.4
    s = sid / np.linalg.norm(sid, axis=1, keepdims=True)
    h = hid / np.linalg.norm(hid, axis=1, keepdims=True)
    want = 0.5 * (_np_multi_nce(s, h, w, 0.5) + _np_multi_nce(h, s, w, 0.5))
    got = item_alignment_loss(
        torch.tensor(sid, dtype=torch.float32),
        torch.tensor(hid, dtype=torch.float32),
        torch.tensor(w, dtype=torch.float32),
        tau=0.5,
    )
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("tau", [0.5, 0.1, 0.03, 0.02])
def test_fused_item_alignment_matches_the_two_generic_directions(tau: float) -> None:
    # asymmetric weights (top-k co-occurrence rows need not be symmetric), rows with only the
    # diagonal, a zero vector; tau=0.02 is past the fused path's range (the generic one runs)
    g = torch.Generator().manual_seed(5)
    m, d = 37, 8
    sid = torch.randn(m, d, generator=g, dtype=torch.float64)
    hid = torch.randn(m, d, generator=g, dtype=torch.float64) * 3.0
    hid[4] = 0.0
    w = (torch.rand(m, m, generator=g, dtype=torch.float64) < 0.15).double()
    w = w * torch.rand(m, m, generator=g, dtype=torch.float64)
    w.fill_diagonal_(1.0)
    w[7] = 0.0
    w[7, 7] = 1.0
    assert not torch.equal(w, w.T)

    def generic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s, h = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return 0.5 * (multi_positive_info_nce(s, h, w, tau) + multi_positive_info_nce(h, s, w, tau))

    a32, b32 = sid.float().requires_grad_(), hid.float().requires_grad_()
    got = item_alignment_loss(a32, b32, w.float(), tau)
    ga, gb = torch.autograd.grad(got, [a32, b32])
    a64, b64 = sid.clone().requires_grad_(), hid.clone().requires_grad_()
    want = generic(a64, b64)
    wa, wb = torch.autograd.grad(want, [a64, b64])
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(ga.double(), wa, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb.double(), wb, rtol=1e-4, atol=1e-6)


def test_symmetric_info_nce_by_hand() -> None:
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])  # normalised: (1,1)/sqrt2, -e2
    r = 1 / math.sqrt(2)
    # logits (tau=1): [[r, 0], [r, -1]]
    e = math.exp
    a_to_b = -math.log(e(r) / (e(r) + 1)) - math.log(e(-1) / (e(r) + e(-1)))
    b_to_a = -math.log(e(r) / (e(r) + e(r))) - math.log(e(-1) / (1 + e(-1)))
    want = 0.5 * (a_to_b / 2 + b_to_a / 2)
    assert float(symmetric_info_nce(a, b, tau=1.0)) == pytest.approx(want, rel=1e-6)


def test_mask_lowest_levels() -> None:
    levels = torch.arange(1, 1 + 2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)
    real = torch.tensor([[False, True, True], [True, True, True]])
    levels = levels * real[:, :, None, None]
    gate = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    mask = -torch.ones(4, 2) * torch.arange(1, 5, dtype=torch.float32)[:, None]
    out = mask_lowest_levels(levels, gate, mask, real)
    # user 0: lowest two are levels 1 and 3; user 1: a four-way tie masks the finest two (2, 3)
    for b, masked in ((0, {1, 3}), (1, {2, 3})):
        for lvl in range(4):
            want = mask[lvl].expand(3, 2) * real[b, :, None] if lvl in masked else levels[b, :, lvl]
            torch.testing.assert_close(out[b, :, lvl], want)
    # one level: nothing to mask
    one = mask_lowest_levels(levels[:, :, :1], gate[:, :1], mask[:1], real)
    torch.testing.assert_close(one, levels[:, :, :1])


# ----------------------------------------------------------------------------- positives


def _random_csr(n_items: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    indptr = [0, 0]  # row 0 = padding, empty
    indices: list[int] = []
    weights: list[float] = []
    for item in range(1, n_items + 1):
        k = int(rng.integers(0, 6))
        nbrs = rng.choice(np.setdiff1d(np.arange(1, n_items + 1), [item]), size=k, replace=False)
        indices += nbrs.tolist()
        weights += rng.uniform(0.3, 1.0, size=k).tolist()
        indptr.append(len(indices))
    return np.array(indptr), np.array(indices), np.array(weights, dtype=np.float32)


def _dense_oracle(indptr, indices, weights, codes, items, use_cooccur, use_same_tuple):
    n = codes.shape[0]
    dense = np.zeros((n + 1, n + 1))
    if use_cooccur:
        for i in range(n + 1):
            for p in range(indptr[i], indptr[i + 1]):
                dense[i, indices[p]] = weights[p]
    m = len(items)
    out = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            i, j = items[a], items[b]
            v = dense[i, j]
            if i == j or (use_same_tuple and tuple(codes[i - 1]) == tuple(codes[j - 1])):
                v = 1.0
            out[a, b] = v
    return out


@pytest.mark.parametrize("use_cooccur", [True, False])
@pytest.mark.parametrize("use_same_tuple", [True, False])
def test_batch_matrix_matches_dense_oracle(use_cooccur: bool, use_same_tuple: bool) -> None:
    rng = np.random.default_rng(7)
    n = 30
    indptr, indices, weights = _random_csr(n, rng)
    codes = rng.integers(0, 2, size=(n, 3))  # 8 tuples for 30 items: many collisions
    pos = CooccurrencePositives(indptr, indices, weights, n, codes)
    items = np.concatenate([rng.choice(np.arange(1, n + 1), size=18, replace=False), [5, 5, 12]])
    got = pos.batch_matrix(torch.from_numpy(items), use_cooccur, use_same_tuple).numpy()
    want = _dense_oracle(indptr, indices, weights, codes, items, use_cooccur, use_same_tuple)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (21, 21)
    if use_cooccur:
        assert ((got > 0) & (got < 1)).any()  # some PPMI weights really made it in


@pytest.mark.parametrize("use_cooccur", [True, False])
@pytest.mark.parametrize("use_same_tuple", [True, False])
def test_batch_pairs_are_the_nonzeros_of_the_dense_oracle(
    use_cooccur: bool, use_same_tuple: bool
) -> None:
    rng = np.random.default_rng(8)
    n = 30
    indptr, indices, weights = _random_csr(n, rng)
    codes = rng.integers(0, 2, size=(n, 3))
    pos = CooccurrencePositives(indptr, indices, weights, n, codes)
    items = rng.choice(np.arange(1, n + 1), size=21, replace=False)  # distinct, unsorted
    rows, cols, vals = pos.batch_pairs(torch.from_numpy(items), use_cooccur, use_same_tuple)
    want = _dense_oracle(indptr, indices, weights, codes, items, use_cooccur, use_same_tuple)
    got = np.zeros_like(want)
    got[rows.numpy(), cols.numpy()] = vals.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    keys = rows.numpy() * 21 + cols.numpy()
    assert (np.diff(keys) > 0).all()  # distinct pairs, sorted
    assert (vals.numpy() > 0).all()


def test_item_alignment_from_pairs_equals_the_dense_weights() -> None:
    g = torch.Generator().manual_seed(3)
    m = 25
    sid, hid = torch.randn(m, 6, generator=g), torch.randn(m, 6, generator=g)
    w = (torch.rand(m, m, generator=g) < 0.2).float() * torch.rand(m, m, generator=g)
    w.fill_diagonal_(1.0)
    rows, cols = w.nonzero(as_tuple=True)
    for tau in (0.5, 0.01):  # the fused path and the dense fallback
        got = item_alignment_loss_pairs(sid, hid, rows, cols, w[rows, cols], tau)
        s, h = F.normalize(sid, dim=-1), F.normalize(hid, dim=-1)
        want = 0.5 * (multi_positive_info_nce(s, h, w, tau) + multi_positive_info_nce(h, s, w, tau))
        assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_positives_validate_their_arrays() -> None:
    indptr = np.array([0, 0, 1, 2])
    with pytest.raises(DataError, match=r"indices\[1\]=7: outside 1..n_items=2"):
        CooccurrencePositives(indptr, np.array([2, 7]), np.array([0.5, 0.5]), 2)
    with pytest.raises(DataError, match=r"weights\[1\]=nan"):
        CooccurrencePositives(indptr, np.array([2, 1]), np.array([0.5, np.nan]), 2)
    with pytest.raises(DataError, match="indptr: shape"):
        CooccurrencePositives(indptr, np.array([2, 1]), np.array([0.5, 0.5]), 3)
    with pytest.raises(DataError, match="codes: 3 rows"):
        CooccurrencePositives(indptr, np.array([2, 1]), np.array([0.5, 0.5]), 2, np.zeros((3, 2)))


def test_tuple_groups() -> None:
    groups = tuple_groups(np.array([[1, 2], [0, 1], [1, 2], [1, 3]]))
    assert groups[0] == -1
    assert groups[1] == groups[3] and len({groups[1], groups[2], groups[4]}) == 3


def test_positives_from_rust_store_come_from_training_windows() -> None:
    core = pytest.importorskip("h2rec._core")
    if getattr(core, "cooccurrence", None) is None or core.SequenceStore is None:
        pytest.skip("h2rec._core is not built")
    seqs = [[1, 2, 3, 4, 5, 6], [2, 3, 7, 8, 9], [6, 1, 2, 3, 10, 11], [4, 5, 6, 7]]
    store = core.SequenceStore.from_sequences(seqs, n_items=11)
    pos = CooccurrencePositives.from_store(store, window=1, top_k=50)
    allowed = set()
    for s in seqs:
        train = s[:-2]  # leave-one-out: validation and test items are never mined
        for a in range(len(train)):
            for b in range(max(0, a - 1), min(len(train), a + 2)):
                if a != b:
                    allowed.add((train[a], train[b]))
    ip, ix = pos.indptr.numpy(), pos.indices.numpy()
    pairs = {(i, int(j)) for i in range(12) for j in ix[ip[i] : ip[i + 1]]}
    assert pairs and pairs <= allowed


# ----------------------------------------------------------------------------- H2Rec aux


def _h2rec(**kw: object) -> H2Rec:
    torch.manual_seed(0)
    base: dict[str, object] = dict(kind="h2rec", hidden=8, max_len=6, dropout=0.0)
    cfg = ModelConfig(**{**base, **kw})  # type: ignore[arg-type]
    model = build_model(cfg, 12, _sids(12))
    assert isinstance(model, H2Rec)
    return model


SEQ = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [0, 8, 9, 10, 11, 12]])
TARGETS = torch.tensor([[0, 0, 4, 5, 6, 9], [2, 3, 4, 5, 7, 1], [0, 9, 10, 11, 12, 3]])


def test_item_alignment_uses_the_batch_positive_matrix() -> None:
    rng = np.random.default_rng(3)
    indptr, indices, weights = _random_csr(12, rng)
    codes = _sids(12).codes
    torch.manual_seed(0)
    cfg = ModelConfig(kind="h2rec", hidden=8, max_len=6, dropout=0.0, align_seq=False)
    cooccur = CooccurrencePositives(indptr, indices, weights, 12)
    model = build_model(cfg, 12, _sids(12), cooccur=cooccur)
    states = model(SEQ)
    aux = model.aux_losses(SEQ, states, TARGETS)
    assert set(aux) == {"align_item"}
    items = model.batch_items(TARGETS)
    assert sorted(items.tolist()) == sorted(set(TARGETS[TARGETS > 0].tolist()))
    assert items[:3].tolist() == [9, 1, 3]  # last position first
    w = _dense_oracle(indptr, indices, weights, codes, items.numpy(), True, True)
    want = 0.1 * item_alignment_loss(
        model.sid(items), model.hid(items), torch.tensor(w, dtype=torch.float32), 0.5
    )
    torch.testing.assert_close(aux["align_item"], want)


def test_batch_items_cap() -> None:
    model = _h2rec(align_item_max_items=4)
    assert model.batch_items(TARGETS).tolist() == [9, 1, 3, 6]
    g = torch.Generator().manual_seed(0)
    drawn = model.batch_items(TARGETS, g)
    assert len(drawn) == 4 and len(set(drawn.tolist())) == 4


@pytest.mark.parametrize("target", ["sid", "branch", "hid"])
@pytest.mark.parametrize("score", ["fused", "paired"])
def test_sequence_alignment_by_hand(target: str, score: str) -> None:
    model = _h2rec(align_item=False, align_seq_target=target, align_seq_weight=0.3,
                   item_score=score).eval()
    states = model(SEQ)
    aux = model.aux_losses(SEQ, states, TARGETS)
    assert set(aux) == {"align_seq"}
    # recompute from the parts: mask the lowest-gate level (L=3 -> 1 level) by hand
    real = SEQ > 0
    from h2rec.models.backbone import attention_mask

    allowed = attention_mask(real, True)
    levels = model.sid.levels(SEQ)
    gate = model.level_gate(SEQ)[:, -1]
    masked = levels.clone()
    for b in range(3):
        low = int(torch.argmin(gate[b]))
        masked[b, :, low] = model.mask_vectors[low] * real[b, :, None]
    u = model.backbone(model.input(masked.mean(2), real), real, allowed)[:, -1]
    if target == "sid":
        v = model.backbone(model.input(levels.mean(2), real), real, allowed)[:, -1]
    elif score == "fused":  # the state is the branches' sum: each branch's own, by hand
        sid_state, hid_state, _, _ = model._branches(SEQ)
        v = (sid_state if target == "branch" else hid_state)[:, -1]
    elif target == "branch":
        v = states[:, -1, :8]  # the SID branch's state
    else:
        v = states[:, -1, 8:]
    torch.testing.assert_close(aux["align_seq"], 0.3 * symmetric_info_nce(u, v, 1.0))
    aux["align_seq"].backward()
    assert model.mask_vectors.grad is not None and model.mask_vectors.grad.abs().sum() > 0


def test_alignment_switches() -> None:
    model = _h2rec(align_item=False, align_seq=False)
    assert model.aux_losses(SEQ, model(SEQ), TARGETS) == {}
    model = _h2rec(align_item_weight=0.0, align_seq_weight=0.0)
    assert model.aux_losses(SEQ, model(SEQ), TARGETS) == {}
    model = _h2rec(align_item_cooccur=False, align_item_same_tuple=False, align_seq=False)
    items = model.batch_items(TARGETS)
    eye = torch.eye(len(items))
    want = 0.1 * item_alignment_loss(model.sid(items), model.hid(items), eye, 0.5)
    torch.testing.assert_close(model.aux_losses(SEQ, model(SEQ), TARGETS)["align_item"], want)
    for kind in ("sasrec", "sid"):
        other = build_model(ModelConfig(kind=kind, hidden=8, max_len=6), 12, _sids(12))
        assert other.aux_losses(SEQ, other(SEQ), TARGETS) == {}


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("max_logits", [10**9, 7 * 40, 40, 1])
def test_fused_full_softmax_equals_cross_entropy_with_its_gradients(max_logits: int, biased: bool) -> None:
    # chunked (down to one row at a time) or not, with a logit bias or not, the fused loss is
    # F.cross_entropy's
    g = torch.Generator().manual_seed(3)
    user = torch.randn(23, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    items = torch.randn(40, 6, generator=g).requires_grad_()
    targets = torch.randint(0, 40, (23,), generator=g)
    weights = torch.rand(23, generator=g)  # a non-uniform upstream gradient, through the mean
    bias = torch.randn(40, generator=g) * 2 if biased else None
    got = fused_full_softmax(user * weights[:, None], items, targets, max_logits, bias)
    gu, gi = torch.autograd.grad(got, (user, items))
    u2, i2 = user.detach().double().requires_grad_(), items.detach().double().requires_grad_()
    extra = bias.double() if bias is not None else 0.0
    want = F.cross_entropy((u2 * weights[:, None].double()) @ i2.T + extra, targets)
    wu, wi = torch.autograd.grad(want, (u2, i2))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(gu.double(), wu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gi.double(), wi, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_logits", [10**9, 40])
def test_fused_full_softmax_with_constant_columns_matches_cross_entropy(max_logits: int) -> None:
    # items = [trainable (40, 6) ; constant (40, 4)] (the text-match columns): the loss and the
    # gradients of the user rows and of the trainable columns are F.cross_entropy's
    g = torch.Generator().manual_seed(4)
    user = torch.randn(23, 10, generator=g).requires_grad_()
    train = torch.randn(40, 6, generator=g).requires_grad_()
    const = torch.randn(40, 4, generator=g)
    targets = torch.randint(0, 40, (23,), generator=g)
    got = fused_full_softmax(user, torch.cat([train, const], 1), targets, max_logits, frozen=4)
    gu, gt = torch.autograd.grad(got, (user, train))
    u2, t2 = user.detach().double().requires_grad_(), train.detach().double().requires_grad_()
    want = F.cross_entropy(u2 @ torch.cat([t2, const.double()], 1).T, targets)
    wu, wt = torch.autograd.grad(want, (u2, t2))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(gu.double(), wu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), wt, rtol=1e-4, atol=1e-6)


def test_fused_full_softmax_reuses_its_buffers_without_changing_a_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a sequence of steps of varying size, chunked or not, with or without a gradient, through
    # the buffer pool (buffers written by earlier steps, larger than needed) gives the very
    # losses and gradients of fresh allocations; the pool holds at most two buffers
    from h2rec import losses

    g = torch.Generator().manual_seed(5)
    steps = []
    for v, n, max_logits, grad in [(30, 50, 10**9, True), (12, 50, 10**9, True),
                                   (45, 50, 7 * 50, True), (20, 33, 10**9, False),
                                   (30, 50, 3 * 50, True), (7, 61, 10**9, True)]:
        steps.append((torch.randn(v, 8, generator=g) * 3, torch.randn(n, 8, generator=g),
                      torch.randint(0, n, (v,), generator=g), max_logits, grad,
                      torch.randn(n, generator=g)))

    def run() -> list[tuple[torch.Tensor, ...]]:
        out = []
        for k, (user, items, targets, max_logits, grad, bias) in enumerate(steps):
            u, i = user.clone().requires_grad_(grad), items.clone().requires_grad_(grad)
            loss = fused_full_softmax(u, i, targets, max_logits, bias if k % 2 else None)
            if grad:
                loss.backward()
                out.append((loss.detach(), u.grad, i.grad))
            else:
                out.append((loss.detach(),))
        return out

    losses._POOL.clear()
    pooled = run()
    assert 1 <= len(losses._POOL._free) <= 2
    monkeypatch.setattr(losses._POOL, "take", lambda numel, like: None)  # fresh every time
    fresh = run()
    for a, b in zip(pooled, fresh):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_the_buffer_pool_reuses_fitting_buffers_and_holds_few() -> None:
    from h2rec.losses import _BufferPool

    pool, like = _BufferPool(keep=2), torch.zeros(1)
    a = pool.take(10, like)
    assert a is not None and a.numel() == 10
    pool.give(a)
    assert pool.take(5, like) is a  # a held buffer that fits is reused
    pool.give(a)
    b = pool.take(20, like)  # none fits: a new one, and the smaller held one is dropped
    assert b is not a and b.numel() == 20 and pool._free == []
    c = pool.take(20, like)  # two in use at once (two losses in a step)
    pool.give(b)
    pool.give(c)
    pool.give(torch.empty(3))
    assert [x.numel() for x in pool._free] == [20, 20]  # at most keep, the largest
    assert pool.take(4, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64  # dtype kept
    pool.clear()
    assert pool._free == []


def test_shared_sampled_softmax_reuses_its_buffers_without_changing_a_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the same for the shared sampled softmax: whole or chunked, with accidental hits and logQ
    from h2rec import losses

    g = torch.Generator().manual_seed(6)
    steps = []
    for v, s, max_logits in [(40, 30, 10**9), (15, 30, 10**9), (60, 25, 4 * 25),
                             (40, 30, 7 * 30), (9, 50, 10**9)]:
        table = torch.randn(20, 8, generator=g)
        targets = torch.randint(0, 20, (v,), generator=g)
        negatives = torch.randint(0, 20, (s,), generator=g)  # 20 items: many hits
        log_q = torch.log(torch.rand(20, generator=g) + 0.05)
        steps.append((torch.randn(v, 8, generator=g), table, targets, negatives, log_q, max_logits))

    def run() -> list[tuple[torch.Tensor, ...]]:
        out = []
        for user, table, targets, negatives, log_q, max_logits in steps:
            u, t = user.clone().requires_grad_(), table.clone().requires_grad_()
            loss = shared_sampled_softmax(u, t[targets], t[negatives], targets, negatives,
                                          log_q[targets], log_q[negatives], max_logits)
            loss.backward()
            out.append((loss.detach(), u.grad, t.grad))
        return out

    losses._POOL.clear()
    pooled = run()
    assert 1 <= len(losses._POOL._free) <= 2
    monkeypatch.setattr(losses._POOL, "take", lambda numel, like: None)
    fresh = run()
    for a, b in zip(pooled, fresh):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_fused_losses_refuse_a_second_backward() -> None:
    # forward's probabilities become the logits' gradient in place: a second pass through the
    # same graph would read a consumed (and possibly reused) buffer, so it is an error
    user = torch.randn(4, 3, requires_grad=True)
    loss = fused_full_softmax(user, torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once only"):
        loss.backward()
    items = torch.randn(5, 3)
    loss = shared_sampled_softmax(user, items[:4], items, torch.tensor([0, 1, 2, 3]),
                                  torch.arange(5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once only"):
        loss.backward()


def test_fused_full_softmax_of_no_rows_is_zero_with_a_graph() -> None:
    items = torch.randn(5, 3, requires_grad=True)
    loss = fused_full_softmax(torch.zeros(0, 3), items, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and items.grad is not None and float(items.grad.abs().sum()) == 0.0


def test_shared_sampled_softmax_by_hand() -> None:
    # one row, target 7 with log q = log 0.5, negatives {3, 7}: 7 is an accidental hit
    user = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    lq_pos, lq_neg = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25, 0.5]))
    got = shared_sampled_softmax(
        user, pos, neg, torch.tensor([7]), torch.tensor([3, 7]), lq_pos, lq_neg
    )
    p, n = 2.0 - math.log(0.5), 1.0 - math.log(0.25)
    assert float(got) == pytest.approx(-p + math.log(math.exp(p) + math.exp(n)), rel=1e-6)
    plain = shared_sampled_softmax(user, pos, neg, torch.tensor([7]), torch.tensor([3, 7]))
    assert float(plain) == pytest.approx(-2.0 + math.log(math.exp(2.0) + math.exp(1.0)), rel=1e-6)


def test_item_alignment_runs_in_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(6)
    sid, hid = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    rows = cols = torch.arange(30)
    want = item_alignment_loss_pairs(sid, hid, rows, cols, torch.ones(30), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = item_alignment_loss_pairs(sid, hid, rows, cols, torch.ones(30), 0.5)
    assert got.dtype == torch.float32
    assert float(got) == float(want)


def _shared_softmax_oracle(user, pos, neg, targets, negatives, lq_pos=None, lq_neg=None):
    """The plain autograd form: logits concatenated, hits masked, torch.logsumexp."""
    p = (user * pos).sum(-1)
    n = user @ neg.T
    if lq_pos is not None:
        p, n = p - lq_pos, n - lq_neg[None, :]
    n = n.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([p[:, None], n], dim=1), dim=1) - p).mean()


@pytest.mark.parametrize("max_logits", [64 * 2**20, 7 * 13, 13])  # one block; chunks; one row
@pytest.mark.parametrize("corrected", [False, True])
def test_shared_sampled_softmax_matches_plain_autograd(max_logits: int, corrected: bool) -> None:
    g = torch.Generator().manual_seed(11)
    v, s, e, n_items = 37, 13, 6, 20
    targets = torch.randint(1, n_items, (v,), generator=g)
    negatives = torch.randint(1, n_items, (s,), generator=g)
    negatives[:3] = targets[:3]  # accidental hits, one negative repeated in a row too
    negatives[3] = targets[0]
    table = torch.randn(n_items, e, generator=g)
    lq = torch.log(torch.rand(n_items, generator=g) + 0.05)
    lq_pos, lq_neg = (lq[targets], lq[negatives]) if corrected else (None, None)
    out = []
    for fn in (shared_sampled_softmax, _shared_softmax_oracle):
        user = torch.randn(v, e, generator=torch.Generator().manual_seed(3)).requires_grad_()
        items = table.clone().requires_grad_()
        args = (user, items[targets], items[negatives], targets, negatives, lq_pos, lq_neg)
        loss = fn(*args, max_logits=max_logits) if fn is shared_sampled_softmax else fn(*args)
        loss.backward()
        out.append((loss.detach(), user.grad, items.grad))
    for got, want in zip(out[0], out[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["shared", "full"])
@pytest.mark.parametrize("max_logits", [64 * 2**20, 40])  # one block; chunks recomputed
def test_fused_softmaxes_compute_in_float32_under_autocast(loss: str, max_logits: int) -> None:
    """Training on CUDA runs the step under bf16 autocast: the fused losses must still do
    float32 math, forward and backward, and give the float32 loss and gradients exactly."""
    from h2rec.losses import fused_full_softmax

    g = torch.Generator().manual_seed(5)
    v, s, e, n_items = 23, 9, 8, 30
    targets = torch.randint(1, n_items, (v,), generator=g)
    negatives = torch.randint(1, n_items, (s,), generator=g)
    negatives[0] = targets[0]
    table = torch.randn(n_items, e, generator=g)
    lq = torch.log(torch.rand(n_items, generator=g) + 0.05)
    out = []
    for amp in (False, True):
        user = torch.randn(v, e, generator=torch.Generator().manual_seed(1)).requires_grad_()
        items = table.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if loss == "shared":
                value = shared_sampled_softmax(user, items[targets], items[negatives], targets,
                                               negatives, lq[targets], lq[negatives], max_logits)
            else:
                value = fused_full_softmax(user, items[1:], targets - 1, max_logits)
        value.backward()
        out.append((value.detach(), user.grad, items.grad))
    for got, want in zip(out[1], out[0]):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)
