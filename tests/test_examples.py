"""The results-table script's bookkeeping: which result files are current."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from h2rec.config import RunConfig, apply_overrides, config_to_dict, load_config

from conftest import QUICK_TRAIN, small_builtin

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str, folder: str = "examples"):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results_table():
    return _example("results_table")


def _small_run(tmp_path: Path, kind: str, seed: int) -> Path:
    """A finished run of ``kind`` (2 epochs) on a small generated dataset, under tmp_path."""
    from h2rec.cli import main

    data = small_builtin(tmp_path / "d", n_users=200, n_items=120, seed=seed, emb_dim=24,
                         levels=2, codebook=8, n_iter=8, save=True)
    args = ["train", str(data["path"]), "--name", kind, "--output-dir", str(tmp_path / "runs"),
            "--set", f"model.kind={kind}"]
    for s in ["model.hidden=16", "model.max_len=12", *QUICK_TRAIN, "train.epochs=2"]:
        args += ["--set", s]
    assert main(args) == 0
    return tmp_path / "runs" / kind


def _ndcg10_by_hand(scores, targets, h_off, h_items, n_items: int):
    """Per-user NDCG@10 of full scores (users, n_items + 1), ranked with numpy: items of the
    user's history (but the target) and padding left out, ties counted against the target."""
    import numpy as np

    gains = []
    for b in range(len(targets)):
        hist = set(h_items[h_off[b] : h_off[b + 1]].tolist()) - {int(targets[b])}
        comp = [i for i in range(1, n_items + 1) if i not in hist and i != targets[b]]
        rank = int((scores[b, comp] >= scores[b, targets[b]]).sum())
        gains.append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    return np.array(gains)


def test_the_dense_recipe_is_the_results_tables_movielens_one() -> None:
    """configs/dense.toml gives the settings of the results table's MovieLens-1M runs:
    H2Rec's as shipped, the other models' with their kind set (they do not read the alignment
    settings)."""
    rt = _results_table()
    shipped = load_config(ROOT / "configs" / "dense.toml")
    assert (shipped.model.hidden, shipped.model.max_len, shipped.model.align_seq) == (128, 200, False)
    for kind in ("h2rec", "sasrec", "fusion", "sid"):
        mine = config_to_dict(apply_overrides(shipped, [f"model.kind={kind}"]))
        sets = [s for s in rt.sets_for("ml-1m", kind, 0, []) if not s.startswith("train.num_threads")]
        table = config_to_dict(apply_overrides(RunConfig(), sets))
        if kind != "h2rec":
            for d in (mine, table):
                d["model"] = {k: v for k, v in d["model"].items() if not k.startswith("align_")}
        assert mine == table, kind  # every section, not only model and train


