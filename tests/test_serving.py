"""The Python API (h2rec.fit / h2rec.load), recommendations for new histories, and the serving
export, on a tiny generated dataset; checked against numpy re-computations."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h2rec
import numpy as np
import polars as pl
import pytest
import torch
from h2rec.cli import main, train_main
from h2rec.errors import ConfigError, DataError, OutputError
from h2rec.serving import _grouped, iter_histories

TINY = [
    "data.synthetic_users=150",
    "data.synthetic_items=130",
    "data.embed_dim=16",
    "sid.codebook_size=8",
    "sid.n_iter=5",
    "model.hidden=16",
    "model.max_len=10",
    "train.epochs=2",
    "train.batch_size=64",
    "train.device=cpu",
    "train.num_threads=1",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("api")
    return h2rec.fit(model=["sasrec", "h2rec"], overrides=TINY, name="api", output_dir=out)


@pytest.fixture(scope="module", params=["sasrec", "h2rec"])
def rec(fitted: Any, request: pytest.FixtureRequest) -> Any:
    return h2rec.load(fitted.run_dirs[request.param])


def test_fit_is_h2rec_train(fitted: Any, tmp_path: Path) -> None:
    """The Python call and the command give the same run: same table, same metrics."""
    assert set(fitted.run_dirs) == {"sasrec", "h2rec"}
    assert fitted.metrics["h2rec"]["split"] == "test"
    assert "| h2rec | overall |" in fitted.table
    args = [f"--set={o}" for o in TINY]
    code = train_main(["--models", "sasrec,h2rec", "--name", "cli", "--output-dir",
                       str(tmp_path), *args])
    assert code == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())["models"]
    for kind in ("sasrec", "h2rec"):
        assert cli[kind]["metrics"] == fitted.metrics[kind]["metrics"]


def test_fit_errors_are_the_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--models"):
        h2rec.fit(model="bert4rec", overrides=TINY, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="train.lr"):
        h2rec.fit(overrides=[*TINY, "train.lr=fast"], output_dir=tmp_path)
    with pytest.raises(h2rec.H2RecError, match="missing.csv"):
        h2rec.fit(tmp_path / "missing.csv", model="sasrec", overrides=TINY, output_dir=tmp_path)


def _numpy_top_k(rec: Any, histories: list[list[int]], k: int) -> list[list[int]]:
    """Oracle: left-pad, run the model once per history, score every item with numpy, drop
    the history's items, sort by (-score, id)."""
    items = rec.model.all_item_vectors().detach().numpy().astype(np.float64)
    term = getattr(rec.model, "text_blend", None)  # the sparse text blend (h2rec.blend)
    if term is not None:
        from h2rec.embed import tfidf_matrix

        m, _ = tfidf_matrix(rec.dataset.item_text, min_df=2)
        text = np.vstack([np.zeros((1, m.shape[1])), m.toarray()])  # row 0: padding
    out = []
    for hist in histories:
        seq = np.zeros((1, rec.max_len), dtype=np.int64)
        tail = hist[-rec.max_len :]
        seq[0, rec.max_len - len(tail) :] = tail
        with torch.no_grad():
            state = rec.model(torch.from_numpy(seq))[0, -1].double().numpy()
        scores = items @ state
        if term is not None:  # + weight * <sum_k exp(-decay k) t_(k back), t_i>
            q = sum(np.exp(-term.decay * k) * text[x] for k, x in enumerate(tail[::-1]))
            scores = scores + term.weight * (text @ q)
        scores[0] = -np.inf
        scores[list(hist)] = -np.inf
        order = sorted(range(1, scores.size), key=lambda i: (-scores[i], i))
        out.append(order[:k])
    return out


def test_new_histories_match_a_numpy_oracle_and_known_users(rec: Any) -> None:
    store = rec.dataset.store
    ids = rec.dataset.item_ids
    users = [0, 5, 17, 42]
    internal = [store.sequence(u).tolist() for u in users]
    histories = [[ids[i - 1] for i in seq] for seq in internal]
    got = rec.recommend(histories, k=7)
    want = [[ids[i - 1] for i in row] for row in _numpy_top_k(rec, internal, 7)]
    assert got == want
    # a known user's whole sequence as a new history: the same list as for that user
    frame = rec.recommend_users([rec.dataset.user_ids[u] for u in users], k=7)
    by_user = frame.group_by("user", maintain_order=True).agg("item")["item"].to_list()
    assert by_user == got
    scored = rec.recommend(histories[:1], k=3, with_scores=True)[0]
    assert [item for item, _ in scored] == got[0][:3]
    assert all(a[1] >= b[1] for a, b in zip(scored, scored[1:]))


