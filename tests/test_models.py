"""Model properties: causality, padding invariance, leaks without the causal mask, the gate and
its prior, shapes, gradients into both H2Rec branches, SID pooling and PCA init oracles."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from h2rec.errors import ConfigError, DataError
from h2rec.losses import mask_lowest_levels, recommendation_loss, symmetric_info_nce
from h2rec.models.backbone import Dropout
from h2rec.models import (
    CrossAttention,
    LevelCrossAttention,
    H2Rec,
    HidEmbedding,
    ModelConfig,
    SidRec,
    attention_mask,
    build_model,
)

N_ITEMS = 40
T = 10
MAX_LEN = 16


@dataclass(frozen=True)
class FakeSids:
    codes: np.ndarray
    codebooks: np.ndarray | None


@pytest.fixture(scope="module")
def sids() -> FakeSids:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 5, size=(N_ITEMS, 3))
    codes[7] = codes[3]  # a collision: items 4 and 8 share their full tuple
    codebooks = rng.normal(scale=0.3, size=(3, 5, 12)).astype(np.float32)
    return FakeSids(codes, codebooks)


def _cfg(kind: str, **kw: object) -> ModelConfig:
    base = dict(kind=kind, hidden=16, n_layers=2, n_heads=2, max_len=MAX_LEN, dropout=0.3)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


CONFIGS = {
    "sasrec": _cfg("sasrec"),
    "sid-mean": _cfg("sid"),
    "sid-sum": _cfg("sid", sid_pooling="sum"),
    "fusion": _cfg("fusion"),
    "h2rec": _cfg("h2rec"),
    "h2rec-paired": _cfg("h2rec", item_score="paired"),
    "h2rec-separate": _cfg("h2rec", shared_backbone=False),
    "h2rec-no-cross": _cfg("h2rec", cross_attention=False),
    "h2rec-no-gate": _cfg("h2rec", gate=False, sid_init="random"),
    "h2rec-sid-branch": _cfg("h2rec", branches="sid"),
    "h2rec-hid-branch": _cfg("h2rec", branches="hid", shared_backbone=False),
    "sasrec-text": _cfg("sasrec", text_match=True),
    "fusion-text": _cfg("fusion", text_match=True, text_match_decay=0.3),
    "h2rec-text": _cfg("h2rec", text_match=True),
    "h2rec-paired-text": _cfg("h2rec", item_score="paired", text_match=True),
}
TEXT_DIM = 6
# item text embeddings (N_ITEMS, TEXT_DIM) for the text-match models; item 5's is all zero
TEXT = np.random.default_rng(5).normal(size=(N_ITEMS, TEXT_DIM)).astype(np.float32)
TEXT[4] = 0.0


def _model(cfg: ModelConfig, sids: FakeSids, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg, N_ITEMS, sids, TEXT if cfg.text_match else None)
    model.eval()
    return model


def _batch(seed: int = 1) -> torch.Tensor:
    """(4, T) left-padded sequences of lengths 10, 7, 3, 1."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (4, T), generator=g)
    for row, length in enumerate([10, 7, 3, 1]):
        seq[row, : T - length] = 0
    return seq