def test_a_result_is_current_only_with_todays_settings() -> None:
    rt = _results_table()
    sets = ["train.epochs=3", "model.kind=sasrec", "train.seed=1", "train.num_threads=1"]
    saved = json.loads(json.dumps(config_to_dict(apply_overrides(RunConfig(), sets))))
    result = {"set": sets, "settings": rt.settings_of(saved)}
    assert rt.is_current(result)
    # the thread count does not change what a run computes
    result_2t = {"set": [*sets[:-1], "train.num_threads=2"], "settings": result["settings"]}
    assert rt.is_current(result_2t)
    # the table's own sets (a dataset's protocol, --set) must give the same settings too
    assert rt.is_current(result, [*sets[:-1], "train.num_threads=2"])
    assert not rt.is_current(result, [*sets, "model.max_len=200"])
    ml = rt.sets_for("ml-1m", "sasrec", 1, ["train.epochs=3"])
    assert "model.max_len=200" in ml and rt.sets_for("beauty", "h2rec", 0, [])[-1] == \
        "train.num_threads=0"
    # a dataset's sets for one model only: after the model's kind, before the seed and --set
    saved_specs = dict(rt.DATASETS["ml-1m"])
    try:
        rt.DATASETS["ml-1m"]["model_sets"] = {"h2rec": ["model.align_seq=false"]}
        got = rt.sets_for("ml-1m", "h2rec", 2, ["model.dropout=0.3"], 1)
        assert got[got.index("model.kind=h2rec") + 1] == "model.align_seq=false"
        assert got[-3:] == ["train.seed=2", "train.num_threads=1", "model.dropout=0.3"]
        assert "model.align_seq=false" not in rt.sets_for("ml-1m", "sasrec", 2, [])
    finally:
        rt.DATASETS["ml-1m"] = saved_specs
    # a run saved before train.lr_decay_patience existed had a constant rate: not today's default
    old = json.loads(json.dumps(saved))
    del old["train"]["lr_decay_patience"]
    assert rt.settings_of(old)["train.lr_decay_patience"] == 0
    assert not rt.is_current({"set": sets, "settings": rt.settings_of(old)})
    # a setting added since (model.text_match) reads as the behaviour the run had: off
    before = {k: v for k, v in result["settings"].items() if k != "model.text_match"}
    assert rt.is_current({"set": sets, "settings": before})
    assert not rt.is_current({"set": sets, "settings": {**before, "model.text_match": True}})
    # the text blend is chosen after training: an H2Rec result is current once it records one
    h2_sets = [sets[0], "model.kind=h2rec", *sets[2:]]
    h2 = rt.settings_for(h2_sets)
    assert rt.needs_blend(h2_sets) and not rt.needs_blend(sets)
    assert not rt.is_current({"set": h2_sets, "settings": h2})
    assert rt.is_current({"set": h2_sets, "settings": h2,
                          "text_blend": {"version": 3, "kind": "tfidf", "weight": 1.0}})
    # the default is the popularity-scaled blend (version 3): a plain one (2) is chosen again,
    # unless the sets ask for it
    assert not rt.is_current({"set": h2_sets, "settings": h2,
                              "text_blend": {"version": 2, "kind": "tfidf", "weight": 1.0}})
    auto = [*h2_sets, "train.text_blend=auto"]
    assert rt.is_current({"set": auto, "settings": rt.settings_for(auto),
                          "text_blend": {"version": 2, "kind": "tfidf", "weight": 1.0}})
    # one chosen before the TF-IDF rows (dense embeddings, version 1) is chosen again
    assert not rt.is_current({"set": h2_sets, "settings": h2, "text_blend": {"weight": 1.0}})
    assert not rt.needs_blend([*h2_sets, "train.text_blend=off"])
    # any other setting that differs, and a result that does not say, are not current either
    other = json.loads(json.dumps(saved))
    other["model"]["dropout"] = 0.25
    assert not rt.is_current({"set": sets, "settings": rt.settings_of(other)})
    assert not rt.is_current({"set": sets})
    # the same run asked for with the change in its sets is
    assert rt.is_current({"set": [*sets, "model.dropout=0.25"], "settings": rt.settings_of(other)})
    # a saved config or a set naming a setting that no longer exists is not current either
    gone = json.loads(json.dumps(saved))
    gone["train"]["no_such_setting"] = 1
    assert "unreadable" in rt.settings_of(gone)
    assert not rt.is_current({"set": [*sets, "train.no_such_setting=1"], "settings": result["settings"]})