def test_unknown_items_are_skipped_and_empty_histories_get_the_popular_items(rec: Any) -> None:
    ids = rec.dataset.item_ids
    hist = [ids[3], ids[10], ids[7]]
    with_unknown = [hist[0], "no-such-item", hist[1], "another", hist[2]]
    assert rec.recommend([with_unknown], k=5) == rec.recommend([hist], k=5)
    frame, stats = rec.recommend_frame([with_unknown, [], ["nope"]], ["a", "b", "c"], k=4)
    assert (stats.histories, stats.interactions, stats.unknown_items, stats.fallback) == (
        3, 6, 3, 2
    )
    pop = rec.dataset.store.popularity(0)
    popular = sorted(range(1, pop.size), key=lambda i: (-int(pop[i]), i))[:4]
    for user in ("b", "c"):
        rows = frame.filter(pl.col("user") == user)
        assert rows["item"].to_list() == [ids[i - 1] for i in popular]
        assert rows["fallback"].all() and rows["rank"].to_list() == [1, 2, 3, 4]
        assert rows["score"].to_list() == [float(pop[i]) for i in popular]
    assert not frame.filter(pl.col("user") == "a")["fallback"].any()
    with pytest.raises(ConfigError, match="wrap a single history"):
        rec.recommend(hist, k=3)  # type: ignore[arg-type]


def _write_histories(folder: Path, rec: Any) -> dict[str, Path]:
    """The same 40 histories as sequence text, CSV (rows shuffled, with times) and Parquet."""
    ids = rec.dataset.item_ids
    rng = np.random.default_rng(3)
    lines, rows = [], []
    for u in range(40):
        n = int(rng.integers(0, 14))
        hist = [ids[int(i)] for i in rng.integers(0, len(ids), size=n)]
        if u % 9 == 0:
            hist = hist[:2] + ["unknown-1"]
        lines.append(" ".join([f"s{u}", *hist]))
        rows += [(f"s{u}", item, 1000 + t) for t, item in enumerate(hist)]
    paths = {"txt": folder / "h.txt", "csv": folder / "h.csv", "parquet": folder / "h.parquet"}
    paths["txt"].write_text("\n".join(lines) + "\n")
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    frame.sample(fraction=1.0, shuffle=True, seed=1).write_csv(paths["csv"])
    frame.write_parquet(paths["parquet"])
    return paths


def test_history_files_stream_to_the_same_recommendations(rec: Any, tmp_path: Path) -> None:
    paths = _write_histories(tmp_path, rec)
    users, hists = [], []
    for line in paths["txt"].read_text().splitlines():
        users.append(line.split()[0])
        hists.append(line.split()[1:])
    want, stats = rec.recommend_frame(hists, users, k=6)
    outputs = {}
    for name, path in paths.items():
        out = tmp_path / f"out-{name}.parquet"
        got_stats = rec.recommend_file(path, out, k=6, chunk=7)
        # users with no rows at all are absent from row files: the same for the others
        outputs[name] = pl.read_parquet(out).sort(["user", "rank"])
        if name == "txt":
            assert got_stats == stats
    for name, frame in outputs.items():
        expected = want.filter(pl.col("user").is_in(frame["user"].unique().to_list()))
        expected = expected.sort(["user", "rank"])
        # other chunks batch the histories differently: scores agree to float rounding
        assert frame.drop("score").equals(expected.drop("score")), name
        np.testing.assert_allclose(frame["score"], expected["score"], rtol=1e-5, atol=1e-6)
    out_csv = tmp_path / "out.csv"
    rec.recommend_file(paths["txt"], out_csv, k=6, chunk=5)
    assert pl.read_csv(out_csv, schema_overrides={"user": pl.String}).height == want.height
    with pytest.raises(OutputError, match="--overwrite"):
        rec.recommend_file(paths["txt"], out_csv, k=6)


def test_grouping_carries_users_across_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(0, 30, size=200))
    frame = pl.DataFrame({"user": [f"u{u:02d}" for u in users],
                          "item": [str(i) for i in range(200)]})
    path = tmp_path / "sorted.parquet"
    frame.write_parquet(path)
    want = frame.group_by("user", maintain_order=True).agg("item")
    for chunk, per_slice in ((1, 1), (4, 7), (3, 64), (100, 1000)):
        got_users, got_items = [], []
        for u, h in _grouped(path, chunk, per_slice):
            assert len(u) <= chunk
            got_users += u
            got_items += h
        assert got_users == want["user"].to_list()
        assert got_items == want["item"].to_list()


def test_bad_history_files_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item_id\nu1,i1\n")
    with pytest.raises(DataError, match=r"bad\.csv: no user column 'user_id'"):
        list(iter_histories(bad))
    times = tmp_path / "times.csv"
    times.write_text("user_id,item_id,timestamp\nu1,i1,5\nu1,i2,yesterday\n")
    with pytest.raises(DataError, match=r"times\.csv: row 2: timestamp='yesterday'"):
        list(iter_histories(times))
    with pytest.raises(DataError, match="no such file"):
        list(iter_histories(tmp_path / "none.csv"))
    with pytest.raises(DataError, match="format from the suffix"):
        list(iter_histories(bad.rename(tmp_path / "bad.xlsx")))


