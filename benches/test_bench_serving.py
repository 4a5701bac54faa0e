"""Serving throughput: ``Recommender.recommend_file`` on generated histories, histories per
second and the peak memory it adds, for sequence text and CSV rows.

A small SASRec is trained on the built-in data once; the histories are random walks over its
catalogue (5-20 items, some unknown ids, a few empty). Scoring runs in a subprocess whose peak
RSS is reset before the call (``/proc/self/clear_refs``), so the figure is what scoring adds.
By default 20,000 histories (CI); ``H2REC_BENCH_FULL=1``: 1,000,000, the figure the README
quotes. Streaming means the added memory does not grow with the number of histories.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FULL, record

N_HISTORIES = 1_000_000 if FULL else 20_000

_SCORE = """
import sys, time
import h2rec
rec = h2rec.load(sys.argv[1])
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
base = status_kb("VmRSS")
t0 = time.perf_counter()
stats = rec.recommend_file(sys.argv[2], sys.argv[3], k=10)
seconds = time.perf_counter() - t0
print(seconds, base / 1024, status_kb("VmHWM") / 1024, stats.histories, stats.unknown_items)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import h2rec

    out = tmp_path_factory.mktemp("serving")
    run = h2rec.fit(model="sasrec", output_dir=out, name="serve", overrides=[
        "train.epochs=1", "train.device=cpu", "model.max_len=20", "train.num_threads=1",
    ])
    rec = h2rec.load(run.run_dirs["sasrec"])
    ids = np.array(rec.dataset.item_ids, dtype=object)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 21, N_HISTORIES)
    lengths[rng.random(N_HISTORIES) < 0.01] = 0
    items = ids[rng.integers(0, ids.size, int(lengths.sum()))]
    items[rng.random(items.size) < 0.02] = "not-in-the-catalogue"
    users = np.repeat(np.array([f"v{u}" for u in range(N_HISTORIES)], dtype=object), lengths)
    txt = out / "histories.txt"
    with txt.open("w") as f:
        start = 0
        for u, n in enumerate(lengths):
            f.write(" ".join([f"v{u}", *items[start : start + n]]) + "\n")
            start += n
    csv = out / "histories.csv"
    with csv.open("w") as f:
        f.write("user_id,item_id,timestamp\n")
        times = np.arange(items.size)
        order = rng.permutation(items.size)  # rows in no particular order
        for i in order:
            f.write(f"{users[i]},{items[i]},{times[i]}\n")
    return {"run": run.run_dirs["sasrec"], "txt": txt, "csv": csv, "out": out}


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_recommend_file(benchmark, trained: dict[str, Any], fmt: str) -> None:
    out_file = Path(trained["out"]) / f"top-{fmt}.parquet"
    result: list[str] = []

    def run() -> None:
        out_file.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", _SCORE, str(trained["run"]), str(trained[fmt]), str(out_file)],
            capture_output=True, text=True, check=True, timeout=3600,
        )
        result[:] = proc.stdout.split()[-5:]

    benchmark.group = f"recommend_file, {N_HISTORIES} new histories"
    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds, base_mb, peak_mb = float(result[0]), float(result[1]), float(result[2])
    histories = int(result[3])
    record(benchmark, histories=histories, seconds=seconds,
           histories_per_second=histories / seconds, rss_before_mb=base_mb,
           peak_added_mb=peak_mb - base_mb, unknown_items=int(result[4]))
    # a row file has no line for an empty history; the sequence text does
    assert histories <= N_HISTORIES and histories > 0.98 * N_HISTORIES
    assert out_file.stat().st_size > 0