def test_summary_and_plot_read_only_todays_results(tmp_path: Path) -> None:
    rt = _results_table()
    buckets = ["1-9", "10-29", "30-59"]  # the last one empty, as evaluate writes it: None

    def result(model: str, seed: int, ndcg: list[float], extra: list[str]) -> dict:
        sets = rt.sets_for("beauty", model, seed, extra, threads=1)
        groups = {f"pop_{b}": {"NDCG@10": v, "n": 5} for b, v in zip(buckets, ndcg)}
        groups["pop_30-59"] = None
        groups.update(head={"NDCG@10": 0.2}, tail={"NDCG@10": 0.1})
        full = {"metrics": {"NDCG@10": sum(ndcg) / 2, "HR@10": 0.3}, "groups": groups}
        res = {"dataset": "beauty", "model": model, "seed": seed, "set": sets,
               "settings": rt.settings_for(sets), "buckets": buckets, "full": full,
               "sampled": {"metrics": {"NDCG@10": 0.5, "HR@10": 0.7}, "groups": {}}}
        if rt.needs_blend(sets):
            res["text_blend"] = {"version": 3, "kind": "tfidf", "weight": 3.0}
        return res

    out = tmp_path / "beauty"
    out.mkdir()
    files = {"sasrec-s0": result("sasrec", 0, [0.1, 0.2], []),
             "sasrec-s1": result("sasrec", 1, [0.3, 0.4], []),
             "h2rec-s0": result("h2rec", 0, [0.2, 0.2], []),
             "h2rec-s1": result("h2rec", 1, [0.9, 0.9], ["model.dropout=0.3"])}  # not today's
    for name, res in files.items():
        (out / f"{name}.json").write_text(json.dumps(res))
    text = rt.summary(tmp_path)
    assert "left out" in text and "h2rec-s1.json" in text
    assert "| sasrec | 2 | 0.2500 ± 0.1414 |" in text and "| h2rec | 1 | 0.2000 |" in text
    png = tmp_path / "buckets.png"
    rt.plot(tmp_path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_blend_any_model_chooses_on_validation_and_leaves_the_run_alone(tmp_path: Path) -> None:
    """A SASRec run with the text blend added: the weight is validation's best, the test
    figures are those of the run scored with it, and the checkpoint is not written."""
    import numpy as np

    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    run = _small_run(tmp_path, "sasrec", seed=1)
    before = (run / "best.pt").read_bytes()
    ex = _example("blend_any_model")
    assert ex.main([str(run), "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    res = json.loads((tmp_path / "out" / "sasrec-s0.json").read_text())
    assert (run / "best.pt").read_bytes() == before
    table = res["valid_ndcg10"]
    assert set(table) == {f"{w:g}" for w in blend.BLEND_GRID}
    assert table[f"{res['weight']:g}"] == max(table.values())
    model, cfg, ds = load_run(run, apply_blend=False)
    if res["weight"] > 0:
        blend.attach_rows(model, blend.text_rows(ds.item_text), res["weight"])
    want = evaluate(model, ds.store, "test", cfg.eval, cfg.model.max_len)
    assert np.isclose(res["test"]["NDCG@10"], want.metrics["NDCG@10"], rtol=0, atol=1e-12)
    assert "| sasrec | 1 |" in ex.summary(tmp_path / "out")
    # the popularity-scaled blend: (g, weight) validation's best of the 2-D grid
    assert ex.main([str(run), "--out", str(tmp_path / "rare"), "--threads", "1",
                    "--mode", "rare"]) == 0
    rare = json.loads((tmp_path / "rare" / "sasrec-s0.json").read_text())
    assert (run / "best.pt").read_bytes() == before and rare["mode"] == "rare"
    grid = rare["valid_ndcg10"]
    assert grid[f"{rare['pop_exponent']:g}"][f"{rare['weight']:g}"] == max(
        v for t in grid.values() for v in t.values())
    if rare["weight"] > 0:
        scaled = blend.popularity_scaled(blend.text_rows(ds.item_text),
                                         ds.store.popularity(holdout=2), rare["pop_exponent"])
        blend.attach_rows(model, scaled, rare["weight"])
    else:
        blend.detach(model)
    want = evaluate(model, ds.store, "test", cfg.eval, cfg.model.max_len)
    assert np.isclose(rare["test"]["NDCG@10"], want.metrics["NDCG@10"], rtol=0, atol=1e-12)
    assert "(g " in ex.summary(tmp_path / "rare")


def test_the_scale_log_is_per_user_chronological_and_joins_its_items(tmp_path: Path) -> None:
    import polars as pl

    scale = _example("scale", "benches")
    info = scale.generate(30_000, tmp_path / "log", chunk=7_000)  # several chunks
    log = pl.read_csv(tmp_path / "log" / "interactions.csv")
    items = pl.read_csv(tmp_path / "log" / "items.csv")
    assert info == {"interactions": log.height, "users": 1_500, "items": 1_000}
    assert log.get_column("user_id").n_unique() == 1_500 and items.height == 1_000
    assert log.group_by("user_id").len().get_column("len").min() >= 3
    # timestamps increase within each user, rows of a user are contiguous
    diffs = log.with_columns(
        (pl.col("timestamp").diff().over("user_id")).alias("d")
    ).get_column("d").drop_nulls()
    assert diffs.min() >= 60
    assert log.get_column("user_id").rle().len() == 1_500
    assert set(log.get_column("item_id").unique()) <= set(items.get_column("item_id"))
    # popularity is a long tail: the top 1% of items take far more than 1% of the rows
    counts = log.group_by("item_id").len().get_column("len").sort(descending=True)
    assert counts.head(10).sum() > 0.05 * log.height
    again = scale.generate(30_000, tmp_path / "log", chunk=7_000)  # resumed: not redone
    assert again == info


def test_the_scale_table_reports_time_per_interaction_and_the_slope() -> None:
    scale = _example("scale", "benches")

    def size(n: int, seconds: float) -> dict:
        return {"n": n, "dataset": {"interactions": n},
                "stages": {"prepare": {"seconds": seconds, "peak_rss_mb": 100.0}}}

    text = scale.table({"a": size(1_000_000, 2.0), "b": size(100_000_000, 400.0)})
    row = next(line for line in text.splitlines() if line.startswith("| prepare"))
    # 2 s / 1e6 = 2.00 µs a row; 400 s / 1e8 = 4.00; slope log(200) / log(100) = 1.15
    assert "2.0 s, 2.00 µs/int., 100 MB" in row and "400.0 s, 4.00 µs/int." in row
    assert row.endswith("| 1.15 |")
    assert "| train-epoch | — | — | — |" in text


def test_results_table_prepares_a_dataset_once(tmp_path: Path, monkeypatch) -> None:
    """prepare -> embed -> build-sid through the CLI, the first time only; the turn-taking lock
    of the workers must not be the lock h2rec holds beside the folder it writes."""
    from h2rec.synthetic import SyntheticConfig, generate

    rt = _results_table()
    src = tmp_path / "shared" / "tiny"
    generate(src, SyntheticConfig(n_users=300, n_items=300, seed=3))
    monkeypatch.setitem(rt.DATASETS, "tiny", {
        "folder": "tiny", "prepare": ["interactions.csv", "--items", "items.csv"]})
    calls: list[tuple[str, ...]] = []
    real = rt._h2rec
    monkeypatch.setattr(rt, "_h2rec", lambda *a, **k: (calls.append(a), real(*a, **k)))
    data = rt.prepared("tiny", tmp_path / "shared", tmp_path / "work")
    assert data == tmp_path / "work" / "data" / "tiny"
    assert (data / "meta.json").exists() and (data / "embeddings.npy").exists()
    assert (data / "sid" / "codes.npy").exists()
    assert [c[0] for c in calls] == ["prepare", "embed", "build-sid"]
    assert rt.prepared("tiny", tmp_path / "shared", tmp_path / "work") == data
    assert len(calls) == 3  # reused, nothing made again


def test_results_table_reports_a_failed_run_and_goes_on(monkeypatch, capsys) -> None:
    """A run whose h2rec command fails (here: refused, as by another writer's run-folder lock)
    is named in one line, the other jobs still run, and the exit status is 1, with no traceback."""
    import subprocess
    import sys

    rt = _results_table()
    done: list[tuple[str, str, int]] = []

    def fake_run_one(name, model, seed, args, threads):
        if seed == 1:
            raise subprocess.CalledProcessError(2, [sys.executable, "-m", "h2rec.cli", "train"])
        done.append((name, model, seed))
        return "done"

    monkeypatch.setattr(rt, "run_one", fake_run_one)
    assert rt.main(["--datasets", "ml-1m", "--models", "sid", "--seeds", "0,1,2"]) == 1
    out, err = capsys.readouterr()
    assert done == [("ml-1m", "sid", 0), ("ml-1m", "sid", 2)]
    assert "[2/3] ml-1m sid seed 1: FAILED (h2rec train exited with status 2" in out
    assert "[3/3] ml-1m sid seed 2: done" in out
    assert "1 of 3 runs failed: ml-1m sid seed 1" in err and "Traceback" not in out + err
    monkeypatch.setattr(rt, "run_one", lambda *a: "skipped (done)")
    assert rt.main(["--datasets", "ml-1m", "--models", "sid", "--seeds", "0"]) == 0


def test_branch_states_takes_a_trained_h2rec_apart_on_validation(tmp_path: Path) -> None:
    """alpha = 1 is the run as trained (its own validation figure, to the bit); the HID branch
    alone (alpha = 0) is scored by hand with numpy; a SASRec run is refused."""
    import numpy as np
    import pytest
    import torch

    from h2rec.cli import main
    from h2rec.evaluate import eval_users, evaluate
    from h2rec.runs import load_run

    data = small_builtin(tmp_path / "d", n_users=150, n_items=100, seed=2, emb_dim=24, levels=2,
                         codebook=8, n_iter=8, save=True)
    runs = tmp_path / "runs"
    for kind in ("h2rec", "sasrec"):
        args = ["train", str(data["path"]), "--name", kind, "--output-dir", str(runs),
                "--set", f"model.kind={kind}", "--set", "train.text_blend=off"]
        for s in ["model.hidden=16", "model.max_len=12", *QUICK_TRAIN, "train.epochs=2"]:
            args += ["--set", s]
        assert main(args) == 0
    ex = _example("branch_states")
    assert ex.main([str(runs / "h2rec"), "--out", str(tmp_path / "out")]) == 0
    views = json.loads((tmp_path / "out" / "h2rec.json").read_text())["views"]
    model, cfg, ds = load_run(runs / "h2rec", apply_blend=False)
    want = evaluate(model, ds.store, "valid", cfg.eval, cfg.model.max_len)
    assert views["alpha=1"]["NDCG@10"] == want.metrics["NDCG@10"]
    # the HID branch alone, by hand: NDCG@10 of s_hid . (HID + SID), history excluded
    users = eval_users(ds.store)
    inputs, targets = ds.store.eval_inputs(users, cfg.model.max_len, "valid")
    with torch.no_grad():
        _, s_hid, _, _ = model.eval()._branches(torch.from_numpy(inputs), last_only=True)
        items = model.base_item_vectors(torch.arange(ds.store.n_items + 1))
        scores = (s_hid @ items.T).double().numpy()
    h_off, h_items = ds.store.histories(users, 2)
    gains = _ndcg10_by_hand(scores, targets, h_off, h_items, ds.store.n_items)
    assert views["alpha=0"]["NDCG@10"] == pytest.approx(np.mean(gains), abs=1e-6)
    assert "| alpha=0.5 |" in ex.summary(tmp_path / "out")
    with pytest.raises(SystemExit, match="an H2Rec run with fused scores and both branches is needed"):
        ex.main([str(runs / "sasrec"), "--out", str(tmp_path / "out")])


def test_blend_variants_default_is_the_blends_own_validation_table(tmp_path: Path) -> None:
    """The probe's default rows are the validation figures blend.choose records for the same
    run, its paired differences are those of per-user NDCG@10 against the best weight, pop0 is
    the default, and the text variants say what they add."""
    import numpy as np
    import pytest

    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    run = _small_run(tmp_path, "fusion", seed=2)
    before = (run / "best.pt").read_bytes()
    ex = _example("blend_variants")
    rows = list(ex.probe(run, ["default", "pop0", "pop0.5"], None))
    assert (run / "best.pt").read_bytes() == before
    model, cfg, ds = load_run(run, apply_blend=False)
    record = blend.choose(model, None, lambda m: evaluate(m, ds.store, "valid", cfg.eval,
                                                          cfg.model.max_len), ds.item_text)
    default = [r for r in rows if r["variant"] == "default"]
    assert [r["weight"] for r in default] == list(blend.BLEND_GRID)
    for r in default:
        assert np.isclose(r["ndcg10"], record["valid_ndcg10"][f"{r['weight']:g}"], rtol=0, atol=1e-12)
    best = max(default, key=lambda r: r["ndcg10"])
    assert best["diff"] == 0.0 and best["se"] == 0.0
    for r in default:
        assert np.isclose(r["diff"], r["ndcg10"] - best["ndcg10"], rtol=0, atol=1e-12)
        assert r["diff"] <= 0.0 and r["se"] >= 0.0
        assert (r["diff_default"], r["se_default"]) == (r["diff"], r["se"])
    # the paired standard error, from the ranks of the two weights
    def per_user(w: float) -> np.ndarray:
        if w == 0:
            blend.detach(model)
        else:
            blend.attach_rows(model, blend.text_rows(ds.item_text), w)
        ranks = evaluate(model, ds.store, "valid", cfg.eval, cfg.model.max_len).ranks
        return np.array([1 / np.log2(r + 2) if r < 10 else 0.0 for r in ranks])
    worst = min(default, key=lambda r: r["ndcg10"])
    d = per_user(worst["weight"]) - per_user(best["weight"])
    assert np.isclose(worst["se"], d.std(ddof=1) / np.sqrt(d.size), rtol=1e-9, atol=0)
    assert worst["se"] > 0
    pop0 = [r for r in rows if r["variant"] == "pop0"]
    assert [r["ndcg10"] for r in pop0] == [r["ndcg10"] for r in default]
    # rows scaled by (1 + count)^-0.5 score otherwise: the same figures at every weight but 0
    pop5 = [r for r in rows if r["variant"] == "pop0.5"]
    assert any(a["ndcg10"] != b["ndcg10"] for a, b in zip(pop5[1:], default[1:]))
    assert sum(r["edge"] for r in default) <= 1
    # with weight 0 every variant is the bare model
    assert len({r["ndcg10"] for r in rows if r["weight"] == 0}) == 1
    assert ex.variant_text("bigrams", ["Red Nail Polish"], None) == [
        "red nail polish red_nail nail_polish"
    ]
    assert ex.variant_text("attributes", ["a", "b"], {"1": [7, 9]}) == ["a attr7 attr9", "b "]
    assert "within 1 SE" in ex.line(best)
    for bad in ("pop", "popx", "shout"):
        with pytest.raises(SystemExit, match="--variants"):
            list(ex.probe(run, ["default", bad], None))  # refused before any evaluation
    with pytest.raises(SystemExit, match="needs --attributes"):
        ex.check_variants(["default", "attributes"], None)
    bad_file = tmp_path / "attrs.json"
    for text, says in (("[1, 2]", "expected a JSON object"), ('{"1": "a"}', "item '1'"),
                       ("{", "not a readable JSON")):
        bad_file.write_text(text)
        with pytest.raises(SystemExit, match=says):
            ex.load_attributes(bad_file)


def test_popularity_prior_ranks_as_a_numpy_oracle_and_leaves_the_run_alone(tmp_path: Path) -> None:
    """lam = 0 is the run's own validation figure (its blend included); another lam ranks as
    numpy does with -lam * log(1 + training count) added to the same scores, history excluded;
    the checkpoint is not written and the model keeps its own term afterwards."""
    import numpy as np
    import pytest
    import torch

    from h2rec.evaluate import added_scores, eval_users, evaluate, states_of
    from h2rec.runs import load_run

    run = _small_run(tmp_path, "fusion", seed=3)
    before = (run / "best.pt").read_bytes()
    ex = _example("popularity_prior")
    rows = {r["lam"]: r for r in ex.probe(run, (0.0, 0.5, -0.5))}
    assert (run / "best.pt").read_bytes() == before
    model, cfg, ds = load_run(run)
    assert model.text_blend is not None  # the default blend: the prior goes on top of it
    want = evaluate(model, ds.store, "valid", cfg.eval, cfg.model.max_len)
    assert rows[0.0]["ndcg10"] == want.metrics["NDCG@10"]
    assert rows[0.0]["diff"] == 0.0 and rows[0.0]["se"] == 0.0
    users = eval_users(ds.store)
    inputs, targets = ds.store.eval_inputs(users, cfg.model.max_len, "valid")
    seq = torch.from_numpy(inputs)
    with torch.no_grad():
        model.eval()
        base = (states_of(model, seq) @ model.all_item_vectors().float().T
                + added_scores(model, seq)).double().numpy()
    counts = ds.store.popularity(holdout=2).astype(np.float64)
    h_off, h_items = ds.store.histories(users, 2)

    def oracle(lam: float) -> np.ndarray:
        scores = base - lam * np.log1p(counts)[None, :]
        return _ndcg10_by_hand(scores, targets, h_off, h_items, ds.store.n_items)

    zero = oracle(0.0)
    assert rows[0.0]["ndcg10"] == pytest.approx(zero.mean(), abs=1e-6)
    for lam in (0.5, -0.5):
        got = oracle(lam)
        assert rows[lam]["ndcg10"] == pytest.approx(got.mean(), abs=1e-6)
        assert rows[lam]["diff"] == pytest.approx((got - zero).mean(), abs=1e-6)
    assert rows[0.5]["ndcg10"] != rows[-0.5]["ndcg10"]
    # the term as the sampled protocol and other devices read it: the prior at the candidates
    log_counts = torch.from_numpy(np.log1p(counts))
    cands = torch.tensor([[1, 2, 3], [4, 4, 5]])
    term = ex._prior_term(None, log_counts, 0.5)(seq[:2], cands)
    assert torch.allclose(term, (-0.5 * log_counts[cands]).float())
    assert ex._prior_term(None, log_counts, 0.5)(seq[:2]).shape == (2, ds.store.n_items + 1)
    assert "lam 0.5" in ex.line(rows[0.5])
    with pytest.raises(SystemExit):
        ex.main([str(tmp_path), "--lambdas", "0,1"])  # not a run folder
    with pytest.raises(SystemExit):
        ex.main([str(run), "--lambdas", "0,x"])


def test_sid_coherence_counts_shared_prefixes_by_hand() -> None:
    """Two users, [1 2 3 4 9 9] and [3 1 2 9 9]: the last two items are held out, so the steps
    are 1->2, 2->3, 3->4, 3->1, 1->2; items 1, 2 share code 0 and then code 5, item 3 shares
    only the first code with them, item 4 shares nothing."""
    import numpy as np

    ex = _example("sid_coherence")
    offsets = np.array([0, 6, 11])
    items = np.array([1, 2, 3, 4, 9, 9, 3, 1, 2, 9, 9])
    a, b = ex.transitions(offsets, items)
    assert (a + 1).tolist() == [1, 2, 3, 3, 1] and (b + 1).tolist() == [2, 3, 4, 1, 2]
    codes = np.zeros((9, 2), dtype=np.int64)
    codes[:, 1] = np.arange(9)
    codes[1, 1] = 0  # item 2 = (0, 0), item 1 = (0, 0)
    codes[3] = (7, 3)  # item 4
    r = ex.coherence(codes, a, b)
    # first code: 1->2 yes, 2->3 yes, 3->4 no, 3->1 yes, 1->2 yes; both codes: the two 1->2
    assert r["shared_prefix"] == [4 / 5, 2 / 5]
    assert len(r["chance"]) == 2 and 0.0 <= r["chance"][1] <= r["chance"][0] <= 1.0