@pytest.mark.parametrize("name", list(CONFIGS))
def test_changing_later_items_changes_no_earlier_output(name: str, sids: FakeSids) -> None:
    model = _model(CONFIGS[name], sids)
    seq = _batch()
    with torch.no_grad():
        base = model(seq)
        for t in range(T - 1):
            changed = seq.clone()
            later = changed[:, t + 1 :]
            changed[:, t + 1 :] = torch.where(later > 0, later % N_ITEMS + 1, later)
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[0, t + 1 :], base[0, t + 1 :], atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("causal", [True, False])
def test_user_states_are_the_last_position_of_forward(name: str, causal: bool, sids: FakeSids) -> None:
    # evaluation and serving read user_states, which runs the last block on one position only
    model = _model(replace(CONFIGS[name], causal=causal), sids)
    seq = _batch()
    seq[3] = 0  # a user with no history at all: a zero state
    with torch.no_grad():
        want = model(seq)[:, -1]
        got = model.user_states(seq)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[3] == 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_without_causal_mask_later_items_leak(name: str, sids: FakeSids) -> None:
    model = _model(replace(CONFIGS[name], causal=False), sids)
    seq = _batch()
    changed = seq.clone()
    changed[0, -1] = seq[0, -1] % N_ITEMS + 1
    with torch.no_grad():
        diff = (model(changed)[0, :-1] - model(seq)[0, :-1]).abs().max()
    assert diff > 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_more_left_padding_changes_nothing(name: str, sids: FakeSids) -> None:
    for causal in (True, False):
        model = _model(replace(CONFIGS[name], causal=causal), sids)
        seq = _batch()
        padded = torch.cat([torch.zeros(4, MAX_LEN - T, dtype=seq.dtype), seq], dim=1)
        with torch.no_grad():
            a = model(seq)
            b = model(padded)
        real = seq > 0
        torch.testing.assert_close(b[:, MAX_LEN - T :][real], a[real], atol=1e-5, rtol=0)
        assert (b[:, : MAX_LEN - T] == 0).all() and (a[~real] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_cross_attention_causal_and_padding_safe(causal: bool) -> None:
    torch.manual_seed(0)
    attn = CrossAttention(8, 2, dropout=0.5).eval()
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    real = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    with torch.no_grad():
        base = attn(q, kv, real, attention_mask(real, causal))
        # later keys/values and queries changed
        q2, kv2 = q.clone(), kv.clone()
        q2[:, 4:] = torch.randn(2, 2, 8, generator=g)
        kv2[:, 4:] = torch.randn(2, 2, 8, generator=g)  # (a shift alone vanishes in LayerNorm)
        out = attn(q2, kv2, real, attention_mask(real, causal))
        if causal:
            torch.testing.assert_close(out[:, :4], base[:, :4], atol=1e-6, rtol=0)
        else:
            assert (out[:, 2:4] - base[:, 2:4]).abs().max() > 1e-3
        # what sits at padded key positions never matters; padded outputs are zero
        kv3 = kv.clone()
        kv3[0, :2] = torch.randn(2, 8, generator=g) * 100.0
        out3 = attn(q, kv3, real, attention_mask(real, causal))
        torch.testing.assert_close(out3, base, atol=1e-6, rtol=0)
        assert (base[0, :2] == 0).all()


def test_attention_mask_rule() -> None:
    real = torch.tensor([[False, True, True]])
    causal = attention_mask(real, True)[0, 0]
    assert causal.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    full = attention_mask(real, False)[0, 0]
    assert full.tolist() == [[False, True, True]] * 3


def test_gate_sums_to_one_and_has_the_coarse_to_fine_prior(sids: FakeSids) -> None:
    model = _model(CONFIGS["h2rec"], sids)
    assert isinstance(model, H2Rec)
    seq = _batch()
    with torch.no_grad():
        gate = model.level_gate(seq)
    assert gate.shape == (4, T, 3)
    torch.testing.assert_close(gate.sum(-1), torch.ones(4, T))
    assert (gate > 0).all()
    # with the MLP silenced the gate is exactly the prior: softmax(0, -0.4, -0.8)
    with torch.no_grad():
        model.gate.mlp[-1].weight.zero_()
        model.gate.mlp[-1].bias.zero_()
        prior = model.level_gate(seq)
    e = np.exp([0.0, -0.4, -0.8])
    expected = torch.tensor(e / e.sum(), dtype=torch.float32)
    torch.testing.assert_close(prior, expected.expand(4, T, 3))
    assert prior[0, 0, 0] > prior[0, 0, 1] > prior[0, 0, 2]
    # no gate: the uniform mixture
    flat = _model(replace(CONFIGS["h2rec"], gate=False), sids)
    with torch.no_grad():
        torch.testing.assert_close(flat.level_gate(seq), torch.full((4, T, 3), 1 / 3))


def test_user_gate_depends_on_the_user(sids: FakeSids) -> None:
    model = _model(CONFIGS["h2rec"], sids)
    with torch.no_grad():
        gate = model.level_gate(_batch())[:, -1]  # (B, L)
    assert (gate[0] - gate[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_scores(name: str, sids: FakeSids) -> None:
    model = _model(CONFIGS[name], sids)
    e = 32 if name.startswith("h2rec-paired") else 16  # fused scores: the branches' sum, D wide
    e += TEXT_DIM if CONFIGS[name].text_match else 0
    assert model.out_dim == e
    seq = _batch()
    with torch.no_grad():
        states = model(seq)
        items = torch.randint(1, N_ITEMS + 1, (4, T, 5))
        vecs = model.item_vectors(items)
        table = model.all_item_vectors()
    assert states.shape == (4, T, e)
    assert vecs.shape == (4, T, 5, e)
    assert table.shape == (N_ITEMS + 1, e)
    assert (table[0] == 0).all()
    scores = states[:, -1] @ table.T  # (B, N+1)
    direct = (states[:, -1, None, :] * model.item_vectors(torch.arange(N_ITEMS + 1))).sum(-1)
    torch.testing.assert_close(scores, direct, atol=1e-5, rtol=1e-5)


def test_input_longer_than_max_len_is_an_error(sids: FakeSids) -> None:
    model = _model(CONFIGS["sasrec"], sids)
    with pytest.raises(DataError, match="max_len=16"):
        model(torch.ones(2, MAX_LEN + 1, dtype=torch.long))


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_both_branches(shared: bool, sids: FakeSids) -> None:
    # paired scores: the state's halves are the branches (fused: their sum, see below)
    model = _model(_cfg("h2rec", shared_backbone=shared, dropout=0.0, item_score="paired"), sids)
    model.train()
    seq = _batch()
    targets = torch.roll(seq, -1, 1) * (seq > 0)
    negatives = torch.randint(1, N_ITEMS + 1, (4, T, 2), generator=torch.Generator().manual_seed(5))
    states = model(seq)
    loss = recommendation_loss(model, states, targets, negatives)
    aux = model.aux_losses(seq, states, targets)
    assert set(aux) == {"align_item", "align_seq"}
    (loss + sum(aux.values())).backward()
    parts = [model.hid, model.sid, model.hid_attn, model.gate, model.backbone, model.input]
    parts.append(model.level_attn)
    assert all(float(model.level_attn.weight.grad[lvl].abs().sum()) > 0 for lvl in range(3))
    if not shared:
        parts.append(model.backbone_hid)
    for part in parts:
        assert _grad_norm(part) > 0, type(part).__name__
    assert model.mask_vectors.grad is not None and model.mask_vectors.grad.abs().sum() > 0
    # each branch on its own: the recommendation loss alone reaches both
    model.zero_grad(set_to_none=True)
    states = model(seq)
    (states[..., :16].sum()).backward()  # SID branch only
    assert _grad_norm(model.level_attn) > 0 and _grad_norm(model.gate) > 0
    assert _grad_norm(model.hid_attn) == 0
    model.zero_grad(set_to_none=True)
    (model(seq)[..., 16:].sum()).backward()  # HID branch only
    assert _grad_norm(model.hid_attn) > 0 and _grad_norm(model.level_attn) == 0


def test_frozen_codebooks_get_no_gradient(sids: FakeSids) -> None:
    model = _model(_cfg("h2rec", codebooks_trainable=False), sids)
    model.train()
    model(_batch()).sum().backward()
    assert model.sid.table.grad is None and not model.sid.table.requires_grad
    assert model.sid.proj.weight.grad is not None


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_sid_item_is_the_pool_of_its_projected_centroids(pooling: str, sids: FakeSids) -> None:
    model = _model(_cfg("sid", sid_pooling=pooling), sids)
    assert isinstance(model, SidRec)
    w = model.sid.proj.weight.detach().numpy()  # (D, Dt)
    items = np.array([1, 4, 8, 40])
    with torch.no_grad():
        got = model.item_vectors(torch.from_numpy(items)).numpy()
    for row, item in enumerate(items):
        per_level = [sids.codebooks[lvl, sids.codes[item - 1, lvl]] @ w.T for lvl in range(3)]
        want = np.mean(per_level, axis=0) if pooling == "mean" else np.sum(per_level, axis=0)
        np.testing.assert_allclose(got[row], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], got[2])  # items 4 and 8 collide


def test_dedup_level_without_centroids(sids: FakeSids) -> None:
    codes = np.concatenate([sids.codes, np.zeros((N_ITEMS, 1), dtype=np.int64)], axis=1)
    codes[7, 3] = 1  # the dedup level tells items 4 and 8 apart
    model = _model(CONFIGS["sid-mean"], FakeSids(codes, sids.codebooks))
    with torch.no_grad():
        v = model.item_vectors(torch.tensor([4, 8]))
    assert model.sid.n_levels == 4
    assert (v[0] - v[1]).abs().max() > 1e-6


def test_pca_init_matches_numpy_svd() -> None:
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(N_ITEMS, 24)) @ rng.normal(size=(24, 24))
    table = HidEmbedding(N_ITEMS, 6, init_std=0.02, init="pca", item_embeddings=emb)
    got = table.weight.detach().numpy().astype(np.float64)
    assert (got[0] == 0).all()
    centred = emb - emb.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    oracle = u[:, :6] * s[:6]
    oracle *= 0.02 / oracle.std()
    for c in range(6):
        sign = np.sign(got[1:, c] @ oracle[:, c])
        np.testing.assert_allclose(got[1:, c], sign * oracle[:, c], rtol=1e-4, atol=1e-6)
    assert abs(got[1:].std() - 0.02) < 1e-6


def test_pca_init_through_build_model(sids: FakeSids) -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(N_ITEMS, 20)).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(_cfg("h2rec", hid_init="pca"), N_ITEMS, sids, item_embeddings=emb)
    direct = HidEmbedding(N_ITEMS, 16, 0.02, "pca", emb)
    torch.testing.assert_close(model.hid.weight, direct.weight)
    with pytest.raises(ConfigError, match="hidden=32"):
        build_model(_cfg("sasrec", hid_init="pca", hidden=32), N_ITEMS, None, emb)
    with pytest.raises(ConfigError, match="hid_init='pca'"):
        build_model(_cfg("sasrec", hid_init="pca"), N_ITEMS)


