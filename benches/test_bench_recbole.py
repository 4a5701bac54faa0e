"""RecBole's SASRec on Amazon Beauty, the peer of h2rec's training-speed benches (issue 10).

RecBole runs in its own environment, never h2rec's: ``benches/recbole_peer.py`` is started with
the Python named by ``H2REC_RECBOLE_PYTHON`` (the test is skipped when it is unset or cannot
import recbole), e.g.::

    python3 -m venv /work/recbole-venv
    /work/recbole-venv/bin/pip install "recbole==1.2.1" "numpy<2" "pandas<3"
    H2REC_RECBOLE_PYTHON=/work/recbole-venv/bin/python python -m pytest benches/test_bench_recbole.py

The script converts ``../shared/data/beauty/Beauty.txt`` into RecBole atomic files in a temporary
directory (never in the repository), trains SASRec with h2rec's settings (hidden 64, 2 layers,
1 head, inner 64, dropout 0.5, max length 50, batch 128, Adam 1e-3, CE over all items, seed 0,
CPU), validates (NDCG@10, leave-one-out, full ranking) after every epoch and tests the best
epoch. The timed figure is the whole command (imports, dataset build, epochs, evaluations); the
seconds of each training epoch, the validation NDCG@10 with its wall time since the command's
start, and the test NDCG@10 / HR@10 go into ``extra_info``.

Sizes: by default a smoke run (the first 300 users, 1 epoch); ``H2REC_BENCH_FULL=1`` runs one
epoch on all 22,363 users (about 5 minutes on 2 cores). ``H2REC_BENCH_RECBOLE_USERS`` (0: all)
and ``H2REC_BENCH_RECBOLE_EPOCHS`` set them directly.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import DATA, FULL, record

SCRIPT = Path(__file__).with_name("recbole_peer.py")
USERS = int(os.environ.get("H2REC_BENCH_RECBOLE_USERS", "0" if FULL else "300"))  # 0: all
EPOCHS = int(os.environ.get("H2REC_BENCH_RECBOLE_EPOCHS", "1"))


@pytest.fixture(scope="module")
def recbole_python() -> str:
    python = os.environ.get("H2REC_RECBOLE_PYTHON", "")
    if not python:
        pytest.skip(
            "H2REC_RECBOLE_PYTHON is unset: point it at the python of a venv with "
            "recbole==1.2.1, numpy<2, pandas<3 (see benches/recbole_peer.py)"
        )
    try:
        proc = subprocess.run(
            [python, "-c", "import recbole, torch; print(recbole.__version__)"],
            capture_output=True, text=True, timeout=300, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"H2REC_RECBOLE_PYTHON={python} is not runnable: {e}")
    if proc.returncode != 0:
        pytest.skip(
            f"H2REC_RECBOLE_PYTHON={python} cannot import recbole: {proc.stderr.strip()[-500:]}"
        )
    return python


def run_peer(python: str, data: Path, epochs: int, users: int) -> dict:
    cmd = [python, str(SCRIPT), "--epochs", str(epochs), "--data", str(data)]
    if users:
        cmd += ["--max-users", str(users)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"recbole_peer.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_recbole_sasrec_epoch(benchmark, recbole_python: str) -> None:
    data = DATA / "beauty" / "Beauty.txt"
    if not data.exists():
        pytest.skip(f"{data} is not present")
    benchmark.group = f"RecBole SASRec, Beauty, cpu, {EPOCHS} epoch(s), whole command"
    results: list[dict] = []

    def once() -> None:
        results.append(run_peer(recbole_python, data, EPOCHS, USERS))

    benchmark.pedantic(once, rounds=1, iterations=1)
    r = results[-1]
    record(
        benchmark,
        recbole=r["versions"]["recbole"],
        torch=r["versions"]["torch"],
        users=r["users"],
        items=r["items"],
        train_samples=r["train_samples"],
        threads=r["threads"],
        epochs=len(r["epochs"]),
        setup_seconds=r["setup_seconds"],
        epoch_seconds=r["epoch_seconds"],
        seconds_per_epoch=r["seconds_per_epoch"],
        valid_ndcg10=[e["valid_ndcg@10"] for e in r["epochs"]],
        valid_wall_seconds=[e["wall_seconds"] for e in r["epochs"]],
        best_epoch=r["best_epoch"],
        test_ndcg10=r["test_ndcg@10"],
        test_hr10=r["test_hr@10"],
        total_seconds=r["total_seconds"],
    )
    if USERS:
        assert r["users"] == USERS
    assert len(r["epochs"]) == EPOCHS and r["seconds_per_epoch"] > 0
    for e in r["epochs"]:
        assert 0.0 <= e["valid_ndcg@10"] <= e["valid_hr@10"] <= 1.0
    assert 0.0 <= r["test_ndcg@10"] <= r["test_hr@10"] <= 1.0
