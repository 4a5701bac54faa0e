"""Nothing is deleted that h2rec did not write: --overwrite rules, markers, run-folder locks,
atomic replacement, and item-id fingerprints on Semantic IDs, embeddings and checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from h2rec.cli import main
from h2rec.data import load_dataset
from h2rec.synthetic import SyntheticConfig, generate

TINY = [
    "--set", "model.hidden=16",
    "--set", "model.max_len=10",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=64",
    "--set", "train.device=cpu",
    "--set", "train.num_threads=1",
]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prepared dataset with embeddings and SIDs, and its raw files."""
    root = tmp_path_factory.mktemp("staged")
    inter, items = generate(root / "src", SyntheticConfig(n_users=120, n_items=130, seed=3))
    ds = root / "ds"
    assert main(["prepare", str(inter), str(ds), "--items", str(items)]) == 0
    assert main(["embed", str(ds), "--dim", "16"]) == 0
    sid_args = ["--levels", "2", "--codebook-size", "8", "--iters", "3"]
    assert main(["build-sid", str(ds / "embeddings.npy"), str(ds / "sid"), *sid_args]) == 0
    return {"root": root, "inter": inter, "items": items, "ds": ds}


def err_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("h2rec:")]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------- defect 1


def test_build_sid_never_replaces_the_folder_holding_its_embeddings(
    staged: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ds = staged["ds"]
    before = snapshot(ds)
    for extra in ([], ["--overwrite"]):
        args = ["build-sid", str(ds / "embeddings.npy"), str(ds), "--levels", "2",
                "--codebook-size", "8", *extra]
        assert main(args) == 2
        assert "holds the input" in err_line(capsys)
        assert snapshot(ds) == before


def test_build_sid_refuses_an_existing_sid_folder_without_overwrite(
    staged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "e.npy"
    emb.write_bytes((staged["ds"] / "embeddings.npy").read_bytes())
    out = tmp_path / "sid"
    args = ["build-sid", str(emb), str(out), "--levels", "2", "--codebook-size", "8"]
    assert main(args) == 0
    before = snapshot(out)
    assert main([*args, "--seed", "1"]) == 2
    assert "--overwrite" in err_line(capsys) and snapshot(out) == before
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert snapshot(out) != before and (out / ".h2rec-output.json").is_file()
    # another kind of h2rec folder is never replaced by SIDs, even with --overwrite
    ds_copy = tmp_path / "ds"
    assert main(["prepare", str(staged["inter"]), str(ds_copy)]) == 0
    before = snapshot(ds_copy)
    assert main(["build-sid", str(emb), str(ds_copy), "--codebook-size", "8", "--overwrite"]) == 2
    assert "not a sids folder" in err_line(capsys) and snapshot(ds_copy) == before


# --------------------------------------------------------------------------- defect 2


def test_prepare_overwrite_never_deletes_the_input_folder_or_a_users_folder(
    staged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "interactions.csv").write_bytes(staged["inter"].read_bytes())
    (data / "notes.txt").write_text("mine")
    before = snapshot(data)
    assert main(["prepare", str(data / "interactions.csv"), str(data), "--overwrite"]) == 2
    assert "holds the input" in err_line(capsys) and snapshot(data) == before
    # a folder h2rec did not write is not replaced even when it holds no input
    assert main(["prepare", str(staged["inter"]), str(data), "--overwrite"]) == 2
    assert "not written by h2rec" in err_line(capsys) and snapshot(data) == before
    # nor a regular file, and nothing hidden is left beside it
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["prepare", str(staged["inter"]), str(afile), "--overwrite"]) == 2
    assert "is not a folder" in err_line(capsys)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data"]


def test_prepare_refuses_an_existing_output_before_reading_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    # the input does not even exist: the output is refused first, without reading anything
    assert main(["prepare", str(tmp_path / "missing.csv"), str(tmp_path / "out")]) == 2
    assert "already exists" in err_line(capsys)


def test_prepare_overwrite_replaces_its_own_dataset(
    staged: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    assert main(["prepare", str(staged["inter"]), str(out)]) == 0
    (out / "stray.txt").write_text("left by a user inside an h2rec folder")
    assert main(["prepare", str(staged["inter"]), str(out), "--overwrite",
                 "--name", "second"]) == 0
    assert json.loads((out / "meta.json").read_text())["name"] == "second"
    assert not (out / "stray.txt").exists() and (out / ".h2rec-output.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary, no lock


# --------------------------------------------------------------------------- defect 3: locks


def _hold_lock(folder: Path) -> subprocess.Popen[str]:
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from h2rec.outputs import locked
        with locked(Path({str(folder)!r}), "run folder"):
            print("held", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_locked_folder_gets_a_clear_error(
    staged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "same"
    holder = _hold_lock(run)
    try:
        args = ["train", str(staged["ds"]), "--name", "same", "--output-dir",
                str(tmp_path / "runs"), *TINY]
        assert main(args) == 2
        line = err_line(capsys)
        assert "being written by another h2rec process" in line and f"pid {holder.pid}" in line
        assert not run.exists()
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    # kill -9 of the holder releases the lock: the next run proceeds
    assert main(args) == 0


def test_lock_is_reentrant_in_one_process_and_leaves_no_file(tmp_path: Path) -> None:
    from h2rec.outputs import locked

    with locked(tmp_path / "a"), locked(tmp_path / "a"):
        assert (tmp_path / ".a.lock").exists()
    assert not (tmp_path / ".a.lock").exists()


# --------------------------------------------------------------------------- swap, defect 5


def test_swap_in_replaces_a_folder_whole(tmp_path: Path) -> None:
    from h2rec.outputs import MARKER, swap_in

    old, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
        (folder / MARKER).write_text('{"kind": "run"}')
    (old / "only-old").write_text("x")
    swap_in(new, old)
    assert (old / "f").read_text() == "new" and not (old / "only-old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_overwrite_keeps_the_old_run_whole_and_resume_finishes_the_new(
    staged: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import h2rec.train.loop as train_mod  # where the loop looks up _evaluate_all

    base = ["train", str(staged["ds"]), "--name", "r", "--output-dir", str(tmp_path), *TINY]
    assert main(base) == 0
    run = tmp_path / "r"
    old = snapshot(run)
    assert {"results.md", "ndcg10_by_popularity.png", "metrics.json"} <= set(old)

    real = train_mod._evaluate_all

    def interrupt_at_test(*args: Any, **kwargs: Any) -> Any:
        if args[2] == "test":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_evaluate_all", interrupt_at_test)
    new_args = [*base, "--set", "train.epochs=2", "--overwrite"]
    assert main(new_args) == 130
    assert "interrupted" in err_line(capsys)
    assert snapshot(run) == old  # the old run, whole: no new file beside the old results
    monkeypatch.undo()
    assert main([*base, "--set", "train.epochs=2", "--resume"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_library_overwrite_removes_the_old_report(
    staged: dict[str, Path], tmp_path: Path
) -> None:
    from h2rec.config import RunConfig, apply_overrides
    from h2rec.train import train

    ds = load_dataset(staged["ds"])
    sets = [TINY[i + 1] for i in range(0, len(TINY), 2)]
    cfg = apply_overrides(RunConfig(), [*sets, "model.kind=sasrec"])
    run = tmp_path / "run"
    train(cfg, ds.store, run_dir=run)
    assert (run / "results.md").exists()

    def stop(epoch: int, record: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, ds.store, run_dir=run, overwrite=True, on_epoch_end=stop)
    assert not (run / "results.md").exists()
    assert not (run / "ndcg10_by_popularity.png").exists()


# --------------------------------------------------------------------------- defect 4


@pytest.fixture(scope="module")
def reordered(staged: dict[str, Path]) -> dict[str, Path]:
    """The same interactions in another row order (same items, other internal ids), and the
    same sequences with every item renamed (same internal ids, other items)."""
    root = staged["root"]
    frame = pl.read_csv(staged["inter"])
    shuffled = root / "shuffled.csv"
    users = frame.get_column("user_id").unique(maintain_order=True).to_list()
    order = {u: i for i, u in enumerate(reversed(users))}
    frame.sort(pl.col("user_id").replace_strict(order), maintain_order=True).write_csv(shuffled)
    renamed = root / "renamed.csv"
    frame.with_columns(pl.format("x{}", pl.col("item_id")).alias("item_id")).write_csv(renamed)
    out = {}
    for name, src in (("ds_shuffled", shuffled), ("ds_renamed", renamed)):
        assert main(["prepare", str(src), str(root / name)]) == 0
        out[name] = root / name
    a, b = load_dataset(staged["ds"]), load_dataset(out["ds_shuffled"])
    assert sorted(a.item_ids) == sorted(b.item_ids) and a.item_ids != b.item_ids
    assert a.n_items == b.n_items
    return out


def test_sids_of_another_item_order_are_refused(
    staged: dict[str, Path], reordered: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["train", str(reordered["ds_shuffled"]), "--sids", str(staged["ds"] / "sid"),
            "--name", "x", "--output-dir", str(tmp_path), "--set", "model.kind=sid", *TINY]
    assert main(args) == 2
    assert "Semantic IDs built for other item ids" in err_line(capsys)
    assert not (tmp_path / "x").exists()


def test_embeddings_of_another_item_order_are_refused(
    staged: dict[str, Path], reordered: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["train", str(reordered["ds_shuffled"]), "--embeddings",
            str(staged["ds"] / "embeddings.npy"), "--name", "x", "--output-dir", str(tmp_path),
            "--set", "model.hid_init=pca", "--set", "model.kind=sasrec", *TINY]
    assert main(args) == 2
    assert "built for other item ids" in err_line(capsys)
    # build-sid carries the fingerprint on: SIDs of these embeddings are refused as well
    sid = tmp_path / "sid"
    assert main(["build-sid", str(staged["ds"] / "embeddings.npy"), str(sid),
                 "--codebook-size", "8"]) == 0
    ds = load_dataset(staged["ds"])
    assert json.loads((sid / "meta.json").read_text())["item_ids_sha256"] == ds.item_fingerprint


def test_build_sid_of_a_dataset_refuses_embeddings_of_other_item_ids(
    staged: dict[str, Path], reordered: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Another dataset's embeddings (with their fingerprint) copied into a dataset folder."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(reordered["ds_shuffled"], ds)
    for name in ("embeddings.npy", "embeddings.npy.h2rec.json"):
        shutil.copy(staged["ds"] / name, ds / name)
    assert main(["build-sid", str(ds), str(tmp_path / "sid"), "--codebook-size", "8"]) == 2
    assert "built for other item ids" in err_line(capsys)
    assert not (tmp_path / "sid").exists()


def test_checkpoint_of_other_item_ids_is_refused(
    staged: dict[str, Path], reordered: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    renamed = load_dataset(reordered["ds_renamed"])
    original = load_dataset(staged["ds"])
    # same CSR arrays, other items: only the item fingerprint tells them apart
    assert np.array_equal(renamed.store.items, original.store.items)
    args = ["train", str(staged["ds"]), "--name", "c", "--output-dir", str(tmp_path),
            "--set", "model.kind=sasrec", *TINY]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "c"), "--data", str(reordered["ds_renamed"])]) == 2
    assert "trained on other item ids" in err_line(capsys)


def test_embed_refuses_existing_output_and_a_folder(
    staged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.npy"
    assert main(["embed", str(staged["ds"]), "--out", str(out), "--dim", "8"]) == 0
    before = out.read_bytes()
    assert main(["embed", str(staged["ds"]), "--out", str(out), "--dim", "4"]) == 2
    assert "--overwrite" in err_line(capsys) and out.read_bytes() == before
    assert main(["embed", str(staged["ds"]), "--out", str(out), "--dim", "4", "--overwrite"]) == 0
    assert out.read_bytes() != before
    assert main(["embed", str(staged["ds"]), "--out", str(tmp_path)]) == 2
    assert "is a folder" in err_line(capsys)
    assert os.path.exists(str(out) + ".h2rec.json")


def test_file_outputs_never_replace_what_the_command_reads(
    staged: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(staged["ds"], ds)
    before = snapshot(ds)
    assert main(["embed", str(ds), "--out", str(ds / "items.npy"), "--overwrite"]) == 2
    assert "is an input" in err_line(capsys) and snapshot(ds) == before
    run = ["train", str(ds), "--name", "r", "--output-dir", str(tmp_path),
           "--set", "model.kind=sasrec", *TINY]
    assert main(run) == 0
    capsys.readouterr()
    before = snapshot(ds)
    for args in (["recommend", str(tmp_path / "r"), "--out", str(ds / "users.parquet")],
                 ["evaluate", str(tmp_path / "r"), "--out", str(ds / "stats.json")]):
        assert main([*args, "--overwrite"]) == 2
        assert "is an input" in err_line(capsys) and snapshot(ds) == before