def test_build_model_rejects_bad_inputs(sids: FakeSids) -> None:
    with pytest.raises(DataError, match=r"codes: shape \(40, 3\).*n_items=41"):
        build_model(CONFIGS["h2rec"], N_ITEMS + 1, sids)
    with pytest.raises(ConfigError, match="kind='sid' needs semantic IDs"):
        build_model(CONFIGS["sid-mean"], N_ITEMS)
    bad = FakeSids(sids.codes.copy(), sids.codebooks)
    bad.codes[2, 1] = 9
    with pytest.raises(DataError, match=r"codes\[:, 1\]: value 9 >= codebook_size=5"):
        build_model(CONFIGS["h2rec"], N_ITEMS, bad)
    with pytest.raises(DataError, match="item_embeddings"):
        build_model(_cfg("sasrec", hid_init="pca"), N_ITEMS, None, np.zeros((3, 20)))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("kind", "bert", "model.kind='bert'"),
        ("hidden", "64", "model.hidden='64': expected int"),
        ("n_layers", True, "model.n_layers=True: expected int"),
        ("n_heads", 3, "model.n_heads=3: must divide model.hidden=16"),
        ("dropout", 1.0, "model.dropout=1.0"),
        ("align_item_tau", 0.0, "model.align_item_tau=0.0"),
        ("align_seq_target", "both", "model.align_seq_target='both'"),
        ("sid_pooling", "max", "model.sid_pooling='max'"),
        ("causal", 1, "model.causal=1: expected bool"),
        ("branch_loss", -0.5, "model.branch_loss=-0.5: must be a finite number >= 0"),
        ("branch_loss", float("nan"), "model.branch_loss=nan"),
        ("branch_dropout", 1.0, r"model.branch_dropout=1.0: must be in \[0, 1\)"),
    ],
)
def test_model_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"hidden": 16, field: value})  # type: ignore[arg-type]


def test_model_config_defaults() -> None:
    cfg = ModelConfig()
    got = (cfg.kind, cfg.hidden, cfg.n_layers, cfg.dropout, cfg.max_len)
    assert got == ("h2rec", 64, 2, 0.5, 50)
    assert cfg.causal and cfg.shared_backbone
    assert (cfg.align_item_weight, cfg.align_item_tau) == (0.1, 0.5)
    assert (cfg.align_seq_weight, cfg.align_seq_tau) == (0.1, 1.0)
    assert ModelConfig(align_item_tau=1).align_item_tau == 1  # ints are fine for floats


