"""semantic_ids: collision policies, the report against numpy oracles, save/load round trips."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from h2rec.errors import DataError
from h2rec.semantic_ids import (
    SemanticIds,
    apply_collision_policy,
    build_sid,
    build_sid_dir,
    dedup_level,
    load_sids,
    save_sids,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def dedup_oracle(codes: np.ndarray) -> list[int]:
    seen: dict[tuple[int, ...], int] = defaultdict(int)
    out = []
    for row in codes.tolist():
        out.append(seen[tuple(row)])
        seen[tuple(row)] += 1
    return out


def test_dedup_hand_worked() -> None:
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]], dtype=np.int64)
    assert dedup_level(codes).tolist() == [0, 0, 1, 0, 2, 1]
    both = apply_collision_policy(codes, "dedup")
    assert both.shape == (6, 3) and len({tuple(r) for r in both.tolist()}) == 6
    assert apply_collision_policy(codes, "none") is codes
    with pytest.raises(DataError, match="collision='tiger'"):
        apply_collision_policy(codes, "tiger")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=40))
def test_dedup_matches_oracle(rows: list[tuple[int, int]]) -> None:
    codes = np.array(rows, dtype=np.int64)
    assert dedup_level(codes).tolist() == dedup_oracle(codes)


def clustered(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d)) * 3
    x = centres[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, d))
    x[:5] = x[5]  # five exact duplicates of item 6: one collision group of at least 6
    return x.astype(np.float32)


def test_build_sid_report_matches_numpy_oracle() -> None:
    x = clustered()
    sids = build_sid(x, n_levels=2, codebook_size=8, n_iter=10, seed=1)
    codes, books = sids.codes, sids.codebooks
    assert codes.shape == (400, 2) and codes.dtype == np.int64
    assert books.shape == (2, 8, 8) and books.dtype == np.float32
    assert codes.min() >= 0 and codes.max() < 8
    r = sids.report
    residual = x.astype(np.float64)
    total = float(np.mean(np.sum(residual**2, axis=1)))
    for level in range(2):
        residual = residual - books[level][codes[:, level]]
        err = float(np.mean(np.sum(residual**2, axis=1)))
        lv = r["levels"][level]
        assert lv["reconstruction_error"] == pytest.approx(err, rel=1e-4)
        assert lv["relative_error"] == pytest.approx(err / total, rel=1e-4)
        counts = np.bincount(codes[:, level], minlength=8)
        p = counts[counts > 0] / 400
        assert lv["codes_used"] == int((counts > 0).sum())
        assert lv["usage_share"] == pytest.approx((counts > 0).mean())
        assert lv["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-9)
        assert lv["entropy_share"] == pytest.approx(lv["entropy_bits"] / 3.0)
    assert r["levels"][1]["reconstruction_error"] <= r["levels"][0]["reconstruction_error"]
    groups = Counter(map(tuple, codes.tolist()))
    assert r["unique_tuples"] == len(groups)
    assert r["largest_collision_group"] == max(groups.values()) >= 6
    shared = sum(c for c in groups.values() if c > 1)
    assert r["collision_share"] == pytest.approx(shared / 400)
    assert r["collision"] == "none" and sids.collision == "none"
    assert sids.level_sizes == [8, 8] and sids.n_levels == 2 and sids.n_items == 400


def test_build_sid_dedup_and_determinism() -> None:
    x = clustered(seed=3)
    a = build_sid(x, n_levels=2, codebook_size=4, n_iter=5, seed=7, collision="dedup")
    b = build_sid(x, n_levels=2, codebook_size=4, n_iter=5, seed=7, collision="dedup")
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codebooks, b.codebooks)
    assert a.codes.shape == (400, 3)
    assert len({tuple(r) for r in a.codes.tolist()}) == 400
    assert a.codes[:, 2].tolist() == dedup_oracle(a.codes[:, :2])
    assert a.level_sizes == [4, 4, a.report["largest_collision_group"]]
    assert a.report["dedup_level_size"] == a.report["largest_collision_group"]
    assert a.report["unique_tuples_after_dedup"] == 400


def test_build_sid_bad_inputs() -> None:
    x = clustered(n=20)
    with pytest.raises(DataError, match="codebook_size=32 is larger than the number of items 20"):
        build_sid(x, codebook_size=32)
    with pytest.raises(DataError, match="collision='x'"):
        build_sid(x, codebook_size=4, collision="x")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="n_levels=0"):
        build_sid(x, n_levels=0, codebook_size=4)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN or inf .*row 3"):
        build_sid(bad, codebook_size=4)


def test_save_load_round_trip_and_markdown(tmp_path: Path) -> None:
    sids = build_sid(clustered(), n_levels=3, codebook_size=8, n_iter=5, seed=2, collision="dedup")
    path = save_sids(sids, tmp_path / "sid")
    back = load_sids(path, n_items=400)
    assert np.array_equal(back.codes, sids.codes)
    assert np.array_equal(back.codebooks, sids.codebooks)
    assert (back.codebook_size, back.collision) == (8, "dedup")
    assert back.report == json.loads(json.dumps(sids.report))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["n_items"] == 400 and meta["n_levels"] == 3 and meta["code_levels"] == 4
    assert meta["seed"] == 2 and meta["collision"] == "dedup" and meta["level_sizes"][:3] == [8] * 3
    md = (path / "sid_report.md").read_text()
    assert "| level | recon. error" in md
    assert sum(line.startswith("|") for line in md.splitlines()) == 5  # header, rule, 3 levels
    assert f"largest collision group: {sids.report['largest_collision_group']}" in md
    # overwrite in place leaves no temporary directory behind
    save_sids(sids, tmp_path / "sid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid"]


def test_load_sids_rejects_broken(tmp_path: Path) -> None:
    sids = build_sid(clustered(), n_levels=2, codebook_size=8, n_iter=3)
    path = save_sids(sids, tmp_path / "sid")
    with pytest.raises(DataError, match="400 rows, but the dataset has 401 items"):
        load_sids(path, n_items=401)
    codes = sids.codes.copy()
    codes[0, 1] = 8
    np.save(path / "codes.npy", codes)
    with pytest.raises(DataError, match=r"codes outside 0\.\.7"):
        load_sids(path)
    np.save(path / "codes.npy", sids.codes[:, :1])
    with pytest.raises(DataError, match="codes have 1 levels, codebooks 2"):
        load_sids(path)
    (path / "codebooks.npy").unlink()
    with pytest.raises(DataError, match="codebooks.npy: missing"):
        load_sids(path)
    with pytest.raises(DataError, match="not a SID directory"):
        load_sids(tmp_path / "none")


def test_build_sid_dir_from_file(tmp_path: Path) -> None:
    np.save(tmp_path / "e.npy", clustered())
    sids = build_sid_dir(tmp_path / "e.npy", tmp_path / "sid", n_levels=2, codebook_size=4,
                         n_iter=3)
    assert isinstance(sids, SemanticIds)
    assert np.array_equal(load_sids(tmp_path / "sid").codes, sids.codes)
    z = clustered()
    z[10] = 0
    np.save(tmp_path / "z.npy", z)
    with pytest.raises(DataError, match="all-zero rows"):
        build_sid_dir(tmp_path / "z.npy", tmp_path / "sid2", codebook_size=4)
    assert not (tmp_path / "sid2").exists()