def test_cli_recommend_histories(fitted: Any, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = fitted.run_dirs["h2rec"]
    rec = h2rec.load(run)
    paths = _write_histories(tmp_path, rec)
    out = tmp_path / "top.csv"
    assert main(["recommend", str(run), "--histories", str(paths["csv"]), "--out", str(out),
                 "-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\d+ histories, \d+ interactions, 5 with an unknown item", printed)
    got = pl.read_csv(out, schema_overrides={"user": pl.String, "item": pl.String})
    lines = [line.split() for line in paths["txt"].read_text().splitlines()]
    present = [line for line in lines if len(line) > 1]  # a CSV has no row for an empty one
    want, _ = rec.recommend_frame([line[1:] for line in present], [line[0] for line in present],
                                  k=5)
    assert got.sort(["user", "rank"]).select("user", "rank", "item").equals(
        want.sort(["user", "rank"]).select("user", "rank", "item"))
    code = main(["recommend", str(run), "--histories", str(paths["csv"]), "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    code = main(["recommend", str(run), "--histories", str(paths["csv"]), "--split", "test",
                 "--out", str(tmp_path / "x.csv")])
    assert code == 2 and "--histories" in capsys.readouterr().err


def test_export_reloads_and_reproduces_the_scores(rec: Any, tmp_path: Path) -> None:
    faiss = pytest.importorskip("faiss")
    out = rec.export(tmp_path / "serving", faiss=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == rec.kind and manifest["max_len"] == rec.max_len
    items = np.load(out / "items.npy")
    ids = json.loads((out / "item_ids.json").read_text())
    assert ids == rec.dataset.item_ids and items.shape[0] == len(ids)
    if rec.kind == "h2rec":  # hid + sid, scored by the branch states' sum (item_score=fused)
        assert rec.model.cfg.item_score == "fused"
        d = np.load(out / "hid.npy").shape[1]  # then the text blend's columns, when it has one
        np.testing.assert_allclose(items[:, :d], np.load(out / "hid.npy") + np.load(out / "sid.npy"),
                                   rtol=1e-6, atol=1e-7)
        assert items.shape[1] == rec.model.out_dim
    encoder = torch.export.load(out / "encoder.pt2").module()
    # other batch sizes and lengths than the trace's
    store = rec.dataset.store
    seq = np.zeros((9, rec.max_len), dtype=np.int64)
    for row in range(9):
        s = store.sequence(row)[-rec.max_len :]
        seq[row, rec.max_len - s.size :] = s
    with torch.no_grad():
        got = encoder(torch.from_numpy(seq)).numpy() @ items.T
        want = (rec.model(torch.from_numpy(seq))[:, -1] @ rec.model.all_item_vectors()[1:].T)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    index = faiss.read_index(str(out / "items.faiss"))
    with torch.no_grad():
        users = np.ascontiguousarray(encoder(torch.from_numpy(seq)).numpy())
    _, top = index.search(users, 5)
    np.testing.assert_array_equal(np.sort(top, axis=1),
                                  np.sort(np.argsort(-got, axis=1, kind="stable")[:, :5], axis=1))
    with pytest.raises(OutputError, match="--overwrite"):
        rec.export(tmp_path / "serving")
    rec.export(tmp_path / "serving", overwrite=True)


def test_readme_python_example_runs_as_written(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"<!-- python-api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README: one ```python block after <!-- python-api-example -->"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "runs" / "demo" / "h2rec" / "best.pt").is_file()


def test_parquet_datetimes_order_the_rows(tmp_path: Path) -> None:
    import datetime as dt

    path = tmp_path / "h.parquet"
    pl.DataFrame({
        "uid": ["a", "b", "a", "a"],
        "iid": ["x", "z", "y", "w"],
        "when": [dt.datetime(2020, 1, 3), dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 1),
                 dt.datetime(2020, 1, 3)],
    }).write_parquet(path)
    got = list(iter_histories(path, user_col="uid", item_col="iid", time_col="when"))
    assert got == [(["a", "b"], [["y", "x", "w"], ["z"]])]  # time, then file order


def test_row_files_split_into_user_buckets_give_the_same_histories(tmp_path: Path) -> None:
    from h2rec.serving import _row_chunks

    rng = np.random.default_rng(5)
    n = 3000
    frame = pl.DataFrame({
        "user_id": [f"u{u}" for u in rng.integers(0, 400, n)],
        "item_id": [f"i{i}" for i in rng.integers(0, 50, n)],
        "timestamp": rng.integers(0, 30, n),  # ties: file order decides
    })
    path = tmp_path / "rows.csv"
    frame.write_csv(path)
    want: dict[str, list[str]] = {}
    for row in frame.with_row_index("row").sort(["user_id", "timestamp", "row"]).iter_rows():
        want.setdefault(row[1], []).append(row[2])
    for buckets in (1, 3, 16):
        got: dict[str, list[str]] = {}
        for users, hists in _row_chunks(path, "csv", 17, "user_id", "item_id", "auto", buckets):
            assert len(users) <= 17
            for u, h in zip(users, hists):
                assert u not in got  # every user once, whole
                got[u] = h
        assert got == want, buckets