@pytest.mark.parametrize(
    "cfg",
    [
        *CONFIGS.values(),
        _cfg("h2rec", align_seq_target="hid", shared_backbone=False),
        _cfg("h2rec", align_item=False, align_seq=False),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(cfg: ModelConfig, sids: FakeSids) -> None:
    """No unused parameters: DistributedDataParallel needs none (find_unused_parameters off)."""
    model = _model(cfg, sids)
    model.train()
    seq = _batch()
    targets = torch.roll(seq, -1, 1) * (seq > 0)
    negatives = torch.randint(1, N_ITEMS + 1, (4, T, 1), generator=torch.Generator().manual_seed(2))
    states = model(seq)
    loss = recommendation_loss(model, states, targets, negatives)
    (loss + sum(model.aux_losses(seq, states, targets).values())).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------------- cheaper step
# The faster H2Rec step must compute the same mathematics as the per-level, uncached one.


@pytest.mark.parametrize("score", ["paired", "fused"])
@pytest.mark.parametrize("branch", ["sid", "hid"])
def test_one_branch_is_that_half_of_the_dual_model(branch: str, score: str, sids: FakeSids) -> None:
    # the ablations "without the HID / SID branch": with the dual model's weights, a one-branch
    # model's states are the (paired) dual model's halves; its item vectors are the dual
    # model's halves (paired) or the whole HID + SID vector (fused)
    d = CONFIGS["h2rec"].hidden
    dual = _model(CONFIGS["h2rec-paired"], sids)
    one = _model(replace(CONFIGS["h2rec"], branches=branch, item_score=score), sids)
    missing, unexpected = one.load_state_dict(dual.state_dict(), strict=False)
    assert missing == []
    assert unexpected and all(k.startswith(("level_attn.", "hid_attn.", "gate.")) for k in unexpected)
    half = slice(0, d) if branch == "sid" else slice(d, 2 * d)
    seq = _batch()
    with torch.no_grad():
        torch.testing.assert_close(one(seq), dual(seq)[..., half], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.user_states(seq), dual.user_states(seq)[..., half], atol=1e-5, rtol=1e-5)
        items = torch.arange(N_ITEMS + 1)
        want = dual.all_item_vectors()[:, half] if score == "paired" else dual.hid(items) + dual.sid(items)
        torch.testing.assert_close(one.all_item_vectors(), want)
    assert one.out_dim == d


def test_one_branch_refuses_a_target_from_the_other() -> None:
    with pytest.raises(ConfigError, match="reads the HID branch's state, which model.branches='sid'"):
        _cfg("h2rec", branches="sid", align_seq_target="hid")
    _cfg("h2rec", branches="sid", align_seq_target="hid", align_seq=False)  # no loss, no clash
    _cfg("h2rec", branches="sid", align_seq_target="branch")
    _cfg("h2rec", branches="hid", align_seq_target="hid")


@pytest.mark.parametrize("branches,target", [("sid", "branch"), ("hid", "hid"), ("hid", "branch")])
def test_one_branch_pulls_the_masked_view_to_its_own_state(branches: str, target: str, sids: FakeSids) -> None:
    model = _model(_cfg("h2rec", branches=branches, align_seq_target=target, align_item=False), sids)
    seq = _batch()
    states = model(seq)
    got = model._sequence_alignment(seq, states)
    real = seq > 0
    allowed = attention_mask(real, True)
    gate = model.level_gate(seq)[:, -1]
    masked = mask_lowest_levels(model.sid.levels(seq), gate, model.mask_vectors, real)
    u = model.backbone(model.input(model.sid.pool(masked), real), real, allowed)[:, -1]
    rows = real[:, -1]
    torch.testing.assert_close(got, symmetric_info_nce(u[rows], states[:, -1][rows], 1.0))


def test_batched_level_attention_equals_per_level_cross_attention() -> None:
    torch.manual_seed(3)
    per_level = [CrossAttention(16, 2, dropout=0.4).eval() for _ in range(3)]
    with torch.no_grad():  # LayerNorm affines away from 1 / 0: the batched form folds them in
        for m in per_level:
            for ln in (m.ln_q, m.ln_kv):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0.0, 0.3)
    batched = LevelCrossAttention.from_modules(per_level).eval()
    seq = _batch()
    real = seq > 0
    allowed = attention_mask(real, causal=True)
    g = torch.Generator().manual_seed(4)
    levels = (torch.randn(4, T, 3, 16, generator=g) * real[..., None, None]).requires_grad_()
    kv = (torch.randn(4, T, 16, generator=g) * real[..., None]).requires_grad_()
    want = torch.stack(
        [m(levels[:, :, lvl], kv, real, allowed) for lvl, m in enumerate(per_level)], dim=2
    )
    got = batched(levels, kv, real, allowed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(want.shape, generator=g)
    grads_want = torch.autograd.grad((want * w).sum(), [levels, kv], retain_graph=True)
    grads_got = torch.autograd.grad((got * w).sum(), [levels, kv], retain_graph=True)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and the LayerNorm parameters the fold reads get the same gradients
    (got * w).sum().backward()
    (want * w).sum().backward()
    for lvl, m in enumerate(per_level):
        torch.testing.assert_close(batched.ln_kv_weight.grad[lvl], m.ln_kv.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.ln_kv_bias.grad[lvl], m.ln_kv.bias.grad, rtol=1e-4, atol=1e-5)


def test_old_checkpoints_with_per_level_attention_load(sids: FakeSids) -> None:
    model = _model(CONFIGS["h2rec"], sids)
    seq = _batch()
    want = model(seq)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("level_attn.")}
    la = model.level_attn
    for lvl in range(3):
        old[f"level_attn.{lvl}.ln_q.weight"] = la.ln_q_weight[lvl].detach().clone()
        old[f"level_attn.{lvl}.ln_q.bias"] = la.ln_q_bias[lvl].detach().clone()
        old[f"level_attn.{lvl}.ln_kv.weight"] = la.ln_kv_weight[lvl].detach().clone()
        old[f"level_attn.{lvl}.ln_kv.bias"] = la.ln_kv_bias[lvl].detach().clone()
        for j, name in enumerate(("q", "k", "v", "out")):
            old[f"level_attn.{lvl}.attn.{name}.weight"] = la.weight[lvl, j].detach().clone()
            old[f"level_attn.{lvl}.attn.{name}.bias"] = la.bias[lvl, j].detach().clone()
    fresh = _model(CONFIGS["h2rec"], sids, seed=9)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(seq), want)


