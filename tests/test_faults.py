"""Fault and fuzz suite: malformed inputs for every reader and command, and kill -9 at random
points of prepare, embed, build-sid and train.

Every malformed input must end with exit status 2 (or 0 when the input happens to be usable),
one ``h2rec: error:`` line and no traceback, and leave the input and any earlier output
byte-for-byte unchanged. After a kill -9, an output is either the old one or a complete new
one, a rerun (``--resume`` for training) finishes, and the resumed metrics equal an
uninterrupted run's. ``H2REC_FAULT_ROUNDS`` (default 2) sets the kills per command and
``H2REC_FUZZ_EXAMPLES`` (default 40) the generated inputs per fuzz test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from h2rec.cli import main
from h2rec.data import load_dataset
from h2rec.synthetic import SyntheticConfig, generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROUNDS = int(os.environ.get("H2REC_FAULT_ROUNDS", "2"))
FUZZ = settings(max_examples=int(os.environ.get("H2REC_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TINY = [
    "--set", "model.hidden=16",
    "--set", "model.max_len=10",
    "--set", "train.batch_size=32",
    "--set", "train.device=cpu",
    "--set", "train.num_threads=1",
    "--set", "model.kind=sasrec",
]  # fmt: skip


def snapshot(path: Path) -> dict[str, str]:
    """Every file at or under ``path`` and a hash of its bytes ({} when absent); the marker is
    left out (it carries a random id per write)."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".h2rec-output.json"
    }


def cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    """Run ``h2rec args`` in process; check the one error path; return (status, error line)."""
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("h2rec:")]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("h2rec: error: "), err
        assert len(lines[0]) < 1200, lines[0]
    return code, lines[0] if lines else ""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    inter, items = generate(root / "src", SyntheticConfig(n_users=80, n_items=70, seed=11))
    ds = root / "ds"
    assert main(["prepare", str(inter), str(ds), "--items", str(items)]) == 0
    assert main(["embed", str(ds), "--dim", "8"]) == 0
    assert main(["build-sid", str(ds), str(ds / "sid"), "--levels", "2", "--codebook-size",
                 "4", "--iters", "3"]) == 0
    assert main(["train", str(ds), "--name", "run", "--output-dir", str(root),
                 "--set", "train.epochs=1", *TINY]) == 0
    return {"root": root, "inter": inter, "items": items, "ds": ds, "run": root / "run"}


# --------------------------------------------------------------------------- malformed inputs

_TOKEN = st.sampled_from(["u1", "u2", "a", "b", "c", "1", "2", "1.5", "-3", "", " ", "\t", ",",
                          ";", "::", '"', "x" * 300, "\x00", "\x1f", "é", "\ud800", "nan",
                          "99999999999999999999", "1e400", "2020-01-01", "[1,2]", "{}"])
_LINE = st.lists(_TOKEN, max_size=6).map(lambda toks: "".join(toks))
_TEXT = st.lists(_LINE, max_size=12).map(lambda lines: "\n".join(lines))
_RAW = st.binary(max_size=300)


def _encode(text: str) -> bytes:
    return text.encode("utf8", "surrogatepass")  # lone surrogates become invalid UTF-8


