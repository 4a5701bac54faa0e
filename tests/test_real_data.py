"""The real public datasets in ../shared/data (research licences; read here, never copied).

Each test checks the statistics written in that dataset's SOURCE.md, and the joins that give the
item text. Skipped when the data directory is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from h2rec.data import ItemTableOptions, ReadOptions, load_dataset, prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


def need(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def stats_of(path: Path) -> dict:
    return json.loads((path / "stats.json").read_text())


def check_lengths(s: dict, users: int, items: int, inter: int, avg: float, lo: int, med: int,
                  hi: int) -> None:
    assert (s["users"], s["items"], s["interactions"]) == (users, items, inter)
    assert round(s["length"]["mean"], 2) == pytest.approx(avg, abs=0.006)
    assert (s["length"]["min"], s["length"]["median"], s["length"]["max"]) == (lo, med, hi)


def same_as_s3rec_file(out: Path, s3rec: Path) -> bool:
    offsets = np.load(out / "offsets.npy")
    items = np.load(out / "items.npy")
    with s3rec.open() as fh:
        lines = [ln.split() for ln in fh if ln.strip()]
    if len(lines) != offsets.size - 1:
        return False
    return all(
        [int(t) for t in line[1:]] == items[offsets[u] : offsets[u + 1]].tolist()
        for u, line in enumerate(lines)
    )


def test_beauty_titles(tmp_path: Path) -> None:
    src = need("beauty")
    out = prepare(src / "user_sequence.txt", tmp_path / "beauty",
                  items=src / "products_lookup.csv")
    s = stats_of(out)
    # SOURCE.md: 22,363 users, 12,101 items, 198,502 interactions; avg 8.88, min 5, median 6,
    # max 204; a title for 12,094 items (99.94%), 10.9 words on average
    check_lengths(s, 22_363, 12_101, 198_502, 8.88, 5, 6, 204)
    assert s["text"]["items_with_text"] == 12_094
    assert round(s["text"]["share"] * 100, 2) == 99.94
    assert round(s["text"]["words_mean"], 1) == 10.9
    ds = load_dataset(out)
    empty = {ds.item_ids[r] for r, t in enumerate(ds.item_text) if not t}
    assert empty == {"B001DJ2USM", "B00ALHISAQ", "B001MP0T2Q", "B001S3I57S", "B00B4C35IW",
                     "B000GZES7A", "B001RD37ZO"}
    # ids by first appearance reproduce S3Rec's Beauty.txt line for line
    assert same_as_s3rec_file(out, src / "Beauty.txt")
    # the title join, checked independently: asin -> int -> name
    asin_to_int = json.loads((src / "item_id_to_int.json").read_text())
    lookup = pl.read_csv(src / "products_lookup.csv", schema_overrides={"name": pl.String})
    names = dict(zip(lookup["global_product_id"].to_list(), lookup["name"].to_list(), strict=True))
    for r in range(0, ds.n_items, 997):
        assert ds.item_text[r] == (names.get(asin_to_int[ds.item_ids[r]]) or "").strip()


def test_yelp_names_and_categories(tmp_path: Path) -> None:
    src = need("yelp")
    out = prepare(src / "Yelp.txt", tmp_path / "yelp", items=src / "Yelp.item.json",
                  item_table=ItemTableOptions(id_offset=1,
                                              template="{title}. Categories: {description}"))
    s = stats_of(out)
    # SOURCE.md: 30,431 users, 20,033 items, 316,354 interactions; avg 10.40, min 5, median 7,
    # max 350; name and categories for all 20,033 items, 4.84 categories per item
    check_lengths(s, 30_431, 20_033, 316_354, 10.40, 5, 7, 350)
    assert s["text"]["items_with_text"] == 20_033
    table = pl.read_parquet(out / "items.parquet")
    n_cats = table.get_column("description").str.split(", ").list.len().mean()
    assert round(float(n_cats), 2) == 4.84  # type: ignore[arg-type]
    raw = json.loads((src / "Yelp.item.json").read_text())
    assert same_as_s3rec_file(out, src / "Yelp.txt")  # internal id k is S3Rec id k
    for k in (1, 2, 500, 20_033):
        rec = raw[str(k - 1)]  # LETTER key k - 1 is S3Rec item k
        assert table.row(k - 1, named=True)["text"] == (
            f"{rec['title']}. Categories: {rec['description']}")


def test_ml1m_titles_and_genres(tmp_path: Path) -> None:
    src = need("ml-1m")
    out = prepare(src / "ml-1m.txt", tmp_path / "ml1m", items=src / "movies.dat",
                  item_table=ItemTableOptions(id_map=str(src / "sas_to_original_items.txt"),
                                              template="{title}. Genres: {genres}"))
    s = stats_of(out)
    # SOURCE.md: 6,040 users, 3,416 items, 999,611 interactions; avg 165.5, min 18, median 96,
    # max 2,277; title, year and genres for 3,416 of 3,416 items
    check_lengths(s, 6_040, 3_416, 999_611, 165.50, 18, 96, 2_277)
    assert s["text"]["items_with_text"] == 3_416
    raw = np.loadtxt(src / "ml-1m.txt", dtype=np.int64)
    assert np.array_equal(np.load(out / "items.npy"), raw[:, 1])  # SASRec ids kept
    sas_to_orig = dict(line.split() for line in (src / "sas_to_original_items.txt").read_text()
                       .splitlines() if line.strip())
    movies = {}
    for line in (src / "movies.dat").read_bytes().decode("latin-1").splitlines():
        mid, title, genres = line.split("::")
        movies[mid] = f"{title}. Genres: {genres.replace('|', ', ')}"
    ds = load_dataset(out)
    assert ds.item_text == [movies[sas_to_orig[i]] for i in ds.item_ids]


def test_ml100k_timestamps_and_ties(tmp_path: Path) -> None:
    src = need("ml-100k")
    out = prepare(src / "ml-100k.inter", tmp_path / "ml100k", items=src / "ml-100k.item")
    s = stats_of(out)
    # SOURCE.md: 943 users, 1,682 items, 100,000 interactions, avg 106.0, min 20, all titled;
    # 50,561 interactions share a timestamp with another of the same user
    assert (s["users"], s["items"], s["interactions"]) == (943, 1_682, 100_000)
    assert round(s["length"]["mean"], 1) == 106.0 and s["length"]["min"] == 20
    assert s["text"]["items_with_text"] == 1_682
    assert s["timestamp_ties"] == 50_561
    # oracle: each user's rows sorted by time in plain Python (sorted() is stable)
    rows = [ln.split("\t") for ln in (src / "ml-100k.inter").read_text().splitlines()[1:]]
    per_user: dict[str, list[tuple[float, str]]] = {}
    for u, i, _, t in rows:
        per_user.setdefault(u, []).append((float(t), i))
    ds = load_dataset(out)
    for row in range(0, ds.n_users, 37):
        expected = [i for _, i in sorted(per_user[ds.user_ids[row]], key=lambda p: p[0])]
        assert [ds.item_ids[k - 1] for k in ds.store.sequence(row).tolist()] == expected


def test_sports_and_toys_without_text(tmp_path: Path) -> None:
    sports = need("sports")
    out = prepare(sports / "user_sequence.txt", tmp_path / "sports")
    # SOURCE.md: 35,598 users, 18,357 items, 296,337 interactions; avg 8.32, min 5, median 6,
    # max 296; first-appearance ids reproduce Sports_and_Outdoors.txt
    check_lengths(stats_of(out), 35_598, 18_357, 296_337, 8.32, 5, 6, 296)
    assert stats_of(out)["text"]["items_with_text"] == 0
    assert same_as_s3rec_file(out, sports / "Sports_and_Outdoors.txt")
    toys = need("toys")
    out = prepare(toys / "Toys_and_Games.txt", tmp_path / "toys",
                  read=ReadOptions(format="sequences"))
    # SOURCE.md: 19,412 users, 11,924 items, 167,597 interactions; avg 8.63, min 5, median 6,
    # max 550
    check_lengths(stats_of(out), 19_412, 11_924, 167_597, 8.63, 5, 6, 550)