def test_backbone_last_position_only_equals_the_full_pass(sids: FakeSids) -> None:
    model = _model(CONFIGS["h2rec"], sids)
    seq = _batch()
    real = seq > 0
    allowed = attention_mask(real, causal=True)
    x = model.input(model.hid(seq), real)
    full = model.backbone(x, real, allowed)
    last = model.backbone(x, real, allowed, last_only=True)
    assert last.shape == (4, 16)
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-6)


def test_embedding_bag_item_vectors_equal_pooled_levels(sids: FakeSids) -> None:
    for name in ("sid-mean", "sid-sum"):
        model = _model(CONFIGS[name], sids)
        items = torch.tensor([[0, 3, 8], [4, 40, 0]])
        a = model.sid(items)
        b = model.sid.pool(model.sid.levels(items))
        torch.testing.assert_close(a, b)
        assert (a[0, 0] == 0).all()
        ga = torch.autograd.grad(a.square().sum(), model.sid.table)[0]
        gb = torch.autograd.grad(b.square().sum(), model.sid.table)[0]
        torch.testing.assert_close(ga, gb)


def test_sequence_alignment_reuses_the_forward_pass_exactly(sids: FakeSids) -> None:
    # without dropout, the cached path (after forward on the same tensor) and the recomputing
    # path (a copy of the tensor misses the cache) give the same loss and gradients
    model = _model(_cfg("h2rec", dropout=0.0), sids)
    model.train()
    seq = _batch()
    states = model(seq)
    cached = model._sequence_alignment(seq, states)
    g1 = torch.autograd.grad(cached, model.mask_vectors, retain_graph=True)[0]
    fresh = model._sequence_alignment(seq.clone(), states)
    g2 = torch.autograd.grad(fresh, model.mask_vectors)[0]
    torch.testing.assert_close(cached, fresh)
    torch.testing.assert_close(g1, g2)


def test_dropout_keeps_the_expectation_and_is_off_in_eval() -> None:
    drop = Dropout(0.3)
    x = torch.ones(400, 500)
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).float().mean()
    assert abs(float(kept) - 0.7) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    assert abs(float(y.mean()) - 1.0) < 0.02
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # reproducible from the torch seed
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)


def test_dropout_mask_is_the_same_whatever_the_thread_count_and_is_the_gradient() -> None:
    drop = Dropout(0.25)  # 0.25 * 65536 is whole: the kernel's scale is exactly 1 / 0.75
    x = torch.randn(3, 70_001, requires_grad=True)  # spans several of the kernel's chunks
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(4)
            outs.append(drop(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    mask = outs[0].detach() / x.detach()  # 0 or 1 / (1 - p)
    kept = mask != 0
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / 0.75))
    assert abs(float(kept.float().mean()) - 0.75) < 0.01
    (grad,) = torch.autograd.grad(outs[0].sum(), x)
    torch.testing.assert_close(grad, mask)
    # consecutive calls draw new masks from the torch generator
    torch.manual_seed(4)
    first, second = drop(x), drop(x)
    assert not torch.equal(first != 0, second != 0)


def test_hid_popularity_gate_scales_the_hid_half_of_item_vectors(sids: FakeSids) -> None:
    pop = np.zeros(N_ITEMS + 1)
    pop[1:] = np.arange(N_ITEMS)  # item 1 never seen in training, item 40 seen 39 times
    torch.manual_seed(0)
    model = build_model(_cfg("h2rec", hid_pop_gate=True, item_score="paired"), N_ITEMS, sids,
                        popularity=pop)
    items = torch.tensor([1, 2, 40])
    w = model.hid_weight(items).detach()
    assert 0 < float(w[0]) < float(w[1]) < float(w[2]) < 1  # rarer items weigh less
    assert float(w[0]) == pytest.approx(0.5)  # sigmoid(0) at init for an unseen item
    vec = model.item_vectors(items)
    torch.testing.assert_close(vec[:, :16], model.hid(items) * w[:, None])
    torch.testing.assert_close(vec[:, 16:], model.sid(items))
    model.all_item_vectors()[1:].sum().backward()
    assert model.pop_scale.grad is not None and float(model.pop_scale.grad) != 0.0
    with pytest.raises(DataError, match="hid_pop_gate needs the training popularity"):
        build_model(_cfg("h2rec", hid_pop_gate=True), N_ITEMS, sids)


