"""The text blend: a fixed-weight text-match term added after training, its weight chosen on the
validation split, saved beside the checkpoints and applied wherever the run is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from h2rec import blend
from h2rec.cli import main
from h2rec.config import RunConfig, apply_overrides
from h2rec.errors import CheckpointError, ConfigError
from h2rec.evaluate import evaluate
from h2rec.train import build_for, load_checkpoint, seed_everything, train
from h2rec.train.checkpoint import checkpoint_blend, set_checkpoint_blend

from conftest import QUICK_TRAIN, small_builtin

FAST = ["model.hidden=16", "model.max_len=12", *QUICK_TRAIN, "train.epochs=2", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_builtin(tmp_path_factory.mktemp("blend"), n_users=200, n_items=120, seed=1,
                         emb_dim=24, levels=2, codebook=8, n_iter=8, save=True)


def _cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), [*FAST, *overrides])


def _unit(emb: np.ndarray) -> np.ndarray:
    e = np.asarray(emb, dtype=np.float64)
    out = np.zeros((e.shape[0] + 1, e.shape[1]))
    norms = np.linalg.norm(e, axis=1)
    out[1:][norms > 0] = e[norms > 0] / norms[norms > 0, None]
    return out


def test_attach_adds_the_weighted_profile_similarity_and_detach_removes_it(
    data: dict[str, Any],
) -> None:
    cfg = _cfg("model.kind=h2rec")
    seed_everything(0)
    model = build_for(cfg, data["store"], data["sids"], None).eval()
    keys = set(model.state_dict())
    seq = torch.tensor([[0, 0, 3, 9, 27], [5, 6, 7, 8, 1]])
    with torch.no_grad():
        base = (model(seq) @ model.all_item_vectors().T).numpy()
        blend.attach(model, data["embeddings"], 2.5)
        got = (model(seq) @ model.all_item_vectors().T).numpy()
        last = (model.user_states(seq) @ model.all_item_vectors().T).numpy()
    unit = _unit(data["embeddings"])
    want = base.astype(np.float64).copy()
    for b in range(2):
        for t in range(5):
            q = sum(np.exp(-blend.BLEND_DECAY * (t - s)) * unit[int(seq[b, s])] for s in range(t + 1))
            want[b, t] += 2.5 * (unit @ q)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(last, got[:, -1], atol=1e-4, rtol=1e-4)
    assert set(model.state_dict()) == keys  # the checkpoint format is unchanged
    assert not any("text" in n for n, _ in model.named_parameters())  # nothing trains
    blend.detach(model)
    with torch.no_grad():
        np.testing.assert_array_equal((model(seq) @ model.all_item_vectors().T).numpy(), base)


def test_the_chosen_weight_is_the_best_on_validation_and_the_test_split_is_not_read(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg("model.kind=fusion")
    seed_everything(0)
    model = build_for(cfg, data["store"], data["sids"], None).eval()
    import h2rec.train.distributed as dist_mod

    splits: list[str] = []
    real = dist_mod.evaluate

    def spy(m: Any, store: Any, split: str, *a: Any, **k: Any) -> Any:
        splits.append(split)
        return real(m, store, split, *a, **k)

    monkeypatch.setattr(dist_mod, "evaluate", spy)
    record = blend.choose(model, data["embeddings"], lambda m: dist_mod._evaluate_all(
        m, data["store"], "valid", cfg, 1, 0))
    assert set(splits) == {"valid"} and len(splits) == len(blend.BLEND_GRID)
    # oracle: each weight evaluated on its own
    table = {}
    for w in blend.BLEND_GRID:
        blend.detach(model)
        if w:
            blend.attach(model, data["embeddings"], w)
        table[f"{w:g}"] = evaluate(model, data["store"], "valid", cfg.eval, cfg.model.max_len).ndcg10
    assert record["valid_ndcg10"] == pytest.approx(table)
    best = max(table.values())
    assert record["weight"] == min(float(w) for w, v in table.items() if v == best)
    assert record["embeddings_sha256"] == blend.embeddings_digest(data["embeddings"])


def test_training_chooses_saves_and_reloads_the_blend(data: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg("model.kind=h2rec")
    run = tmp_path / "h2"
    result = train(cfg, data["store"], data["sids"], data["embeddings"], run_dir=run)
    record = checkpoint_blend(run / "best.pt")  # the checkpoint holds the blend it scores with
    assert record == json.loads((run / blend.BLEND_FILE).read_text())  # and a readable copy
    w = record["weight"]
    assert record["valid_ndcg10"][f"{w:g}"] == max(record["valid_ndcg10"].values())
    assert json.loads((run / "metrics.json").read_text())["text_blend_weight"] == w
    # the test metrics the run reports are the blended model's, and so are a reload's
    model, _ = load_checkpoint(run / "best.pt", data["store"], data["sids"], data["embeddings"])
    assert (model.text_match is not None) == (w > 0)
    again = evaluate(model, data["store"], "test", cfg.eval, cfg.model.max_len)
    assert again.ndcg10 == pytest.approx(result.test.ndcg10, abs=1e-12)
    # last.pt has other weights: no blend; a copy of best.pt elsewhere keeps it
    last, _ = load_checkpoint(run / "last.pt", data["store"], data["sids"], data["embeddings"])
    assert last.text_match is None
    copy = tmp_path / "copy.pt"
    copy.write_bytes((run / "best.pt").read_bytes())
    forced = {**record, "weight": 2.0}
    set_checkpoint_blend(copy, forced)
    moved, _ = load_checkpoint(copy, data["store"], data["sids"], data["embeddings"])
    assert moved.text_match is not None and moved.text_match.fixed == 2.0
    # a blend needs the embeddings it was chosen with
    with pytest.raises(ConfigError, match="needs the item embeddings"):
        load_checkpoint(copy, data["store"], data["sids"], None)
    with pytest.raises(CheckpointError, match="embeddings_sha256 differs"):
        load_checkpoint(copy, data["store"], data["sids"], data["embeddings"] * 2)
    set_checkpoint_blend(copy, {"format": "h2rec-text-blend", "version": 1})
    with pytest.raises(CheckpointError, match="not a readable text blend"):
        load_checkpoint(copy, data["store"], data["sids"], data["embeddings"])
    # a fresh run over the folder leaves no old blend behind; a resume with the blend off
    # strips it from best.pt
    train(_cfg("model.kind=h2rec", "train.epochs=3", "train.text_blend=off"), data["store"],
          data["sids"], data["embeddings"], run_dir=run, resume=True)
    assert checkpoint_blend(run / "best.pt") is None and not (run / blend.BLEND_FILE).exists()
    set_checkpoint_blend(run / "best.pt", forced)
    blend.write_copy(run, forced)
    train(_cfg("model.kind=h2rec", "train.text_blend=off"), data["store"], data["sids"],
          data["embeddings"], run_dir=run, overwrite=True)
    assert checkpoint_blend(run / "best.pt") is None and not (run / blend.BLEND_FILE).exists()


def test_a_sasrec_checkpoint_with_a_blend_is_refused(data: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "sas"
    train(_cfg("model.kind=sasrec", "train.epochs=1"), data["store"], None, data["embeddings"],
          run_dir=run)
    record = {"format": blend.BLEND_FORMAT, "version": 1, "weight": 1.0,
              "decay": 0.5, "embeddings_sha256": blend.embeddings_digest(data["embeddings"])}
    set_checkpoint_blend(run / "best.pt", record)
    with pytest.raises(CheckpointError, match="sasrec model never gets"):
        load_checkpoint(run / "best.pt", data["store"], None, data["embeddings"])


@pytest.mark.parametrize("kind,sets", [("sasrec", []), ("h2rec", ["train.text_blend=off"]),
                                       ("fusion", ["model.text_match=true"])])
def test_no_blend_for_sasrec_when_off_or_with_a_trained_text_match(
    kind: str, sets: list[str], data: dict[str, Any], tmp_path: Path
) -> None:
    cfg = _cfg(f"model.kind={kind}", "train.epochs=1", *sets)
    train(cfg, data["store"], data["sids"], data["embeddings"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / blend.BLEND_FILE).exists()


def test_blend_command_chooses_for_a_finished_run(
    data: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "fu"
    args = ["train", str(data["path"]), "--name", "fu", "--output-dir", str(tmp_path / "runs"),
            "--set", "model.kind=fusion", "--set", "train.text_blend=off"]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    assert not (run / blend.BLEND_FILE).exists()
    assert main(["blend", str(run)]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / blend.BLEND_FILE).read_text())
    assert f"chose {record['weight']:g}" in out
    assert checkpoint_blend(run / "best.pt") == record
    assert main(["blend", str(run)]) == 2  # chosen: --overwrite to choose again
    assert "--overwrite" in capsys.readouterr().err
    assert record["version"] == 2 and record["kind"] == "tfidf"  # the dataset has item text
    # a blend the run can no longer load (other text) is chosen again with --overwrite
    set_checkpoint_blend(run / "best.pt", {**record, "weight": 1.0, "text_sha256": "0" * 64})
    assert main(["evaluate", str(run)]) == 2
    assert "text_sha256 differs" in capsys.readouterr().err
    assert main(["blend", str(run), "--overwrite"]) == 0
    assert checkpoint_blend(run / "best.pt") == record  # deterministic
    assert json.loads((run / blend.BLEND_FILE).read_text()) == record
    # --mode rare: the popularity-scaled blend, which evaluation then scores with
    assert main(["blend", str(run), "--overwrite", "--mode", "rare"]) == 0
    out = capsys.readouterr().out
    rare = checkpoint_blend(run / "best.pt")
    assert rare is not None and rare["version"] == 3
    assert f"chose {rare['weight']:g} (pop exponent {rare['pop_exponent']:g})" in out
    assert "pop exponent 0.15, weight 8: validation NDCG@10" in out
    assert main(["evaluate", str(run), "--split", "valid", "--out", str(tmp_path / "v.json")]) == 0
    got = json.loads((tmp_path / "v.json").read_text())["models"]
    (metrics,) = got.values()
    best = rare["valid_ndcg10"][f"{rare['pop_exponent']:g}"][f"{rare['weight']:g}"]
    assert metrics["metrics"]["NDCG@10"] == pytest.approx(best, abs=1e-12)
    sas = tmp_path / "runs" / "sas"
    args = ["train", str(data["path"]), "--name", "sas", "--output-dir", str(tmp_path / "runs"),
            "--set", "model.kind=sasrec"]
    for s in FAST:
        args += ["--set", s]
    assert main(args) == 0
    assert main(["blend", str(sas)]) == 2
    assert "gets no text blend" in capsys.readouterr().err


def test_a_blended_run_serves_and_exports_with_its_blend(data: dict[str, Any], tmp_path: Path) -> None:
    from h2rec.serving import Recommender

    cfg = _cfg("model.kind=fusion", "train.epochs=1", "train.text_blend=off",
               f"data.path={data['path']}", f"sid.path={data['path'] / 'sid'}")
    run = tmp_path / "fu"
    train(cfg, data["store"], data["sids"], data["embeddings"], run_dir=run)
    plain = Recommender.load(run)
    set_checkpoint_blend(run / "best.pt", {
        "format": blend.BLEND_FORMAT, "version": 1, "weight": 3.0,
        "decay": blend.BLEND_DECAY, "embeddings_sha256": blend.embeddings_digest(data["embeddings"])})
    rec = Recommender.load(run)
    assert rec.model.text_match is not None and plain.model.text_match is None
    items = rec.item_vectors()["items"]
    assert items.shape[1] == plain.item_vectors()["items"].shape[1] + data["embeddings"].shape[1]
    out = rec.export(tmp_path / "export")  # checks the exported encoder's scores against the model
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dim"] == items.shape[1]
    # the blend moves the ranking
    a = rec.evaluate("test").ndcg10
    b = plain.evaluate("test").ndcg10
    assert a != b


# --------------------------------------------------------------------------- the TF-IDF rows


def _dense_rows(texts: list[str]) -> np.ndarray:
    """Oracle: the TF-IDF rows as a dense (n + 1, terms) float64 matrix, row 0 zero."""
    from h2rec.embed import tfidf_matrix

    m, _ = tfidf_matrix(texts, min_df=blend.TFIDF_MIN_DF)
    return np.vstack([np.zeros((1, m.shape[1])), m.toarray()])


def _term_oracle(dense: np.ndarray, seq: torch.Tensor, weight: float) -> np.ndarray:
    """weight * <q_u, t_i> for every item, q_u the exp(-0.5 k)-decayed sum of the rows of the
    user's items (k = 0: the last), from dense rows (n + 1, terms) in float64."""
    want = np.zeros((seq.shape[0], dense.shape[0]))
    for b in range(seq.shape[0]):
        q = sum(np.exp(-0.5 * k) * dense[int(x)] for k, x in enumerate(seq[b].flip(0)))
        want[b] = weight * dense @ q
    return want


