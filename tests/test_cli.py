"""The command line end to end, in-process, on a tiny generated dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from h2rec.cli import main, train_main
from h2rec.data import load_dataset

TINY = [
    "--set", "data.synthetic_users=150",
    "--set", "data.synthetic_items=130",
    "--set", "data.embed_dim=16",
    "--set", "sid.codebook_size=8",
    "--set", "sid.n_iter=5",
    "--set", "model.hidden=16",
    "--set", "model.max_len=10",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=64",
    "--set", "train.device=cpu",
    "--set", "train.num_threads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("runs")
    code = train_main(
        ["--models", "sasrec,sid,fusion,h2rec", "--name", "tiny", "--output-dir", str(out), *TINY]
    )
    return {"code": code, "out": out, "base": out / "tiny"}


def test_h2rec_train_runs_the_whole_pipeline(pipeline: dict[str, Any]) -> None:
    assert pipeline["code"] == 0
    base: Path = pipeline["base"]
    for name in (
        "config.json",
        "metrics.json",
        "results.md",
        "ndcg10_by_popularity.png",
        "embeddings.npy",
        "semantic_ids/codes.npy",
        "builtin/dataset/meta.json",
    ):
        assert (base / name).is_file(), name
    for kind in ("sasrec", "sid", "fusion", "h2rec"):
        assert (base / kind / "best.pt").is_file() and (base / kind / "config.json").is_file()
    metrics = json.loads((base / "metrics.json").read_text())
    assert list(metrics["models"]) == ["sasrec", "sid", "fusion", "h2rec"]
    for res in metrics["models"].values():
        assert res["n_users"] == 150 and res["split"] == "test"
        assert 0.0 <= res["metrics"]["NDCG@10"] <= res["metrics"]["HR@10"] <= 1.0
        assert res["groups"]["head"]["n"] + res["groups"]["tail"]["n"] == 150
    table = (base / "results.md").read_text()
    for kind in ("sasrec", "sid", "fusion", "h2rec"):
        assert f"| {kind} | overall | 150 |" in table and f"| {kind} | tail |" in table
    assert (base / "ndcg10_by_popularity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = json.loads((base / "sasrec" / "config.json").read_text())
    assert resolved["model"]["kind"] == "sasrec" and resolved["model"]["hidden"] == 16
    assert Path(resolved["data"]["path"]).is_absolute()


def test_nothing_is_overwritten_without_flag(
    pipeline: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    before = (pipeline["base"] / "metrics.json").stat().st_mtime_ns
    code = train_main(["--name", "tiny", "--output-dir", str(pipeline["out"]), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("h2rec: error:") and "--overwrite" in err[-1]
    assert (pipeline["base"] / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "train.lr=fast"], "train.lr='fast'"),
        (["--set", "train.nosuch=1"], "train.nosuch"),
        (["--set", "model.kind=bert"], "model.kind='bert'"),
    ],
)
def test_bad_config_exits_with_code_2(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = train_main(["--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0]
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_train_evaluate_recommend(
    pipeline: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base: Path = pipeline["base"]
    data = base / "builtin" / "dataset"
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            str(data),
            "--sids",
            str(base / "semantic_ids"),
            "--name",
            "one",
            "--set",
            "model.kind=sid",
            *TINY,
        ]
    )
    assert code == 0
    run = tmp_path / "runs" / "one"  # the default output location
    assert (run / "best.pt").is_file() and "| sid | overall |" in capsys.readouterr().out

    # evaluate: the sampled protocol, written as JSON
    assert main(["evaluate", str(run), "--protocol", "sampled"]) == 2  # 130 items: too few
    assert "eval.n_negatives=100" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            str(run),
            "--protocol",
            "sampled",
            "--set",
            "eval.n_negatives=50",
            "--out",
            "m.json",
        ]
    )
    assert code == 0
    m = json.loads((tmp_path / "m.json").read_text())["models"]["sid"]
    assert m["protocol"] == "sampled" and m["n_candidates"] == 51
    assert main(["evaluate", str(run), "--out", "m.json"]) == 2  # exists, no --overwrite
    assert main(["evaluate", str(run), "--split", "valid", "--out", "m.json", "--overwrite"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["models"]["sid"]["split"] == "valid"

    # recommend: original ids, history excluded, K per user, in both formats
    ds = load_dataset(data)
    for out in ("recs.parquet", "recs.csv"):
        assert main(["recommend", str(run), "--out", out, "-k", "5"]) == 0
        frame = (
            pl.read_parquet(out)
            if out.endswith("parquet")
            else pl.read_csv(out, schema_overrides={"user": pl.String, "item": pl.String})
        )
        assert frame.height == 5 * ds.n_users
        assert set(frame["item"].to_list()) <= set(ds.item_ids)
        assert set(frame["user"].to_list()) == set(ds.user_ids)
        index = ds.user_index()
        for user, group in frame.group_by("user"):
            row = index[str(user[0])]
            seen = {ds.item_ids[i - 1] for i in ds.store.sequence(row).tolist()}
            assert not seen & set(group["item"].to_list())
            assert sorted(group["rank"].to_list()) == [1, 2, 3, 4, 5]
            scores = group.sort("rank")["score"].to_numpy()
            assert np.all(np.diff(scores) <= 0)
    assert main(["recommend", str(run), "--out", "recs.json"]) == 2


def test_compare_trains_then_loads(
    pipeline: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base: Path = pipeline["base"]
    data = base / "builtin" / "dataset"
    args = [
        "compare",
        str(data),
        "--sids",
        str(base / "semantic_ids"),
        "--models",
        "sasrec,sid",
        "--name",
        "cmp",
        "--output-dir",
        str(tmp_path),
        *TINY,
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    ckpt = tmp_path / "cmp" / "sasrec" / "best.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert main(args) == 0  # finished runs are loaded, not retrained
    second = capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == stamp
    table = lambda text: [l for l in text.splitlines() if l.startswith("|")]
    assert table(first) == table(second) and len(table(first)) == 2 + 2 * 3
    assert (tmp_path / "cmp" / "ndcg10_by_popularity.png").is_file()
    # a finished run with other model settings (e.g. trained before a default changed) is not
    # reported as if it had today's: the command says so and trains nothing
    assert main([*args, "--set", "model.hidden=32"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished sasrec run with other model settings" in err
    assert "model.hidden" in err and "--overwrite" in err
    assert ckpt.stat().st_mtime_ns == stamp


def test_missing_inputs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(tmp_path / "nope"), "--output-dir", str(tmp_path)]) == 2
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("h2rec: error:") for e in err)


def test_stage_commands_chain_into_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from h2rec.synthetic import SyntheticConfig, generate

    inter, items = generate(tmp_path / "src", SyntheticConfig(n_users=120, n_items=130, seed=3))
    ds = tmp_path / "ds"
    assert main(["prepare", str(inter), str(ds), "--items", str(items)]) == 0
    assert main(["embed", str(ds), "--dim", "16"]) == 0
    assert (
        main(
            [
                "build-sid",
                str(ds / "embeddings.npy"),
                str(ds / "sid"),
                "--codebook-size",
                "8",
                "--iters",
                "5",
            ]
        )
        == 0
    )
    # train finds <data>/sid by itself; the raw interaction file also works through h2rec-train
    assert (
        main(
            [
                "train",
                str(ds),
                "--name",
                "staged",
                "--output-dir",
                str(tmp_path / "runs"),
                "--set",
                "model.kind=h2rec",
                *TINY,
            ]
        )
        == 0
    )
    assert "| h2rec | overall | 120 |" in capsys.readouterr().out
    assert (
        train_main(
            [
                str(inter),
                "--items",
                str(items),
                "--models",
                "sasrec",
                "--name",
                "raw",
                "--output-dir",
                str(tmp_path / "runs"),
                *TINY,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| sasrec | overall | 120 |" in out and "| sid |" not in out
    assert (tmp_path / "runs" / "raw" / "data" / "meta.json").is_file()


@pytest.mark.parametrize("split", ["test", "valid"])
def test_recommend_split_export_reproduces_the_metrics(
    pipeline: dict[str, Any], tmp_path: Path, split: str
) -> None:
    # an outside scorer: HR@K and NDCG@K from the exported lists with a few lines of numpy,
    # on a copy of the run that scores with a text blend (the default), of weight 2 and
    # popularity exponent 0.3 here
    import shutil

    from h2rec import blend
    from h2rec.data import load_dataset
    from h2rec.train.checkpoint import checkpoint_blend, set_checkpoint_blend

    run = tmp_path / "h2rec"
    shutil.copytree(pipeline["base"] / "h2rec", run)
    record = checkpoint_blend(run / "best.pt")
    assert record is not None and record["version"] == 3  # the default: scaled by popularity
    data = json.loads((run / "config.json").read_text())["data"]["path"]
    rows = blend.text_rows(load_dataset(data).item_text)
    assert rows is not None and rows.digest() == record["text_sha256"]
    set_checkpoint_blend(run / "best.pt", {**record, "weight": 2.0, "pop_exponent": 0.3})
    out = tmp_path / "recs.parquet"
    assert main(["recommend", str(run), "--split", split, "--out", str(out), "-k", "20"]) == 0
    assert main(["evaluate", str(run), "--split", split, "--out", str(tmp_path / "m.json")]) == 0
    want = json.loads((tmp_path / "m.json").read_text())["models"]["h2rec"]
    frame = pl.read_parquet(out)
    users = frame["user"].unique().to_list()
    assert len(users) == want["n_users"] == 150
    hr = {10: [], 20: []}
    ndcg = {10: [], 20: []}
    for _, group in frame.group_by("user"):
        g = group.sort("rank")
        target = g["target"][0]
        hits = np.flatnonzero(np.asarray(g["item"].to_list()) == target)
        for k in (10, 20):
            hit = hits.size > 0 and hits[0] < k
            hr[k].append(float(hit))
            ndcg[k].append(1.0 / np.log2(hits[0] + 2.0) if hit else 0.0)
    for k in (10, 20):
        assert np.mean(hr[k]) == pytest.approx(want["metrics"][f"HR@{k}"], abs=1e-12)
        assert np.mean(ndcg[k]) == pytest.approx(want["metrics"][f"NDCG@{k}"], abs=1e-12)
    # the lists never hold an item of the split's input
    ds = load_dataset(pipeline["base"] / "builtin" / "dataset")
    index = ds.user_index()
    holdout = 1 if split == "test" else 2
    for user, group in frame.group_by("user"):
        seq = ds.store.sequence(index[str(user[0])]).tolist()
        seen = {ds.item_ids[i - 1] for i in seq[:-holdout]}
        assert not seen & set(group["item"].to_list())


def test_h2rec_train_mixes_behaviour_into_the_item_vectors(tmp_path: Path) -> None:
    """data.behaviour=w: the embed stage writes the text vectors times sqrt(1 - w) beside the
    co-occurrence vectors of the built-in data's training prefixes (h2rec.embed, tested
    there against a dense oracle), and the SIDs are built from that mix."""
    from h2rec.embed import behaviour_vectors, l2_normalize

    code = train_main(["--models", "sid", "--name", "b", "--output-dir", str(tmp_path), *TINY,
                       "--set", "data.behaviour=0.36"])
    assert code == 0
    base = tmp_path / "b"
    x = np.load(base / "embeddings.npy")
    store = load_dataset(base / "builtin" / "dataset").store
    want = behaviour_vectors(store, seed=0)
    assert x.shape == (130, 16 + want.shape[1])
    np.testing.assert_allclose(x[:, 16:], 0.6 * l2_normalize(want), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x[:, :16], axis=1), 0.8, rtol=1e-5)
    assert np.load(base / "semantic_ids" / "codes.npy").shape[0] == 130