def test_fused_item_score_scores_both_branches_against_hid_plus_sid(sids: FakeSids) -> None:
    """model.item_score=fused: the score is [s_sid ; s_hid] . [HID + SID ; HID + SID], computed
    as (s_sid + s_hid) . (HID + SID), D wide. Oracle: the paired model with the same weights,
    whose state halves are the two branches, scored against the doubled fused vector."""
    torch.manual_seed(0)
    fused = build_model(_cfg("h2rec"), N_ITEMS, sids)
    assert fused.cfg.item_score == "fused" and fused.out_dim == 16
    paired = build_model(_cfg("h2rec", item_score="paired"), N_ITEMS, sids)
    paired.load_state_dict(fused.state_dict())
    fused.eval(), paired.eval()
    items = torch.tensor([[0, 4, 8, 40]])
    seq = _batch()
    with torch.no_grad():
        f = (fused.hid(items) + fused.sid(items))[0]  # (4, D)
        torch.testing.assert_close(fused.item_vectors(items)[0], f)
        assert torch.equal(f[0], torch.zeros_like(f[0]))  # padding stays zero
        torch.testing.assert_close(fused.all_item_vectors()[items[0]], f)
        halves = paired.user_states(seq)  # (B, 2D)
        states = fused.user_states(seq)
        torch.testing.assert_close(states, halves[:, :16] + halves[:, 16:])
        torch.testing.assert_close(fused(seq), paired(seq)[..., :16] + paired(seq)[..., 16:])
        want = halves @ torch.cat([fused.all_item_vectors()] * 2, dim=1).T  # (B, N + 1)
        torch.testing.assert_close(states @ fused.all_item_vectors().T, want, atol=1e-5, rtol=1e-5)
        pv = paired.item_vectors(items)[0]  # the paper's pairing
        torch.testing.assert_close(pv[:, :16], paired.hid(items)[0])
        torch.testing.assert_close(pv[:, 16:], paired.sid(items)[0])
    # training: the sequence-level loss reads each branch's own state, not the sum
    targets = torch.roll(seq, -1, 1) * (seq > 0)
    for target in ("branch", "hid"):
        cached, uncached = [], []
        for model in (fused, paired):
            model.cfg = replace(model.cfg, align_seq_target=target, align_item=False)
            model.train()  # the forward caches the branch states for the loss
            torch.manual_seed(3)
            cached.append(model.aux_losses(seq, model(seq), targets)["align_seq"])
            model.eval()  # no cache, no dropout: the fused model recomputes its branch states
            uncached.append(model.aux_losses(seq, model(seq), targets)["align_seq"])
        torch.testing.assert_close(cached[0], cached[1])
        torch.testing.assert_close(uncached[0], uncached[1])
        assert float(cached[0].detach()) != float(uncached[0].detach())  # dropout was on first
    with pytest.raises(ConfigError, match="item_score"):
        _cfg("h2rec", item_score="sum")


def test_fusion_item_is_its_hid_row_plus_its_pooled_sid_levels(sids: FakeSids) -> None:
    """Naive fusion: item vector = HID row + mean of the projected code embeddings of its levels;
    the same vectors feed the backbone and score the items."""
    model = _model(_cfg("fusion"), sids)
    items = torch.tensor([[0, 4, 8, 40]])
    with torch.no_grad():
        vec = model.item_vectors(items)[0]
        table = model.hid.weight.numpy()
        proj = model.sid.proj.weight.numpy()  # (D, Dt)
        levels = [model.sid.table[model.sid.offsets[lv] : model.sid.offsets[lv] + 5].numpy()
                  for lv in range(3)]
    for row, item in enumerate([0, 4, 8, 40]):
        if item == 0:
            expected = np.zeros(16, dtype=np.float32)
        else:
            code = sids.codes[item - 1]
            expected = table[item] + np.mean([levels[lv][code[lv]] @ proj.T for lv in range(3)], axis=0)
        np.testing.assert_allclose(vec[row].numpy(), expected, rtol=1e-5, atol=1e-6)
    # items 4 and 8 share their SID tuple but not their HID row: fusion tells them apart
    assert not torch.allclose(vec[1], vec[2])


def test_fused_attention_folds_leading_dimensions() -> None:
    # what attend runs on CUDA: 5-D (levels, batch, heads, T, d) inputs folded to 4-D for the
    # fused kernels, against the plain CPU form (scores, mask, softmax, weighted sum)
    from h2rec.models.backbone import Dropout, attend, fused_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 2, 6, 8, generator=g) for _ in range(3))
    real = torch.ones(4, 6, dtype=torch.bool)
    real[0, :2] = False
    allowed = attention_mask(real, causal=True)[None]  # (1, B, 1, T, T)
    want = attend(q, k, v, allowed, Dropout(0.0))
    got = fused_attention(q, k, v, allowed)
    assert got.shape == want.shape == (3, 4, 2, 6, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)



# ----------------------------------------------------------------------------- text match


@pytest.mark.parametrize("name", ["sasrec-text", "fusion-text", "h2rec-text", "h2rec-paired-text"])
def test_text_match_adds_the_weighted_profile_similarity_to_every_score(name: str, sids: FakeSids) -> None:
    """score(t, i) = base score + softplus(b + a . h_t) * sum_{s<=t} exp(-decay (t-s)) <e_s, e_i>
    with unit-norm text vectors, against a loop in numpy."""
    cfg = CONFIGS[name]
    model = _model(cfg, sids)
    base = _model(replace(cfg, text_match=False), sids)
    missing, unexpected = base.load_state_dict(model.state_dict(), strict=False)
    assert unexpected and not missing  # only the text-match entries are extra
    with torch.no_grad():
        model.text_match.scale.copy_(torch.linspace(-1.0, 1.0, model.text_match.scale.shape[0]))
        model.text_match.bias.fill_(0.3)
    seq = _batch()
    with torch.no_grad():
        got = (model(seq) @ model.all_item_vectors().T).numpy()  # (B, T, N+1)
        h = base(seq).numpy()  # (B, T, D)
        base_scores = h @ base.all_item_vectors().numpy().T
    unit = np.zeros((N_ITEMS + 1, TEXT_DIM))
    norms = np.linalg.norm(TEXT, axis=1)
    unit[1:][norms > 0] = TEXT[norms > 0] / norms[norms > 0, None]
    a = model.text_match.scale.detach().numpy().astype(np.float64)
    want = base_scores.astype(np.float64).copy()
    s_np = seq.numpy()
    for b in range(s_np.shape[0]):
        for t in range(T):
            q = np.zeros(TEXT_DIM)
            for s in range(t + 1):
                q += np.exp(-cfg.text_match_decay * (t - s)) * unit[s_np[b, s]]  # padding: 0
            w = np.log1p(np.exp(0.3 + h[b, t] @ a))
            want[b, t] += w * (unit @ q)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(got - base_scores).max() > 1e-2  # the term is not negligible here