def test_tfidf_blend_adds_the_decayed_text_similarity_to_every_score(
    data: dict[str, Any],
) -> None:
    from h2rec.evaluate import added_scores, recommend_top_k

    texts = data["dataset"].item_text
    rows = blend.text_rows(texts)
    assert rows is not None and rows.n_rows == len(texts) + 1
    cfg = _cfg("model.kind=h2rec")
    seed_everything(0)
    model = build_for(cfg, data["store"], data["sids"], None).eval()
    keys = set(model.state_dict())
    blend.attach_rows(model, rows, 2.5)
    assert set(model.state_dict()) == keys  # the checkpoint format is unchanged
    dense = _dense_rows(texts)
    seq = torch.tensor([[0, 0, 3, 9, 27], [5, 6, 7, 8, 1], [0, 0, 0, 0, 4]])
    want = _term_oracle(dense, seq, 2.5)
    np.testing.assert_allclose(added_scores(model, seq).numpy(), want, rtol=1e-5, atol=1e-6)
    # candidates only: the same values as the full row's columns
    cand = torch.tensor([[9, 1, 0, 27], [3, 3, 5, 120], [4, 2, 7, 8]])
    np.testing.assert_allclose(added_scores(model, seq, cand).numpy(),
                               np.take_along_axis(want, cand.numpy(), 1), rtol=1e-5, atol=1e-6)
    # the same bits whatever the thread count, on a batch large enough to be split
    from h2rec.evaluate import left_padded_inputs

    big = torch.from_numpy(left_padded_inputs(data["store"], np.arange(200), 0, 12)[0])
    before = torch.get_num_threads()
    try:
        got = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = added_scores(model, big).numpy()
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(got[1], got[2])
    # and on rows of many words, where a thread split of the sums would show in the last bits
    rng = np.random.default_rng(0)
    n_items, n_terms = 3000, 4000
    nnz = rng.integers(5, 40, size=n_items)
    indptr = np.concatenate([[0, 0], np.cumsum(nnz)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.choice(n_terms, k, replace=False)) for k in nnz])
    wide = blend.TextRows(indptr, indices.astype(np.int64),
                          rng.random(indices.size).astype(np.float32), n_terms)
    term = blend.TextScores(wide, 1.0)
    seq = torch.from_numpy(rng.integers(0, n_items + 1, size=(256, 50)))
    cand = torch.from_numpy(rng.integers(1, n_items + 1, size=(256, 30)))
    try:
        outs = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs[threads] = (term(seq).numpy(), term(seq, cand).numpy())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_array_equal(a, b)
    # recommendation ranks by inner product plus the term, history excluded
    users = np.arange(0, 40)
    top, _ = recommend_top_k(model, data["store"], users, 5, cfg.model.max_len)

    inputs, _ = left_padded_inputs(data["store"], users, 0, cfg.model.max_len)
    with torch.no_grad():
        seq_all = torch.from_numpy(inputs)
        scores = (model.user_states(seq_all) @ model.all_item_vectors().T).double().numpy()
    h_off, h_items = data["store"].histories(users, 0)
    for b, row in enumerate(inputs):
        q = sum(np.exp(-0.5 * k) * dense[int(x)] for k, x in enumerate(row[::-1]))
        scores[b] += 2.5 * dense @ q
        scores[b, 0] = -np.inf
        scores[b, h_items[h_off[b] : h_off[b + 1]]] = -np.inf  # the whole history
    want_top = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(top, want_top)
    blend.detach(model)
    assert added_scores(model, seq) is None