@pytest.mark.parametrize(
    "name, header",
    [
        ("log.csv", "user_id,item_id,timestamp\n"),
        ("log.tsv", "user_id\titem_id\n"),
        ("log.inter", "user_id:token\titem_id:token\ttimestamp:float\n"),
        ("ratings.dat", ""),
        ("seq.txt", ""),
        ("pairs.txt", "u1 a\nu1 b\n"),
    ],
)
@FUZZ
@given(body=st.one_of(_TEXT, _RAW.map(lambda b: b.decode("latin-1"))), skip=st.booleans())
def test_prepare_fuzz_text_formats(
    name: str, header: str, body: str, skip: bool, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp = tmp_path_factory.mktemp("fz")
    f = tmp / name
    f.write_bytes(_encode(header + body))
    earlier = tmp / "out"
    earlier.mkdir()
    (earlier / "mine.txt").write_text("a user's file")  # not h2rec's: must survive
    before_in, before_out = snapshot(f), snapshot(earlier)
    args = ["prepare", str(f), str(tmp / "new")] + (["--on-bad-line", "skip"] if skip else [])
    code, _ = cli(capsys, args)
    assert snapshot(f) == before_in
    if code == 0:
        assert load_dataset(tmp / "new").n_items >= 2
    else:
        assert not (tmp / "new").exists()
    code, line = cli(capsys, ["prepare", str(f), str(earlier), "--overwrite"])
    assert code == 2 and snapshot(earlier) == before_out and snapshot(f) == before_in
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []


@FUZZ
@given(
    users=st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3),
                             st.none()), min_size=1, max_size=12),
    items=st.lists(st.one_of(st.integers(0, 5), st.text(max_size=2), st.none()),
                   min_size=1, max_size=12),
    nested=st.booleans(),
)
def test_prepare_fuzz_parquet(
    users: list[Any], items: list[Any], nested: bool,
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
) -> None:
    tmp = tmp_path_factory.mktemp("pq")
    n = min(len(users), len(items))
    try:
        col_u = pl.Series("user_id", users[:n], strict=False)
        col_i = pl.Series("item_id", items[:n], strict=False)
        if nested:
            col_i = pl.Series("item_id", [[v] for v in items[:n]], strict=False)
        pl.DataFrame([col_u, col_i]).write_parquet(tmp / "log.parquet")
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        return  # not a frame polars can write: nothing to test
    before = snapshot(tmp / "log.parquet")
    code, _ = cli(capsys, ["prepare", str(tmp / "log.parquet"), str(tmp / "ds")])
    assert snapshot(tmp / "log.parquet") == before
    assert (tmp / "ds").exists() == (code == 0)


