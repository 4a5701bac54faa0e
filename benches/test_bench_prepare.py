"""``prepare`` on a generated interaction CSV, beside a pandas pipeline doing the same steps.

Steps, both ways: read ``user_id,item_id,timestamp`` (ids as strings), the single-pass
minimum-count filter (users and items with >= 5 interactions), drop users shorter than 3,
number users by first appearance, sort each user's events by (timestamp, file line), number
items by first appearance in that order, build CSR offsets, save ``items.npy``/``offsets.npy``
and the two id maps (h2rec: Parquet; pandas: CSV, as pyarrow is not a dependency).

Each pipeline runs in its own subprocess, which reports its wall time and peak resident memory
(``ru_maxrss``); the figures go into the benchmark record's ``extra_info``. The target is a peak
under 3 GB for h2rec at 10,000,000 interactions.

Size: 10,000,000 interactions with H2REC_BENCH_FULL=1, else 300,000 (CI); or set
H2REC_BENCH_PREPARE_N.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FULL, record

N = int(os.environ.get("H2REC_BENCH_PREPARE_N", "10000000" if FULL else "300000"))
PEAK_TARGET_MB = 3 * 1024


def make_csv(path: Path, n: int, seed: int = 0) -> None:
    """A log in global time order: ~n/16 users with log-normal activity, n/100 items with
    Zipf popularity, second-resolution timestamps (so ties occur)."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n_users = max(100, n // 16)
    n_items = max(100, n // 100)
    activity = rng.lognormal(0.0, 1.0, n_users)
    users = rng.choice(n_users, size=n, p=activity / activity.sum())
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    pop = 1.0 / ranks**1.05
    items = rng.permutation(n_items)[rng.choice(n_items, size=n, p=pop / pop.sum())]
    ts = np.sort(rng.integers(1_500_000_000, 1_500_000_000 + n // 2, size=n))
    frame = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": ts}).with_columns(
        pl.format("u{}", pl.col("user_id")).alias("user_id"),
        pl.format("i{}", pl.col("item_id")).alias("item_id"),
    )
    frame.write_csv(path)


def run_h2rec(csv: str, out: str) -> dict:
    from h2rec.data import FilterOptions, prepare

    path = prepare(csv, out, filter=FilterOptions("min-count", 5, 5), overwrite=True)
    stats = json.loads((Path(path) / "stats.json").read_text())
    return {"users": stats["users"], "items": stats["items"], "interactions": stats["interactions"]}


def run_pandas(csv: str, out: str) -> dict:
    import pandas as pd

    df = pd.read_csv(csv, dtype={"user_id": str, "item_id": str, "timestamp": "int64"})
    df["line"] = np.arange(len(df), dtype=np.int64)
    df = df.dropna(subset=["user_id", "item_id"])
    user_n = df.groupby("user_id")["item_id"].transform("size")
    item_n = df.groupby("item_id")["user_id"].transform("size")
    df = df[(user_n >= 5) & (item_n >= 5)]
    df = df[df.groupby("user_id")["item_id"].transform("size") >= 3].copy()
    df["uid"], user_ids = pd.factorize(df["user_id"])
    df = df.sort_values(["uid", "timestamp", "line"], kind="stable")
    iid, item_ids = pd.factorize(df["item_id"])
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(df["uid"].to_numpy(), minlength=len(user_ids)), out=offsets[1:])
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, "items.npy"), (iid + 1).astype(np.int64))
    np.save(os.path.join(out, "offsets.npy"), offsets)
    pd.DataFrame({"user": np.arange(len(user_ids)), "original_id": user_ids}).to_csv(
        os.path.join(out, "users.csv"), index=False)
    pd.DataFrame({"item": np.arange(1, len(item_ids) + 1), "original_id": item_ids}).to_csv(
        os.path.join(out, "items.csv"), index=False)
    return {"users": len(user_ids), "items": len(item_ids), "interactions": len(df)}


def _child(which: str, csv: str, out: str) -> None:
    import resource
    import time

    start = time.perf_counter()
    result = (run_h2rec if which == "h2rec" else run_pandas)(csv, out)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_in_subprocess(which: str, csv: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, which, str(csv), str(out)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{which} pipeline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def log_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prepare") / f"log_{N}.csv"
    make_csv(path, N)
    return path


@pytest.mark.parametrize("which", ["h2rec", "pandas"])
def test_prepare(benchmark, log_csv: Path, tmp_path: Path, which: str) -> None:
    benchmark.group = f"prepare {N:,} interactions"
    results: list[dict] = []

    def once() -> None:
        results.append(run_in_subprocess(which, log_csv, tmp_path / "out"))

    benchmark.pedantic(once, rounds=1, iterations=1)
    r = results[-1]
    record(benchmark, n=N, **r)
    assert r["interactions"] > 0.5 * N
    if which == "h2rec" and N >= 10_000_000:
        assert r["peak_rss_mb"] < PEAK_TARGET_MB, f"peak {r['peak_rss_mb']:.0f} MB"


def test_both_pipelines_agree(log_csv: Path, tmp_path: Path) -> None:
    """The pandas pipeline is a fair peer only if it computes the same arrays."""
    a = run_in_subprocess("h2rec", log_csv, tmp_path / "a")
    b = run_in_subprocess("pandas", log_csv, tmp_path / "b")
    assert (a["users"], a["items"], a["interactions"]) == (
        b["users"], b["items"], b["interactions"])
    for name in ("items.npy", "offsets.npy"):
        assert np.array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
