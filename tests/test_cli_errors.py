"""One error path: every user mistake and OS error is a short message and exit 2, Ctrl-C is 130,
no traceback without -v; and the inputs that used to crash, mislead or pass without a word."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from h2rec.cli import main
from h2rec.data import load_dataset, prepare
from h2rec.synthetic import SyntheticConfig, generate

TINY = [
    "--set", "model.hidden=16",
    "--set", "model.max_len=10",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=64",
    "--set", "train.device=cpu",
    "--set", "train.num_threads=1",
    "--set", "model.kind=sasrec",
]  # fmt: skip


def fails(capsys: pytest.CaptureFixture[str], args: list[str], code: int = 2) -> str:
    """Run the CLI; assert the exit status, one ``h2rec:`` line and no traceback; return it."""
    got = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("h2rec:")]
    assert got == code, err
    assert len(lines) == 1, err
    return lines[0]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    inter, items = generate(root / "src", SyntheticConfig(n_users=100, n_items=90, seed=5))
    ds = root / "ds"
    assert main(["prepare", str(inter), str(ds), "--items", str(items)]) == 0
    assert main(["train", str(ds), "--name", "r", "--output-dir", str(root), *TINY]) == 0
    return {"root": root, "ds": ds, "run": root / "r", "inter": inter}


# --------------------------------------------------------------------------- used to crash


def test_timestamp_beyond_int64_is_a_bad_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path / "t.csv", "user_id,item_id,timestamp\n1,2,3\n1,3,99999999999999999999\n"
              "1,4,5\n1,5,6\n")
    line = fails(capsys, ["prepare", str(f), str(tmp_path / "o")])
    assert "t.csv:3: bad timestamp" in line and "99999999999999999999" in line
    assert main(["prepare", str(f), str(tmp_path / "o"), "--on-bad-line", "skip"]) == 0
    side = pl.read_csv(tmp_path / "o" / "skipped_rows.csv")
    assert side.get_column("line").to_list() == [3]


def test_parquet_id_columns_of_lists_or_structs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "lists.parquet"
    pl.DataFrame({"user_id": ["a", "b"], "item_id": [[1, 2], [3]]}).write_parquet(f)
    line = fails(capsys, ["prepare", str(f), str(tmp_path / "o")])
    assert "item column 'item_id' holds list" in line
    g = tmp_path / "struct.parquet"
    pl.DataFrame({"user_id": [{"x": 1}] * 3, "item_id": ["1", "2", "3"]}).write_parquet(g)
    line = fails(capsys, ["prepare", str(g), str(tmp_path / "o")])
    assert "user column 'user_id' holds struct" in line and "short" not in line


def test_float_ids_are_whole_numbers_or_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "f.parquet"
    pl.DataFrame({"user_id": [45.0] * 3 + [46.0] * 3, "item_id": ["1", "2", "3"] * 2}
                 ).write_parquet(f)
    prepare(f, tmp_path / "o")
    assert load_dataset(tmp_path / "o").user_ids == ["45", "46"]
    g = tmp_path / "g.parquet"
    pl.DataFrame({"user_id": [4.5] * 3, "item_id": ["1", "2", "3"]}).write_parquet(g)
    assert "not a whole number" in fails(capsys, ["prepare", str(g), str(tmp_path / "p")])


def test_empty_or_garbage_npy(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = write(tmp_path / "empty.npy", b"")
    line = fails(capsys, ["embed", str(trained["ds"]), "--backend", "npy", "--npy", str(empty),
                          "--out", str(tmp_path / "e.npy")])
    assert "the file is empty" in line
    assert "the file is empty" in fails(capsys, ["build-sid", str(empty), str(tmp_path / "s")])
    cut = tmp_path / "cut.npy"
    np.save(cut, np.ones((50, 4), dtype=np.float32))
    cut.write_bytes(cut.read_bytes()[:200])
    line = fails(capsys, ["build-sid", str(cut), str(tmp_path / "s")])
    assert "cannot read as .npy" in line and "not fully written" in line
    junk = write(tmp_path / "junk.npy", b"\x93NUMPY garbage here")
    line = fails(capsys, ["build-sid", str(junk), str(tmp_path / "s")])
    assert "allow_pickle" not in line and "cannot read as .npy" in line
    text = write(tmp_path / "text.npy", "1,2,3\n")
    line = fails(capsys, ["build-sid", str(text), str(tmp_path / "s")])
    assert "allow_pickle" not in line and "no .npy header" in line
    assert not (tmp_path / "s").exists() and not (tmp_path / "e.npy").exists()


def test_config_not_utf8_or_a_folder(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path / "bad.toml", b'name = "\xff\xfe"\n')
    out = ["--output-dir", str(tmp_path / "runs")]
    assert "not UTF-8" in fails(capsys, ["train", str(trained["ds"]), "--config", str(bad), *out])
    line = fails(capsys, ["train", str(trained["ds"]), "--config", str(tmp_path), *out])
    assert "is a folder" in line
    assert not (tmp_path / "runs").exists()


def test_single_item_catalogue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "one.txt", "u1 a a a a\nu2 a a a\n")
    assert "at least 2 items" in fails(capsys, ["prepare", str(f), str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_user_whose_training_prefix_holds_every_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path / "all.txt", "u1 a b c d a b\nu2 a b c\nu3 b c d\n")
    assert main(["prepare", str(f), str(tmp_path / "ds")]) == 0
    line = fails(capsys, ["train", str(tmp_path / "ds"), "--output-dir", str(tmp_path / "runs"),
                          *TINY])
    assert "no negative can be drawn" in line
    assert not (tmp_path / "runs" / "default").exists()  # no empty run folder left


def test_permission_denied_is_a_message(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tempfile

    def denied(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "ro"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    line = fails(capsys, ["prepare", str(trained["inter"]), str(tmp_path / "ro" / "ds")])
    assert "ro: Permission denied; check the permissions" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = fails(capsys, ["prepare", str(trained["inter"]), str(ro / "ds")])
        assert "Permission denied" in line
    finally:
        ro.chmod(0o755)


def test_full_disk_is_a_message(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_save = np.save

    def full(file: Any, *args: Any, **kwargs: Any) -> None:  # as numpy does: no file name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    line = fails(capsys, ["embed", str(trained["ds"]), "--out", str(tmp_path / "e.npy")])
    assert "No space left on device; the disk is full" in line and "e.npy" in line
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file left


def test_torch_full_disk_error_becomes_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from h2rec.report import atomic_writer

    class Full:
        f_bavail, f_frsize = 0, 4096

    def torch_like(f: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(OSError) as info:
        atomic_writer(tmp_path / "last.pt", torch_like)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_internal_error_is_one_line_and_v_shows_the_traceback(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import h2rec.data as data_mod

    def bug(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug\nwith two lines")

    monkeypatch.setattr(data_mod, "load_dataset", bug)
    line = fails(capsys, ["train", str(trained["ds"])], code=1)
    assert "internal error (RuntimeError: a bug)" in line and "-v" in line
    assert main(["train", str(trained["ds"]), "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["prepare", "x", "y", "-v"]) == 2  # -v exists on every command


def test_keyboard_interrupt_while_loading_the_libraries_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import h2rec.cli as cli_mod

    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "build_parser", interrupt)
    assert "interrupted" in fails(capsys, ["train", "x"], code=130)


def test_keyboard_interrupt_exits_130(
    trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import h2rec.data as data_mod

    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(data_mod, "load_dataset", interrupt)
    assert "interrupted" in fails(capsys, ["train", str(trained["ds"])], code=130)


# --------------------------------------------------------------------------- misleading


def test_too_few_fields_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path / "few.csv", "user_id,item_id,timestamp\n1,2,3\n1,3\n1,4,5\n1,5,6\n")
    line = fails(capsys, ["prepare", str(f), str(tmp_path / "o")])
    assert "few.csv:3: wrong number of fields (header has 3): '1,3'" in line
    g = write(tmp_path / "few2.csv", "user_id,item_id,timestamp\n1,2,3\n1\n1,4,5\n1,5,6\n")
    assert "few2.csv:3: wrong number of fields" in fails(
        capsys, ["prepare", str(g), str(tmp_path / "o")])


def test_bad_rows_are_quoted_short_and_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path / "long.csv", b"user_id,item_id,timestamp\n1,2,3\n1,3,\x01\x02"
              + b"x" * 5000 + b"\n1,4,5\n")
    line = fails(capsys, ["prepare", str(f), str(tmp_path / "o")])
    assert "long.csv:3: bad timestamp" in line and "\\x01\\x02" in line
    snippet = line.split("bad timestamp: ", 1)[1].split("... (4,806 more characters)", 1)[0]
    assert len(snippet) <= 2 + 200 + 6  # quotes, 200 characters, two escapes of 4 for 1
    assert "\x01" not in line


def test_non_utf8_lines_have_a_number_a_hint_and_can_be_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seq = write(tmp_path / "latin.txt", b"u1 a b c\nu2 caf\xe9 b c\nu3 a b c\n")
    line = fails(capsys, ["prepare", str(seq), str(tmp_path / "o")])
    assert "latin.txt:2: not valid UTF-8" in line and "--encoding latin-1" in line
    assert main(["prepare", str(seq), str(tmp_path / "o"), "--on-bad-line", "skip"]) == 0
    assert load_dataset(tmp_path / "o").user_ids == ["u1", "u3"]
    side = pl.read_csv(tmp_path / "o" / "skipped_rows.csv")
    assert side.select("line", "reason").rows() == [(2, "not valid UTF-8")]
    table = write(tmp_path / "latin.csv", b"user_id,item_id\nu1,a\nu1,b\nu1,caf\xe9\nu1,c\n")
    line = fails(capsys, ["prepare", str(table), str(tmp_path / "p")])
    assert "latin.csv:4: not valid UTF-8" in line
    assert main(["prepare", str(table), str(tmp_path / "p"), "--on-bad-line", "skip"]) == 0
    ds = load_dataset(tmp_path / "p")
    assert ds.item_ids == ["a", "b", "c"]
    assert main(["prepare", str(table), str(tmp_path / "q"), "--encoding", "latin-1"]) == 0
    assert load_dataset(tmp_path / "q").item_ids == ["a", "b", "café", "c"]


# --------------------------------------------------------------------------- accepted silently


def test_nul_bytes_in_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "nul.txt", b"u1 a\x00b b c\nu2 a b c\nu3 a b c\n")
    line = fails(capsys, ["prepare", str(f), str(tmp_path / "o")])  # sequences
    assert "nul.txt:1: NUL byte in an id: 'u1 a\\x00b b c'" in line
    p = write(tmp_path / "nulpairs.txt", b"u1 a\x00b\nu1 b\nu1 c\n")
    line = fails(capsys, ["prepare", str(p), str(tmp_path / "o"), "--format", "pairs"])
    assert "nulpairs.txt:1: NUL byte in the item id" in line
    g = write(tmp_path / "nul.csv", b"user_id,item_id\nu1,a\x00b\nu1,b\nu1,c\n")
    assert "nul.csv:2: NUL byte in the item id: 'u1 a\\x00b'" in fails(
        capsys, ["prepare", str(g), str(tmp_path / "o")])


def test_duplicate_rows_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = write(tmp_path / "dup.csv", "user_id,item_id,timestamp\n1,2,3\n1,2,3\n1,3,4\n1,4,5\n")
    with caplog.at_level(logging.WARNING, logger="h2rec"):
        out = prepare(f, tmp_path / "o")
    assert "1 rows repeat an earlier row exactly" in caplog.text
    assert json.loads((out / "meta.json").read_text())["duplicate_rows"] == 1


def test_user_col_equal_to_item_col(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = fails(capsys, ["prepare", str(trained["inter"]), str(tmp_path / "o"),
                          "--user-col", "item_id", "--item-col", "item_id"])
    assert "both 'item_id'" in line


def test_codebook_size_1_and_iters_0_are_refused(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "e.npy"
    np.save(emb, np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32))
    for extra in (["--codebook-size", "1"], ["--iters", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["build-sid", str(emb), str(tmp_path / "s"), *extra])
        assert info.value.code == 2
        assert ">= " in capsys.readouterr().err
    from h2rec.semantic_ids import build_sid

    with pytest.raises(ValueError, match="codebook_size=1"):
        build_sid(np.load(emb), codebook_size=1)
    with pytest.raises(ValueError, match="n_iter=0"):
        build_sid(np.load(emb), codebook_size=4, n_iter=0)


def test_evaluate_refuses_model_overrides_and_non_json_out(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = str(trained["run"])
    assert "eval.* settings" in fails(capsys, ["evaluate", run, "--set", "model.hidden=32"])
    out = tmp_path / "eval.xlsx"
    assert "JSON" in fails(capsys, ["evaluate", run, "--out", str(out)])
    assert not out.exists()
    # an existing --out is refused before the evaluation runs
    existing = write(tmp_path / "m.json", "{}")
    import h2rec.evaluate as evaluate_mod

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("evaluated before refusing the output")

    monkeypatch.setattr(evaluate_mod, "evaluate", never)
    assert "--overwrite" in fails(capsys, ["evaluate", run, "--out", str(existing)])
    assert existing.read_text() == "{}"


# --------------------------------------------------------------------------- from the review


def test_users_split_over_several_lines_keep_their_order(tmp_path: Path) -> None:
    n = 4000
    lines = [f"u{u} " + " ".join(f"i{u}_{h}_{j}" for j in range(5))
             for h in range(2) for u in range(n)]
    f = write(tmp_path / "split.txt", "\n".join(lines) + "\n")
    ds = load_dataset(prepare(f, tmp_path / "ds"))
    wrong = 0
    for u in range(ds.n_users):
        seq = [ds.item_ids[i - 1] for i in ds.store.sequence(u).tolist()]
        name = ds.user_ids[u][1:]
        wrong += seq != [f"i{name}_{h}_{j}" for h in range(2) for j in range(5)]
    assert wrong == 0


def test_epochs_run_after_an_early_stop(trained: dict[str, Path], tmp_path: Path) -> None:
    from h2rec.config import RunConfig, apply_overrides
    from h2rec.train import train

    ds = load_dataset(trained["ds"])
    sets = [TINY[i + 1] for i in range(0, len(TINY), 2)]
    cfg = apply_overrides(RunConfig(), [*sets, "train.epochs=6", "train.patience=1",
                                        "train.lr=1e-12"])
    result = train(cfg, ds.store, run_dir=tmp_path / "run")
    assert result.stopped_early and len(result.history) == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == result.epochs_run == 2
