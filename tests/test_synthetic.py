"""The built-in generated dataset, and the prepare/embed/build-sid subcommands run on it."""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from h2rec.cli_data import register
from h2rec.data import load_dataset
from h2rec.errors import DataError, H2RecError
from h2rec.semantic_ids import load_sids
from h2rec.synthetic import (
    BUILTIN_TEMPLATE,
    HIERARCHY,
    SyntheticConfig,
    builtin_dataset,
    generate,
    generate_frames,
)


@pytest.fixture(scope="module")
def frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate_frames(SyntheticConfig())


def test_deterministic_for_a_seed() -> None:
    small = SyntheticConfig(n_users=150, n_items=300, seed=4)
    a_log, a_items = generate_frames(small)
    b_log, b_items = generate_frames(small)
    assert a_log.equals(b_log) and a_items.equals(b_items)
    c_log, _ = generate_frames(SyntheticConfig(n_users=150, n_items=300, seed=5))
    assert not a_log.equals(c_log)


def test_shape_and_invariants(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    log, items = frames
    cfg = SyntheticConfig()
    assert items.height == cfg.n_items and items.get_column("item_id").n_unique() == cfg.n_items
    assert log.get_column("user_id").n_unique() == cfg.n_users
    assert 20_000 <= log.height <= 40_000  # "a few tens of thousands"
    assert set(log.get_column("item_id").to_list()) <= set(items.get_column("item_id").to_list())
    lengths = log.group_by("user_id").len().get_column("len")
    assert lengths.min() >= cfg.min_length and lengths.max() <= cfg.max_length  # type: ignore[operator]
    assert abs(float(lengths.mean()) - cfg.mean_length) < 1.5  # type: ignore[arg-type]
    # no user repeats an item; the log is in global time order
    assert log.select("user_id", "item_id").unique().height == log.height
    ts = log.get_column("timestamp").to_numpy()
    assert np.all(np.diff(ts) >= 0)


def test_long_tail_popularity(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    log, items = frames
    pop = np.sort(log.get_column("item_id").value_counts().get_column("count").to_numpy())[::-1]
    head = pop[: len(items) // 5].sum() / pop.sum()
    assert head > 0.4  # the top 20% of items take a large share
    assert np.median(pop) < 0.75 * pop.mean()  # skewed: median below mean
    seen = len(pop)
    assert (pop < 10).sum() + (items.height - seen) > 0.2 * items.height  # a real tail


def test_text_comes_from_the_hierarchy(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    _, items = frames
    leaves = {f"{d} > {c}": types for d, cats in HIERARCHY.items() for c, types in cats.items()}
    for title, category, brand in items.select("title", "category", "brand").rows():
        assert category in leaves
        assert title.startswith(brand + " ")
        assert any(title.endswith(" " + t) for t in leaves[category])


def test_next_items_follow_semantics_also_for_tail_items(
    frames: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    log, items = frames
    category = dict(items.select("item_id", "category").rows())
    seqs = log.sort("user_id", "timestamp", maintain_order=True).group_by(
        "user_id", maintain_order=True).agg(pl.col("item_id")).get_column("item_id").to_list()
    pop = Counter(log.get_column("item_id").to_list())
    tail = {i for i, c in pop.items() if c < np.percentile(list(pop.values()), 50)}
    pairs = [(a, b) for s in seqs for a, b in itertools.pairwise(s)]
    tail_pairs = [(a, b) for a, b in pairs if a in tail]
    same = np.mean([category[a] == category[b] for a, b in tail_pairs])
    rng = np.random.default_rng(0)
    shuffled = rng.permutation([b for _, b in tail_pairs])
    baseline = np.mean([category[a] == category[b] for (a, _), b in zip(tail_pairs, shuffled)])
    assert len(tail_pairs) > 1000
    assert same > 0.35 and baseline < 0.15 and same > 3 * baseline


def test_a_tail_items_brand_says_who_buys_it(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    # users are brand-loyal: a buyer of a rare item bought that item's brand far more often
    # among their other items of the same category than the 1 in 3 of a brand-blind shopper
    log, items = frames
    category = dict(items.select("item_id", "category").rows())
    brand = dict(items.select("item_id", "brand").rows())
    pop = Counter(log.get_column("item_id").to_list())
    tail = {i for i, c in pop.items() if c < np.percentile(list(pop.values()), 50)}
    seqs = log.group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    same = total = 0
    for seq in seqs.get_column("item_id").to_list():
        for a in seq:
            if a not in tail:
                continue
            for b in seq:
                if b != a and category[b] == category[a]:
                    total += 1
                    same += brand[b] == brand[a]
    assert total > 1000
    assert same / total > 0.45  # brand-blind: about 1/3 (measured 0.50 at p_brand=0.6)


def test_brand_loyalty_can_be_switched_off() -> None:
    log, items = generate_frames(SyntheticConfig(n_users=300, p_brand=0.0))
    brand = dict(items.select("item_id", "brand").rows())
    category = dict(items.select("item_id", "category").rows())
    same = total = 0
    for seq in log.group_by("user_id").agg(pl.col("item_id")).get_column("item_id").to_list():
        for a, b in itertools.combinations(seq, 2):
            if category[a] == category[b]:
                total += 1
                same += brand[a] == brand[b]
    assert total > 300 and 0.25 < same / total < 0.45


def test_builtin_dataset_prepared_and_reused(tmp_path: Path) -> None:
    cfg = SyntheticConfig(n_users=120, n_items=200, seed=1)
    path = builtin_dataset(tmp_path, cfg)
    ds = load_dataset(path)
    assert ds.n_users == 120 and ds.name == "builtin"
    assert ds.stats["text"]["share"] == 1.0
    assert ds.n_items == ds.stats["items"] <= 200
    first = ds.item_text[0]
    assert ". Category: " in first and ". Brand: " in first
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert builtin_dataset(tmp_path, cfg) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    builtin_dataset(tmp_path, SyntheticConfig(n_users=100, n_items=200, seed=1))
    assert load_dataset(path).n_users == 100


def test_bad_configs() -> None:
    with pytest.raises(DataError, match="n_items=5: need at least 10"):
        generate_frames(SyntheticConfig(n_items=5))
    with pytest.raises(DataError, match="min_length=2"):
        generate_frames(SyntheticConfig(min_length=2))
    with pytest.raises(DataError, match="mean_length=5"):
        generate_frames(SyntheticConfig(mean_length=5, min_length=5))


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2rec")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_prepare_embed_build_sid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter, items = generate(tmp_path / "src", SyntheticConfig(n_users=150, n_items=200, seed=2))
    parser = _cli()
    ds = tmp_path / "ds"
    args = parser.parse_args(["prepare", str(inter), str(ds), "--items", str(items),
                              "--template", BUILTIN_TEMPLATE, "--filter", "kcore",
                              "--min-user", "3", "--min-item", "2"])
    assert args.func(args) == 0
    assert "150 users" in capsys.readouterr().out
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["filter"]["kind"] == "kcore" and meta["item_table"]["template"] == BUILTIN_TEMPLATE
    args = parser.parse_args(["embed", str(ds), "--dim", "16"])
    assert args.func(args) == 0
    x = np.load(ds / "embeddings.npy")
    assert x.shape == (load_dataset(ds).n_items, 16)
    args = parser.parse_args(["build-sid", str(ds), str(tmp_path / "sid"), "--levels", "2",
                              "--codebook-size", "8", "--iters", "5", "--collision", "dedup"])
    assert args.func(args) == 0
    assert "distinct tuples" in capsys.readouterr().out
    assert load_sids(tmp_path / "sid", n_items=x.shape[0]).codes.shape == (x.shape[0], 3)
    # bad input reaches the caller as an H2RecError (the CLI main prints it, exits 2)
    args = parser.parse_args(["prepare", str(tmp_path / "missing.csv"), str(tmp_path / "ds2")])
    with pytest.raises(H2RecError, match="missing.csv: file not found"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["build-sid", "e.npy", "out", "--levels", "0"])


def test_small_catalogue_covers_some_leaves() -> None:
    log, items = generate_frames(SyntheticConfig(n_users=50, n_items=20, seed=3))
    assert items.height == 20 and log.get_column("user_id").n_unique() == 50
    assert log.select("user_id", "item_id").unique().height == log.height