@FUZZ
@given(body=st.one_of(_TEXT, _RAW.map(lambda b: b.decode("latin-1"))))
def test_prepare_fuzz_item_tables(
    base: dict[str, Path], body: str, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp = tmp_path_factory.mktemp("it")
    for name, head in (("items.csv", "item_id,title\n"), ("items.json", ""),
                       ("movies.dat", "")):
        f = tmp / name
        f.write_bytes(_encode(head + body))
        before = snapshot(f)
        cli(capsys, ["prepare", str(base["inter"]), str(tmp / name.replace(".", "_")),
                     "--items", str(f)])
        assert snapshot(f) == before


@FUZZ
@given(
    raw=st.one_of(
        _RAW,
        st.sampled_from(["nan", "inf", "zeros", "int", "3d", "1d", "object", "short", "empty2d",
                         "npz", "fortran"]),
    )
)
def test_embed_and_build_sid_fuzz_npy(
    base: dict[str, Path], raw: bytes | str, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp = tmp_path_factory.mktemp("np")
    f = tmp / "x.npy"
    n = load_dataset(base["ds"]).n_items
    rng = np.random.default_rng(0)
    if isinstance(raw, bytes):
        f.write_bytes(raw)
    else:
        arrays = {
            "nan": np.full((n, 4), np.nan, dtype=np.float32),
            "inf": np.full((n, 4), np.inf),
            "zeros": np.zeros((n, 4), dtype=np.float32),
            "int": rng.integers(0, 9, (n, 4)),
            "3d": rng.standard_normal((n, 2, 2)),
            "1d": rng.standard_normal(n),
            "short": rng.standard_normal((3, 4)),
            "empty2d": np.zeros((n, 0), dtype=np.float32),
            "fortran": np.asfortranarray(rng.standard_normal((n, 4))),
        }
        if raw == "object":
            np.save(f, np.array([{"a": 1}] * n, dtype=object), allow_pickle=True)
        elif raw == "npz":
            np.savez(f.with_suffix(""), a=np.ones((n, 4)))
            f.with_suffix(".npz").rename(f)
        else:
            np.save(f, arrays[raw])
    before = snapshot(f)
    earlier_emb = tmp / "e.npy"
    np.save(earlier_emb, np.ones((2, 2), dtype=np.float32))
    old = snapshot(earlier_emb)
    code, _ = cli(capsys, ["embed", str(base["ds"]), "--backend", "npy", "--npy", str(f),
                           "--out", str(earlier_emb), "--overwrite"])
    if code == 2:
        assert snapshot(earlier_emb) == old
    cli(capsys, ["build-sid", str(f), str(tmp / "sid"), "--codebook-size", "2", "--iters", "2"])
    assert snapshot(f) == before


@FUZZ
@given(body=st.one_of(_TEXT, _RAW.map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["[train]\nlr = 'x'\n", "[nope]\n", "name = 3\n",
                                       "[model]\nhidden = -1\n", "[train]\nepochs = 1e9\n"])))
def test_config_fuzz(
    base: dict[str, Path], body: str, tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp = tmp_path_factory.mktemp("cf")
    f = tmp / "c.toml"
    f.write_bytes(_encode(body))
    # --set train.epochs=0 keeps a config that happens to be valid from training long
    code, _ = cli(capsys, ["train", str(base["ds"]), "--config", str(f), "--output-dir",
                           str(tmp / "runs"), "--set", "train.epochs=0", *TINY])
    if code == 2:
        assert not (tmp / "runs").exists() or not any((tmp / "runs").iterdir())


@pytest.mark.parametrize("target", ["best.pt", "codes.npy", "items.npy", "meta.json",
                                    "users.parquet", "sid_meta.json", "config.json"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "remove"])
def test_damaged_files_of_a_dataset_sids_or_run(
    base: dict[str, Path], target: str, damage: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    ds, run = tmp_path / "ds", tmp_path / "run"
    shutil.copytree(base["ds"], ds)
    shutil.copytree(base["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["path"] = str(ds)
    (run / "config.json").write_text(json.dumps(cfg))
    path = {"best.pt": run / "best.pt", "codes.npy": ds / "sid" / "codes.npy",
            "sid_meta.json": ds / "sid" / "meta.json", "config.json": run / "config.json"
            }.get(target, ds / target)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(len(data))))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    for args in (
        ["evaluate", str(run), "--data", str(ds)],
        ["recommend", str(run), "--data", str(ds), "--out", str(tmp_path / "r.csv")],
        ["train", str(ds), "--name", "t", "--output-dir", str(tmp_path / "runs"),
         "--set", "train.epochs=1", "--set", "model.kind=sid", *TINY[:-2]],
    ):
        before = snapshot(tmp_path / "ds")
        cli(capsys, args)
        assert snapshot(tmp_path / "ds") == before


# --------------------------------------------------------------------------- kill -9


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "h2rec.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run_to_end(args: list[str], cwd: Path) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = _spawn(args, cwd)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - t0


def _kill_at_random(args: list[str], cwd: Path, span: float, rng: random.Random) -> float:
    """Start ``h2rec args``, SIGKILL it after a random delay below ``span``; return it."""
    delay = rng.uniform(0.4, 1.0) * span  # mostly past the start-up, into the work
    proc = _spawn(args, cwd)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    return delay


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "embed", "build-sid"])
def test_kill_9_during_an_overwrite_leaves_old_or_complete_new_output(
    base: dict[str, Path], command: str, tmp_path: Path
) -> None:
    import shutil

    rng = random.Random(f"kill-{command}")
    ds = tmp_path / "ds"
    shutil.copytree(base["ds"], ds)
    if command == "prepare":
        out = tmp_path / "prep"
        first = ["prepare", str(base["inter"]), str(out)]
        second = [*first, "--items", str(base["items"]), "--overwrite"]
    elif command == "embed":
        out = ds / "embeddings.npy"
        first = ["embed", str(ds), "--dim", "8", "--overwrite"]
        second = ["embed", str(ds), "--dim", "6", "--overwrite"]
    else:
        out = tmp_path / "sid"
        first = ["build-sid", str(ds), str(out), "--levels", "2", "--codebook-size", "4"]
        second = [*first, "--seed", "7", "--overwrite"]
    code, err, _ = _run_to_end(first, tmp_path)
    assert code == 0, err
    old = snapshot(out)
    code, err, span = _run_to_end(second, tmp_path)
    assert code == 0, err
    new = snapshot(out)
    assert new != old
    for _ in range(ROUNDS):
        code, err, _ = _run_to_end(first, tmp_path)
        if command != "embed":
            assert code in (0, 2), err  # exists: refused without --overwrite
            code, err, _ = _run_to_end([*first, "--overwrite"], tmp_path)
        assert code == 0, err
        assert snapshot(out) == old
        delay = _kill_at_random(second, tmp_path, span, rng)
        now = snapshot(out)
        assert now in (old, new) or _same_dataset(out, now, new), (command, delay)
        # a rerun finishes and leaves no temporary folder or lock behind
        code, err, _ = _run_to_end(second, tmp_path)
        assert code == 0, (delay, err)
        assert snapshot(out) == new or _same_dataset(out, snapshot(out), new)
        assert _hidden(out.parent) == (
            [".h2rec-output.json"] if out.parent == ds else []), (delay, _hidden(out.parent))


def _same_dataset(out: Path, now: dict[str, str], new: dict[str, str]) -> bool:
    """A prepared dataset's files other than meta.json (which records absolute paths) match."""
    keep = lambda d: {k: v for k, v in d.items() if k != "meta.json"}  # noqa: E731
    return out.is_dir() and keep(now) == keep(new) and (out / "meta.json").is_file()


def _metrics(run: Path) -> dict[str, Any]:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("models", "best_epoch", "best_valid_ndcg10", "epochs_run",
                              "stopped_early")}