def test_training_with_item_text_chooses_and_reloads_the_tfidf_blend(
    data: dict[str, Any], tmp_path: Path
) -> None:
    texts = data["dataset"].item_text
    cfg = _cfg("model.kind=sid", "train.epochs=3", "train.text_blend=auto")  # the plain blend
    run = tmp_path / "sid"
    result = train(cfg, data["store"], data["sids"], None, run_dir=run, item_text=texts)
    record = checkpoint_blend(run / "best.pt")
    assert record is not None and record["version"] == 2 and record["kind"] == "tfidf"
    assert record["text_sha256"] == blend.text_rows(texts).digest()
    w = record["weight"]
    assert record["valid_ndcg10"][f"{w:g}"] == max(record["valid_ndcg10"].values())
    assert w > 0  # the text helps this data: the reload below scores with it
    assert json.loads((run / "metrics.json").read_text())["text_blend_weight"] == w
    model, _ = load_checkpoint(run / "best.pt", data["store"], data["sids"], None,
                               item_text=texts)
    assert model.text_blend.weight == w
    again = evaluate(model, data["store"], "test", cfg.eval, cfg.model.max_len)
    assert again.ndcg10 == pytest.approx(result.test.ndcg10, abs=1e-12)
    forced = {**record, "weight": 2.0}
    set_checkpoint_blend(run / "best.pt", forced)
    with pytest.raises(ConfigError, match="needs the item text"):
        load_checkpoint(run / "best.pt", data["store"], data["sids"], None)
    other = [*texts[:-1], texts[-1] + " " + texts[0]]
    with pytest.raises(CheckpointError, match="text_sha256 differs"):
        load_checkpoint(run / "best.pt", data["store"], data["sids"], None, item_text=other)
    for bad, match in (({"version": 4}, "version 4; known: 1, 2, 3"),
                       ({"version": 3}, "not a readable text blend"),  # no pop_exponent
                       ({"version": True}, "version True"), ({"min_df": 2.5}, "not an h2rec")):
        set_checkpoint_blend(run / "best.pt", {**forced, **bad})
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(run / "best.pt", data["store"], data["sids"], None, item_text=texts)
    plain, _ = load_checkpoint(run / "best.pt", data["store"], data["sids"], None,
                               apply_blend=False, item_text=texts)
    assert getattr(plain, "text_blend", None) is None
    # an older (dense) blend is outdated once item text is there; none is outdated too
    assert blend.is_outdated({"version": 1}, texts) and blend.is_outdated(None, texts)
    assert not blend.is_outdated(record, texts) and not blend.is_outdated({"version": 1}, None)
    assert blend.text_rows(["", "a b", "c"]) is None  # no word in two items: no rows