@pytest.mark.parametrize("name", ["sasrec-text", "h2rec-text"])
def test_text_match_columns_never_read_later_items_even_without_causal_mask(
    name: str, sids: FakeSids
) -> None:
    model = _model(replace(CONFIGS[name], causal=False), sids)
    seq = _batch()
    changed = seq.clone()
    changed[:, 6:] = torch.where(seq[:, 6:] > 0, seq[:, 6:] % N_ITEMS + 1, seq[:, 6:])
    with torch.no_grad():
        a, b = model(seq), model(changed)
    d = a.shape[-1] - TEXT_DIM
    # the weight w_t reads the (leaking) backbone state, the profile q_t does not: compare q_t
    qa = a[:, :6, d:] / a[:, :6, d:].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    qb = b[:, :6, d:] / b[:, :6, d:].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(qa, qb, atol=1e-5, rtol=0)


def test_text_match_needs_embeddings_and_keeps_its_own_copy(sids: FakeSids) -> None:
    cfg = CONFIGS["h2rec-text"]
    with pytest.raises(ConfigError, match="text_match needs item text embeddings"):
        build_model(cfg, N_ITEMS, sids, None)
    with pytest.raises(DataError, match="does not match n_items"):
        build_model(cfg, N_ITEMS, sids, TEXT[:-1])
    bad = TEXT.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        build_model(cfg, N_ITEMS, sids, bad)
    model = _model(cfg, sids)
    other = build_model(cfg, N_ITEMS, sids, TEXT[::-1].copy())  # embeddings changed since
    other.load_state_dict(model.state_dict())  # the checkpoint's text vectors win
    other.eval()
    seq = _batch()
    with torch.no_grad():
        torch.testing.assert_close(other(seq) @ other.all_item_vectors().T,
                                   model(seq) @ model.all_item_vectors().T)


@pytest.mark.parametrize("field,value", [("text_match_decay", -0.1), ("text_match_init", 0.0)])
def test_text_match_settings_are_checked(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"model.{field}"):
        ModelConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 3, 8, 15, 16, 17, 50])