@pytest.mark.slow
def test_kill_9_during_training_then_resume_equals_an_uninterrupted_run(
    base: dict[str, Path], tmp_path: Path
) -> None:
    rng = random.Random("kill-train")
    args = ["train", str(base["ds"]), "--output-dir", str(tmp_path), "--set", "train.epochs=4",
            "--set", "train.patience=0", *TINY]
    code, err, span = _run_to_end([*args, "--name", "whole"], tmp_path)
    assert code == 0, err
    want = _metrics(tmp_path / "whole")
    for r in range(ROUNDS):
        name = f"killed{r}"
        delay = _kill_at_random([*args, "--name", name], tmp_path, span, rng)
        run = tmp_path / name
        resume = ["--resume"] if (run / "last.pt").exists() else []
        code, err, _ = _run_to_end([*args, "--name", name, *resume], tmp_path)
        assert code == 0, (delay, err)
        assert _metrics(run) == want, delay
        assert _hidden(tmp_path) == [], (delay, _hidden(tmp_path))


@pytest.mark.slow
def test_kill_9_during_an_overwrite_run_keeps_the_old_run_or_the_whole_new_one(
    base: dict[str, Path], tmp_path: Path
) -> None:
    rng = random.Random("kill-overwrite")
    args = ["train", str(base["ds"]), "--output-dir", str(tmp_path), "--name", "r", *TINY]
    code, err, _ = _run_to_end([*args, "--set", "train.epochs=1"], tmp_path)
    assert code == 0, err
    old = snapshot(tmp_path / "r")
    second = [*args, "--set", "train.epochs=3", "--set", "train.patience=0", "--overwrite"]
    code, err, span = _run_to_end([*args, "--set", "train.epochs=3", "--set", "train.patience=0",
                                   "--name", "ref"], tmp_path)
    assert code == 0, err
    want = _metrics(tmp_path / "ref")
    for _ in range(ROUNDS):
        delay = _kill_at_random(second, tmp_path, span, rng)
        now = snapshot(tmp_path / "r")
        if now != old:  # the swap happened: the new run is complete
            assert _metrics(tmp_path / "r") == want, delay
        pending = tmp_path / ".r.new"
        resume = ["--resume"] if (pending / "last.pt").exists() else []
        code, err, _ = _run_to_end([*second, *resume], tmp_path)
        assert code == 0, (delay, err)
        assert _metrics(tmp_path / "r") == want, delay
        assert _hidden(tmp_path) == [], (delay, _hidden(tmp_path))
        # back to the old one for the next round
        code, err, _ = _run_to_end([*args, "--set", "train.epochs=1", "--overwrite"], tmp_path)
        assert code == 0, err
        old = snapshot(tmp_path / "r")


@pytest.mark.slow
def test_sigint_exits_130_without_a_traceback(base: dict[str, Path], tmp_path: Path) -> None:
    proc = _spawn(["train", str(base["ds"]), "--output-dir", str(tmp_path), "--name", "c",
                   "--set", "train.epochs=500", *TINY], tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "c" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    text = err.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "h2rec: error: interrupted" in text
    # and it continues
    code, err2, _ = _run_to_end(["train", str(base["ds"]), "--output-dir", str(tmp_path),
                                 "--name", "c", "--set", "train.epochs=2", "--resume", *TINY],
                                tmp_path)
    assert code == 0 or "train.epochs" in err2


def test_ctrl_c_inside_an_atomic_write_is_raised_once_the_file_is_in_place(tmp_path: Path) -> None:
    """A SIGINT in the middle of a checkpoint write (torch.save turned the KeyboardInterrupt
    into "RuntimeError: unexpected pos ...") waits until the file is whole and renamed."""
    import torch
    from h2rec.report import atomic_writer

    path = tmp_path / "ckpt.pt"
    state = {"w": torch.arange(100_000, dtype=torch.float32)}

    def write(f) -> None:
        f.write(b"")  # the writer is open: Ctrl-C now
        os.kill(os.getpid(), signal.SIGINT)
        torch.save(state, f)

    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored, and Python then keeps it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_writer(path, write)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