def test_a_tfidf_blended_run_exports_what_outside_code_scores_with(
    data: dict[str, Any], tmp_path: Path
) -> None:
    from h2rec.serving import Recommender

    cfg = _cfg("model.kind=fusion", "train.epochs=1", "train.text_blend=off",
               f"data.path={data['path']}", f"sid.path={data['path'] / 'sid'}")
    run = tmp_path / "fu"
    texts = data["dataset"].item_text
    train(cfg, data["store"], data["sids"], data["embeddings"], run_dir=run, item_text=texts)
    set_checkpoint_blend(run / "best.pt", {
        "format": blend.BLEND_FORMAT, "version": 2, "kind": "tfidf", "min_df": 2,
        "weight": 3.0, "decay": 0.5, "text_sha256": blend.text_rows(texts).digest()})
    rec = Recommender.load(run)
    assert rec.model.text_blend is not None
    out = rec.export(tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_blend"]["weight"] == 3.0 and "text_rows.npz" in manifest["files"]
    # outside code: encoder @ items.T + weight * text term, from the files alone
    enc = torch.export.load(out / "encoder.pt2").module()
    items = np.load(out / "items.npy")
    saved = np.load(out / "text_rows.npz")
    n, n_terms = saved["shape"]
    dense = np.zeros((n, n_terms))
    dense[np.repeat(np.arange(n), np.diff(saved["indptr"])), saved["indices"]] = saved["data"]
    ids = rec.item_ids
    hist = [[ids[0], ids[1], ids[2]], [ids[6]], [ids[9], ids[3], ids[4], ids[5]]]
    index = rec.item_index()
    seq = np.zeros((len(hist), rec.max_len), dtype=np.int64)
    for b, h in enumerate(hist):
        seq[b, rec.max_len - len(h):] = [index[i] for i in h]  # internal ids: rows r + 1
    with torch.no_grad():
        scores = enc(torch.from_numpy(seq)).double().numpy() @ items.T.astype(np.float64)
    for b in range(len(hist)):
        q = sum(np.exp(-0.5 * k) * dense[x - 1] for k, x in enumerate(seq[b, ::-1]) if x > 0)
        scores[b] += 3.0 * dense @ q
        scores[b, seq[b][seq[b] > 0] - 1] = -np.inf
    want = [[rec.item_ids[r] for r in np.argsort(-s, kind="stable")[:5]] for s in scores]
    got = rec.recommend(hist, k=5)
    assert [list(g) for g in got] == want


@pytest.mark.parametrize("protocol", ["full", "sampled"])
def test_evaluation_with_the_tfidf_blend_matches_a_numpy_oracle(
    data: dict[str, Any], protocol: str
) -> None:
    """Ranks of evaluate against numpy scores: inner products plus the text term."""
    import dataclasses

    from h2rec import _core
    from h2rec.evaluate import eval_users

    cfg = _cfg("model.kind=fusion")
    ev = dataclasses.replace(cfg.eval, protocol=protocol, n_negatives=20)
    seed_everything(0)
    model = build_for(cfg, data["store"], data["sids"], None).eval()
    blend.attach_rows(model, blend.text_rows(data["dataset"].item_text), 4.0)
    got = evaluate(model, data["store"], "test", ev, cfg.model.max_len)
    store = data["store"]
    users = eval_users(store)
    dense = _dense_rows(data["dataset"].item_text)
    inputs, targets = store.eval_inputs(users, cfg.model.max_len, "test")
    with torch.no_grad():
        base = (model.user_states(torch.from_numpy(inputs)) @ model.all_item_vectors().T).double()
    scores = base.numpy()
    for b, row in enumerate(inputs):
        q = sum(np.exp(-0.5 * k) * dense[int(x)] for k, x in enumerate(row[::-1]))
        scores[b] += 4.0 * dense @ q
    if protocol == "full":
        h_off, h_items = store.histories(users, 1)
        want = []
        for b, t in enumerate(targets):
            others = np.ones(scores.shape[1], dtype=bool)
            others[[0, t, *h_items[h_off[b] : h_off[b + 1]]]] = False
            want.append(int((scores[b, others] >= scores[b, t]).sum()))
    else:
        cands = _core.sample_candidates(store, users, targets, 20, ev.seed)
        want = [int((scores[b, c[1:]] >= scores[b, c[0]]).sum()) for b, c in enumerate(cands)]
    ranks = np.asarray(got.ranks)
    assert (ranks == np.asarray(want)).mean() > 0.99  # float32 against float64 near-ties
    assert ranks.tolist() != [0] * len(ranks)


def test_the_rare_blend_scales_rows_by_popularity_chosen_with_the_weight(
    data: dict[str, Any], tmp_path: Path
) -> None:
    """train.text_blend=rare: (g, weight) are the validation best of the 2-D grid, the record
    (version 3) reloads with the dataset's training counts, the term is the plain one on rows
    scaled by (1 + count)^-g (a numpy oracle), and other counts are refused."""
    from h2rec.evaluate import added_scores

    texts = data["dataset"].item_text
    store = data["store"]
    cfg = _cfg("model.kind=sid", "train.epochs=3", "train.text_blend=rare")
    run = tmp_path / "sid"
    train(cfg, store, data["sids"], None, run_dir=run, item_text=texts)
    record = checkpoint_blend(run / "best.pt")
    assert record is not None and record["version"] == 3
    table = record["valid_ndcg10"]
    assert set(table) == {f"{g:g}" for g in blend.POP_GRID}
    assert all(set(t) == {f"{w:g}" for w in blend.RARE_WEIGHTS} for t in table.values())
    best = max(v for t in table.values() for v in t.values())
    assert table[f"{record['pop_exponent']:g}"][f"{record['weight']:g}"] == best
    assert len({t["0"] for t in table.values()}) == 1  # weight 0: the model alone, once
    pop = store.popularity(holdout=2)
    assert record["popularity_sha256"] == blend.popularity_digest(pop)
    # a forced g > 0 and weight: the term against numpy on scaled dense rows
    forced = {**record, "pop_exponent": 0.3, "weight": 2.0}
    set_checkpoint_blend(run / "best.pt", forced)
    model, _ = load_checkpoint(run / "best.pt", store, data["sids"], None, item_text=texts)
    scale = (1.0 + pop.astype(np.float64)) ** -0.3
    dense = _dense_rows(texts) * scale[:, None]
    seq = torch.tensor([[0, 0, 3, 9, 27], [5, 6, 7, 8, 1], [0, 0, 0, 0, 4]])
    want = _term_oracle(dense, seq, 2.0)
    np.testing.assert_allclose(added_scores(model, seq).numpy(), want, rtol=1e-5, atol=1e-6)
    # g = 0 is the plain blend
    set_checkpoint_blend(run / "best.pt", {**record, "pop_exponent": 0.0, "weight": 2.0})
    plain0, _ = load_checkpoint(run / "best.pt", store, data["sids"], None, item_text=texts)
    plain = _dense_rows(texts)
    q = sum(np.exp(-0.5 * k) * plain[int(x)] for k, x in enumerate(seq[0].flip(0)))
    np.testing.assert_allclose(added_scores(plain0, seq).numpy()[0], 2.0 * plain @ q,
                               rtol=1e-5, atol=1e-6)
    # the counts it was chosen with, and no others
    model2, _ = load_checkpoint(run / "best.pt", store, data["sids"], None, apply_blend=False,
                                item_text=texts)
    with pytest.raises(CheckpointError, match="popularity_sha256 differs"):
        blend.apply_record(model2, forced, None, "here", texts, pop + 1)
    with pytest.raises(ConfigError, match="training popularity"):
        blend.apply_record(model2, forced, None, "here", texts, None)
    with pytest.raises(CheckpointError, match="not an h2rec text blend"):
        blend.apply_record(model2, {**forced, "pop_exponent": -1.0}, None, "here", texts, pop)
    from h2rec.errors import DataError

    with pytest.raises(DataError, match="popularity counts"):
        blend.popularity_scaled(blend.text_rows(texts), pop[:-1], 0.3)
    # outdated: a plain record where rare is asked for, and the other way round
    assert blend.is_outdated({"version": 2}, texts, "rare")
    assert blend.is_outdated(record, texts, "auto") and not blend.is_outdated(record, texts, "rare")