def test_softmax_of_short_and_long_rows_against_numpy(n: int) -> None:
    # rows under 16 values take the padded path on the CPU; the oracle is float64 numpy
    from h2rec.ops import softmax

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, 3, n, generator=gen) * 4
    x[0, 0, : n - 1] = float("-inf")  # one value left: probability 1
    x64 = x.double().numpy()
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    with torch.no_grad():
        got = softmax(x)
    assert got.shape == x.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    # with a gradient to take: the same forward bits, and backward against float64 autograd
    xg = x.clone().requires_grad_(True)
    p = softmax(xg)
    assert torch.equal(p.detach(), got)
    w = torch.randn(x.shape, generator=gen)
    (g,) = torch.autograd.grad((p * w).sum(), xg)
    x64t = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad((torch.softmax(x64t, -1) * w.double()).sum(), x64t)
    np.testing.assert_allclose(g.numpy(), g64.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_branch_loss_scores_each_branch_alone(shared: bool, sids: FakeSids) -> None:
    # model.branch_loss: weight x (CE of the SID branch's state + CE of the HID branch's state),
    # each scored alone against the fused item vectors; the oracle is the cross-entropy by hand,
    # values and gradients
    from h2rec.config import RunConfig
    from h2rec.train import TrainStep

    weight = 0.7
    cfg = RunConfig()
    cfg = replace(cfg, model=_cfg("h2rec", dropout=0.0, branch_loss=weight, shared_backbone=shared),
                  train=replace(cfg.train, loss="full_softmax"))
    model = _model(cfg.model, sids)
    model.train()  # dropout 0: the states are a function of the batch only
    seq = _batch()
    targets = torch.where(seq > 0, seq % N_ITEMS + 1, seq)
    step = TrainStep(model, cfg)
    _, parts = step(seq, targets, torch.zeros(4, T, 1, dtype=torch.long))
    assert set(parts) == {"rec", "branch", "align_item", "align_seq"}
    assert model.take_branch_states(seq) is None  # taken by the step
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(parts["branch"], params, allow_unused=True)
    s_sid, s_hid, _, _ = model._branches(seq)
    model.take_branch_states(seq)  # not wanted here
    items = model.all_item_vectors()[1:]
    valid = targets > 0

    def ce(states: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(states[valid] @ items.T, dim=-1)
        return -logp[torch.arange(int(valid.sum())), targets[valid] - 1].mean()

    want = weight * (ce(s_sid) + ce(s_hid))
    assert float(parts["rec"].detach()) == pytest.approx(float(ce(s_sid + s_hid).detach()), rel=1e-5)
    assert float(parts["branch"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    n_checked = 0
    for g, w in zip(got, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
            n_checked += int(bool(w.abs().sum() > 0))
    assert n_checked > 10  # both branches' paths, the tables and the backbone get gradients
    # off: no part, nothing kept
    off = replace(cfg, model=replace(cfg.model, branch_loss=0.0))
    model0 = _model(off.model, sids)
    model0.train()
    _, parts0 = TrainStep(model0, off)(seq, targets, torch.zeros(4, T, 1, dtype=torch.long))
    assert "branch" not in parts0 and model0.take_branch_states(seq) is None


@pytest.mark.parametrize(
    ("loss", "negatives", "last_only"),
    [("bce", "per-position", False), ("sampled_softmax", "per-position", True),
     ("sampled_softmax", "shared", False), ("full_softmax", "per-position", True)],
)
def test_branch_loss_follows_every_loss_kind(
    loss: str, negatives: str, last_only: bool, sids: FakeSids
) -> None:
    # the branch part is the run's own loss of each branch's state alone, scaled as the
    # recommendation loss is (per position over the epoch), whatever the loss and negatives
    from h2rec.config import RunConfig
    from h2rec.train import TrainStep
    from h2rec.train.step import LossPlan

    cfg = RunConfig()
    cfg = replace(cfg, model=_cfg("h2rec", dropout=0.0, branch_loss=0.5),
                  train=replace(cfg.train, loss=loss, last_only=last_only))
    model = _model(cfg.model, sids)
    model.train()
    seq = _batch()
    targets = torch.where(seq > 0, seq % N_ITEMS + 1, seq)
    g = torch.Generator().manual_seed(4)
    if negatives == "shared":
        neg = torch.randint(1, N_ITEMS + 1, (7,), generator=g)
        plan = LossPlan("sampled_softmax", 7, True)
        log_q = torch.log(torch.full((N_ITEMS + 1,), 1.0 / N_ITEMS))
    else:
        neg = torch.randint(1, N_ITEMS + 1, (4, T, 3), generator=g)
        plan, log_q = None, None
    step = TrainStep(model, cfg, plan, log_q)
    step.position_scale = 5.0
    with torch.no_grad():
        _, parts = step(seq, targets, neg)
        s_sid, s_hid, _, _ = model._branches(seq)
        kind = step.plan.kind
        real = (targets[:, -1:] if last_only else targets) > 0
        scale = float(real.sum()) / 5.0
        lq = step.log_q

        def one(states: torch.Tensor) -> float:
            return float(recommendation_loss(model, states, targets, neg, kind=kind,
                                             last_only=last_only, log_q=lq)) * scale

        assert float(parts["branch"]) == pytest.approx(0.5 * (one(s_sid) + one(s_hid)), rel=1e-5)
        assert float(parts["rec"]) == pytest.approx(one(s_sid + s_hid), rel=1e-5)


def test_branch_states_are_kept_for_their_own_batch_only(sids: FakeSids) -> None:
    model = _model(_cfg("h2rec", dropout=0.0, branch_loss=0.5), sids)
    a, b = _batch(1), _batch(2)
    model.train()
    model(a)
    assert model.take_branch_states(b) is None  # another batch's: never handed out
    assert model.take_branch_states(a) is None  # and cleared
    model(a)
    model.eval()
    model(b)  # an evaluation forward clears it
    assert model.take_branch_states(a) is None
    model.train()
    model(a)
    pair = model.take_branch_states(a)
    assert pair is not None and pair.shape == (8, T, 16)


@pytest.mark.parametrize(
    "kw",
    [dict(branches="hid", shared_backbone=False), dict(item_score="paired"), dict(text_match=True)],
)
def test_branch_loss_needs_both_branches_and_fused_scores(kw: dict) -> None:
    with pytest.raises(ConfigError, match="model.branch_loss=0.5 scores each branch's state alone"):
        _cfg("h2rec", branch_loss=0.5, **kw)


def test_branch_dropout_leaves_the_sid_state_out_for_some_sequences(sids: FakeSids) -> None:
    # training: each sequence's user vector is s_hid alone or s_hid + s_sid / (1 - p), about a
    # share p of them the first; evaluation: always the sum; seeded: the same draws again
    p = 0.25
    model = _model(_cfg("h2rec", dropout=0.0, branch_dropout=p), sids)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(1, N_ITEMS + 1, (400, T), generator=g)
    with torch.no_grad():
        s_sid, s_hid, _, _ = model._branches(seq)
        torch.testing.assert_close(model(seq), s_sid + s_hid)  # eval mode: the sum
        model.train()
        torch.manual_seed(0)
        out = model(seq)
        dropped = torch.isclose(out, s_hid, atol=1e-6, rtol=0).flatten(1).all(1)
        kept = torch.isclose(out, s_hid + s_sid / (1 - p), atol=1e-5, rtol=1e-5).flatten(1).all(1)
        assert bool((dropped ^ kept).all())  # every sequence is one or the other
        assert 0.18 < float(dropped.float().mean()) < 0.32  # 400 draws of p = 0.25
        torch.manual_seed(0)
        torch.testing.assert_close(model(seq), out, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="model.branch_dropout=0.5 leaves the SID branch"):
        _cfg("h2rec", branch_dropout=0.5, item_score="paired")
    for kind in ("sasrec", "sid", "fusion"):
        for name in ("branch_dropout", "branch_loss"):
            with pytest.raises(ConfigError, match=f"model.{name}=0.5 acts on H2Rec's two branches"):
                _cfg(kind, **{name: 0.5})


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inference_forward_equals_the_training_computation(name: str, heads: int, sids: FakeSids) -> None:
    # in eval mode the attentions run folded (no key or value projections: one head, or the
    # last block's single query) and the linear layers and LayerNorms on the Rust core; the
    # training computation (train mode, no dropout, autograd on: torch ops, unfolded) is the
    # oracle, on the same weights
    cfg = replace(CONFIGS[name], dropout=0.0, n_heads=heads)
    model = _model(cfg, sids)
    with torch.no_grad():  # weights away from their init, so that every term matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    seq = _batch()
    with torch.inference_mode():
        fast_all, fast_last = model(seq), model.user_states(seq)
    model.train()
    with torch.enable_grad():
        ref_all = model(seq).detach()
    model.eval()
    torch.testing.assert_close(fast_all, ref_all, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fast_last, ref_all[:, -1], atol=2e-5, rtol=2e-5)
