"""prepare / load_dataset: every input format on small hand-made files, against a slow oracle."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from h2rec.data import (
    FilterOptions,
    ItemTableOptions,
    ReadOptions,
    apply_filter,
    load_dataset,
    prepare,
    read_interactions,
    read_item_table,
)
from h2rec.errors import DataError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# a slow, obviously-correct oracle of the ordering and numbering rules
# ---------------------------------------------------------------------------------------------


def oracle(
    rows: list[tuple[str, str, float | None]],
) -> tuple[list[str], list[str], list[list[int]]]:
    """rows in file order -> (user ids in row order, item ids by internal id, sequences)."""
    user_order: list[str] = []
    per_user: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    for line, (u, i, t) in enumerate(rows):
        if u not in per_user:
            user_order.append(u)
        per_user[u].append((0.0 if t is None else t, line, i))
    item_ids: dict[str, int] = {}
    seqs = []
    for u in user_order:
        seq = []
        for _, _, i in sorted(per_user[u]):  # by time, then file line: ties keep file order
            if i not in item_ids:
                item_ids[i] = len(item_ids) + 1
            seq.append(item_ids[i])
        seqs.append(seq)
    return user_order, list(item_ids), seqs


def sequences_of(path: Path) -> list[list[int]]:
    offsets = np.load(path / "offsets.npy")
    items = np.load(path / "items.npy")
    return [items[offsets[u] : offsets[u + 1]].tolist() for u in range(offsets.size - 1)]


def write(path: Path, text: str, encoding: str = "utf8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


ROWS = [  # user, item, time; u1 has a tie at t=5 (b before a in the file)
    ("u1", "b", 5.0),
    ("u2", "c", 1.0),
    ("u1", "a", 5.0),
    ("u1", "c", 2.0),
    ("u2", "a", 3.0),
    ("u2", "d", 2.0),
    ("u3", "d", 9.0),
    ("u3", "b", 8.0),
    ("u3", "a", 7.0),
]


def check_against_oracle(out: Path, rows: list[tuple[str, str, float | None]]) -> None:
    users, items, seqs = oracle(rows)
    assert sequences_of(out) == seqs
    assert pl.read_parquet(out / "users.parquet").get_column("original_id").to_list() == users
    assert pl.read_parquet(out / "items.parquet").get_column("original_id").to_list() == items


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------


def test_csv_with_timestamps_sorts_stably(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{int(t)}\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds")
    check_against_oracle(out, ROWS)
    # u1: c(2) then the tie at 5 in file order: b, a
    assert sequences_of(out)[0] == [1, 2, 3]
    assert pl.read_parquet(out / "items.parquet").get_column("original_id").to_list()[:3] == [
        "c", "b", "a"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["timestamp_ties"] == 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "h2rec-dataset" and meta["version"] == 1 and meta["has_timestamp"]


def test_tsv_custom_columns_and_float_times(tmp_path: Path) -> None:
    f = write(tmp_path / "log.tsv", "who\twhat\twhen\textra\n" + "".join(
        f"{u}\t{i}\t{t}\tx\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds",
                  read=ReadOptions(user_col="who", item_col="what", time_col="when"))
    check_against_oracle(out, ROWS)


def test_csv_datetime_strings(tmp_path: Path) -> None:
    rows = [("a", "x", "2021-03-01 10:00:00"), ("a", "y", "2021-01-01 10:00:00"),
            ("a", "z", "2021-02-01 10:00:00")]
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in rows))
    out = prepare(f, tmp_path / "ds")
    ids = pl.read_parquet(out / "items.parquet").get_column("original_id").to_list()
    assert [ids[i - 1] for i in sequences_of(out)[0]] == ["y", "z", "x"]


def test_csv_without_timestamps_keeps_file_order(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i, _ in ROWS))
    out = prepare(f, tmp_path / "ds")
    check_against_oracle(out, [(u, i, None) for u, i, _ in ROWS])
    assert not json.loads((out / "meta.json").read_text())["has_timestamp"]


def test_time_col_none_ignores_timestamp(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{int(t)}\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds", read=ReadOptions(time_col=None))
    check_against_oracle(out, [(u, i, None) for u, i, _ in ROWS])


def test_ids_keep_leading_zeros(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id\n007,01\n007,1\n007,001\n")
    out = prepare(f, tmp_path / "ds")
    assert pl.read_parquet(out / "items.parquet").get_column("original_id").to_list() == [
        "01", "1", "001"]
    assert pl.read_parquet(out / "users.parquet").get_column("original_id").to_list() == ["007"]


def test_parquet(tmp_path: Path) -> None:
    f = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": [r[0] for r in ROWS], "item_id": [r[1] for r in ROWS],
                  "timestamp": [int(r[2]) for r in ROWS]}).write_parquet(f)
    out = prepare(f, tmp_path / "ds")
    check_against_oracle(out, ROWS)


def test_parquet_integer_ids(tmp_path: Path) -> None:
    f = tmp_path / "log.parquet"
    frame = pl.DataFrame({"user_id": [5, 5, 5, 9, 9, 9], "item_id": [30, 10, 20, 10, 40, 30]})
    frame.write_parquet(f)
    out = prepare(f, tmp_path / "ds")
    assert sequences_of(out) == [[1, 2, 3], [2, 4, 1]]
    assert pl.read_parquet(out / "items.parquet").get_column("original_id").to_list() == [
        "30", "10", "20", "40"]


def test_sequences_format(tmp_path: Path) -> None:
    f = write(tmp_path / "seq.txt", "1 5 3 9\n\n2 3 3 7\r\n3   9\t5 8\n")
    out = prepare(f, tmp_path / "ds", read=ReadOptions(format="sequences"))
    rows = [("1", "5", None), ("1", "3", None), ("1", "9", None), ("2", "3", None),
            ("2", "3", None), ("2", "7", None), ("3", "9", None), ("3", "5", None),
            ("3", "8", None)]
    check_against_oracle(out, rows)
    assert sequences_of(out) == [[1, 2, 3], [2, 2, 4], [3, 1, 5]]


def test_auto_detects_sequences_and_pairs(tmp_path: Path) -> None:
    seq = write(tmp_path / "a.txt", "1 5 3 9\n2 3 3 7\n")
    pairs = write(tmp_path / "b.txt", "1 5\n1 3\n1 9\n2 3\n2 4\n2 7\n")
    assert read_interactions(seq).format == "sequences"
    assert read_interactions(pairs).format == "pairs"


def test_pairs_format_like_ml1m(tmp_path: Path) -> None:
    f = write(tmp_path / "ml.txt", "1 1\n1 2\n1 3\n2 2\n2 4\n2 1\n")
    out = prepare(f, tmp_path / "ds", read=ReadOptions(format="pairs"))
    assert sequences_of(out) == [[1, 2, 3], [2, 4, 1]]


def test_pairs_with_timestamps(tmp_path: Path) -> None:
    f = write(tmp_path / "p.txt", "".join(f"{u} {i} {int(t)}\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds", read=ReadOptions(format="pairs"))
    check_against_oracle(out, ROWS)


def test_recbole_inter(tmp_path: Path) -> None:
    f = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
              + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds")
    check_against_oracle(out, ROWS)


def test_movielens_dat(tmp_path: Path) -> None:
    f = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::5::{int(t)}\n" for u, i, t in ROWS))
    out = prepare(f, tmp_path / "ds")
    check_against_oracle(out, ROWS)


# ---------------------------------------------------------------------------------------------
# item tables and text
# ---------------------------------------------------------------------------------------------

SEQ = "u1 a b c\nu2 b c d\n"


def test_item_csv_template_and_missing_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inter = write(tmp_path / "s.txt", SEQ)
    items = write(tmp_path / "items.csv",
                  'item_id,title,genre,price\na,Alpha,"x, y",1.5\nb,Beta,,2\nc,,,3\nz,Zed,q,1\n')
    with caplog.at_level(logging.WARNING):
        out = prepare(inter, tmp_path / "ds", items=items,
                      item_table=ItemTableOptions(template="{title} ({genre})"))
    table = pl.read_parquet(out / "items.parquet")
    assert table.get_column("text").to_list() == ["Alpha (x, y)", "Beta ()", "", ""]
    assert table.columns[:3] == ["item", "original_id", "text"]
    assert {"title", "genre"} <= set(table.columns) and "price" not in table.columns
    stats = json.loads((out / "stats.json").read_text())
    assert stats["text"]["items_with_text"] == 2 and stats["text"]["share"] == 0.5
    assert "1 of 4 items have no row" in caplog.text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["items_without_table_row"] == 1 and meta["item_table_rows_unused"] == 1


def test_item_default_join_of_text_columns(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", SEQ)
    items = write(tmp_path / "items.tsv", "item_id\ttitle\tcat\na\tAlpha\tX\nb\t\tY\nc\tGamma\t\n"
                  "d\t\t\n")
    out = prepare(inter, tmp_path / "ds", items=items)
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "Alpha; X", "Y", "Gamma", ""]


def test_item_json_with_offset_like_yelp(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", "1 1 2 3\n2 2 3 1\n")
    items = write(tmp_path / "y.item.json", json.dumps({
        "0": {"title": "Zero", "description": "A, B"},
        "1": {"title": "One", "description": "C"},
        "2": {"title": "Two", "description": ["D", "E"]}}))
    out = prepare(inter, tmp_path / "ds", items=items, item_table=ItemTableOptions(
        id_offset=1, template="{title}. {description}"))
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "Zero. A, B", "One. C", "Two. D, E"]


def test_item_json_of_attribute_ids_like_s3rec(tmp_path: Path) -> None:
    # S3Rec's item2attributes.json: {"<id>": [attribute ids]}; each id becomes the word attr<id>,
    # so items that share attributes share words (what TF-IDF reads); an item absent from the
    # file has no text
    inter = write(tmp_path / "s.txt", "1 1 2 3\n2 2 3 1\n")
    items = write(tmp_path / "Toys_item2attributes.json",
                  json.dumps({"1": [1, 2, 3], "2": [2, 17], "4": ["b7"]}))
    out = prepare(inter, tmp_path / "ds", items=items)
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "attr1 attr2 attr3", "attr2 attr17", ""]
    for bad, shown in [([1, [2]], "[2]"), ([1, True], "True"), (["a b"], "'a b'"),
                       ([1.5], "1.5"), ([""], "''")]:
        path = write(tmp_path / "bad.json", json.dumps({"1": [3], "2": bad}))
        with pytest.raises(DataError, match=rf"bad\.json: item '2': attribute {re.escape(shown)} "
                                            r"is not an attribute id"):
            read_item_table(path)
    path = write(tmp_path / "bad2.json", json.dumps({"1": "a title"}))
    with pytest.raises(DataError, match=r"bad2\.json: item '1': expected an object or a list"):
        read_item_table(path)


def test_item_movies_dat_latin1_with_id_map(tmp_path: Path) -> None:
    inter = write(tmp_path / "ml.txt", "1 1\n1 2\n1 3\n2 3\n2 1\n2 2\n")
    movies = write(tmp_path / "movies.dat", "10::Caf\xe9 Story (1995)::Comedy|Drama\n"
                   "20::Heat (1995)::Action\n30::Up (2009)::Animation\n", encoding="latin-1")
    id_map = write(tmp_path / "map.txt", "1 20\n2 10\n3 30\n")
    out = prepare(inter, tmp_path / "ds", items=movies, item_table=ItemTableOptions(
        id_map=str(id_map), template="{title}: {genres}"))
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "Heat (1995): Action", "Café Story (1995): Comedy, Drama", "Up (2009): Animation"]


def test_item_recbole(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", "u 1 2 3\n")
    items = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq\n"
                  "1\tToy Story\tAnimation Comedy\n2\tHeat\tAction\n3\tUp\tAnimation\n")
    out = prepare(inter, tmp_path / "ds", items=items)
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "Toy Story; Animation Comedy", "Heat; Action", "Up; Animation"]


def test_item_beauty_layout(tmp_path: Path) -> None:
    inter = write(tmp_path / "user_sequence.txt", "R1 B0A B0B B0C\nR2 B0C B0D B0A\n")
    write(tmp_path / "item_id_to_int.json", json.dumps({"B0A": 7, "B0B": 3, "B0C": 0, "B0D": 9}))
    lookup = write(tmp_path / "products_lookup.csv",
                   ',global_product_id,name\n0,3,"Bee, balm"\n1,7,Aye\n2,0,Sea\n3,9,\n')
    out = prepare(inter, tmp_path / "ds", items=lookup)
    table = pl.read_parquet(out / "items.parquet")
    assert table.get_column("original_id").to_list() == ["B0A", "B0B", "B0C", "B0D"]
    assert table.get_column("text").to_list() == ["Aye", "Bee, balm", "Sea", ""]


def test_template_unknown_field(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", SEQ)
    items = write(tmp_path / "items.csv", "item_id,title\na,A\n")
    with pytest.raises(DataError, match=r"template field \{name\} is not a column"):
        prepare(inter, tmp_path / "ds", items=items,
                item_table=ItemTableOptions(template="{name}"))


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------


def _frame(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"user": [p[0] for p in pairs], "item": [p[1] for p in pairs],
                         "line": list(range(1, len(pairs) + 1))})


def kcore_oracle(pairs: list[tuple[str, str]], k_user: int, k_item: int) -> list[tuple[str, str]]:
    while True:
        ic = Counter(i for _, i in pairs)
        kept = [(u, i) for u, i in pairs if ic[i] >= k_item]
        uc = Counter(u for u, _ in kept)
        kept = [(u, i) for u, i in kept if uc[u] >= k_user]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


def test_kcore_iterates_but_min_count_does_not() -> None:
    # items z and w are seen once; removing them leaves users B and D with one interaction
    pairs = [("A", "x"), ("A", "y"), ("B", "x"), ("B", "z"), ("C", "x"), ("C", "y"), ("D", "y"),
             ("D", "w")]
    k, passes = apply_filter(_frame(pairs), FilterOptions("kcore", min_user=2, min_item=2))
    got = list(zip(k["user"].to_list(), k["item"].to_list()))
    assert got == kcore_oracle(pairs, 2, 2) == [("A", "x"), ("A", "y"), ("C", "x"), ("C", "y")]
    assert passes == 2
    m, _ = apply_filter(_frame(pairs), FilterOptions("min-count", min_user=2, min_item=2))
    # single pass on the original counts: z and w go, every user had 2 so all users stay
    assert list(zip(m["user"].to_list(), m["item"].to_list())) == [
        ("A", "x"), ("A", "y"), ("B", "x"), ("C", "x"), ("C", "y"), ("D", "y")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 8)), min_size=1, max_size=60),
       st.integers(1, 4), st.integers(1, 4))
def test_kcore_matches_oracle(pairs: list[tuple[int, int]], ku: int, ki: int) -> None:
    p = [(str(u), str(i)) for u, i in pairs]
    got, _ = apply_filter(_frame(p), FilterOptions("kcore", min_user=ku, min_item=ki))
    assert list(zip(got["user"].to_list(), got["item"].to_list())) == kcore_oracle(p, ku, ki)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9), st.integers(0, 4)),
                min_size=3, max_size=50))
def test_prepare_matches_oracle_and_round_trips(
    tmp_path: Path, rows: list[tuple[int, int, int]]
) -> None:
    data = [(f"u{u}", f"i{i}", float(t)) for u, i, t in rows]
    counts = Counter(u for u, _, _ in data)
    keep = [r for r in data if counts[r[0]] >= 3]
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{int(t)}\n" for u, i, t in data))
    if not keep:
        with pytest.raises(DataError, match="min_length=3"):
            prepare(f, tmp_path / "ds", overwrite=True)
        return
    if len({i for _, i, _ in keep}) < 2:  # a one-item catalogue cannot be ranked
        with pytest.raises(DataError, match="at least 2 items"):
            prepare(f, tmp_path / "ds", overwrite=True)
        return
    out = prepare(f, tmp_path / "ds", overwrite=True)
    check_against_oracle(out, keep)
    # id maps round trip: the dataset gives back every kept (user, item, time-ordered) event
    ds = load_dataset(out)
    back = Counter(
        (ds.user_ids[u], ds.item_ids[i - 1])
        for u in range(ds.n_users) for i in ds.store.sequence(u).tolist())
    assert back == Counter((u, i) for u, i, _ in keep)
    assert ds.item_index() == {orig: k + 1 for k, orig in enumerate(ds.item_ids)}
    assert all(ds.user_ids[ds.user_index()[u]] == u for u in ds.user_ids)


# ---------------------------------------------------------------------------------------------
# load_dataset and stats
# ---------------------------------------------------------------------------------------------


def test_load_dataset_and_stats(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", "u1 a b c d\nu2 b c d\nu3 a a b\n")
    items = write(tmp_path / "items.csv", "item_id,title\na,Apple pie\nb,Bread\n")
    out = prepare(inter, tmp_path / "ds", items=items, name="tiny")
    ds = load_dataset(out)
    assert (ds.n_users, ds.n_items, ds.name) == (3, 4, "tiny")
    assert ds.store.n_interactions == 10
    assert ds.item_ids == ["a", "b", "c", "d"] and ds.user_ids == ["u1", "u2", "u3"]
    assert ds.item_text == ["Apple pie", "Bread", "", ""]
    assert ds.store.sequence(2).tolist() == [1, 1, 2]
    s = ds.stats
    assert (s["users"], s["items"], s["interactions"]) == (3, 4, 10)
    assert s["length"]["mean"] == pytest.approx(10 / 3)
    assert (s["length"]["min"], s["length"]["median"], s["length"]["max"]) == (3, 3, 4)
    # popularity a=3, b=3, c=2, d=2
    assert s["popularity"]["mean"] == 2.5 and s["popularity"]["max"] == 3
    assert s["popularity_buckets"]["1-9"] == 4
    assert s["text"] == {"items_with_text": 2, "share": 0.5, "words_mean": 1.5}
    assert ds.items_frame().height == 4


def test_load_dataset_rejects_broken_dirs(tmp_path: Path) -> None:
    out = prepare(write(tmp_path / "s.txt", "u1 a b c\n"), tmp_path / "ds")
    with pytest.raises(DataError, match="not a dataset directory"):
        load_dataset(tmp_path / "nope")
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"format": "other"}))
    with pytest.raises(DataError, match="format='other'"):
        load_dataset(out)
    (out / "meta.json").write_text(json.dumps(meta))
    np.save(out / "items.npy", np.array([1, 2, 9], dtype=np.int64))
    with pytest.raises(DataError, match="invalid sequences"):
        load_dataset(out)
    np.save(out / "items.npy", np.array([1, 2, 9], dtype=np.int32))  # memory-mapped
    with pytest.raises(DataError, match=r"invalid sequences \(items\[2\]=9 > n_items=3\)"):
        load_dataset(out)
    np.save(out / "items.npy", np.array([1.0, 2.0, 3.0]))
    with pytest.raises(DataError, match="expected int32 or int64 with 1 dims, got float64"):
        load_dataset(out)
    (out / "offsets.npy").unlink()
    with pytest.raises(DataError, match="offsets.npy: missing"):
        load_dataset(out)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        prepare(tmp_path / "none.csv", tmp_path / "ds")
    empty = write(tmp_path / "e.csv", "")
    with pytest.raises(DataError, match=r"e\.csv: file is empty"):
        prepare(empty, tmp_path / "ds")
    header_only = write(tmp_path / "h.csv", "user_id,item_id\n")
    with pytest.raises(DataError, match="no interactions"):
        prepare(header_only, tmp_path / "ds")
    blank = write(tmp_path / "b.txt", "\n\n  \n")
    with pytest.raises(DataError, match="no interactions"):
        prepare(blank, tmp_path / "ds", read=ReadOptions(format="sequences"))
    assert not (tmp_path / "ds").exists()


def test_missing_column_names_file_and_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"log\.csv: user column 'user_id' not found; "
                       r"columns are \['user', 'item_id'\]"):
        prepare(f, tmp_path / "ds")
    with pytest.raises(DataError, match="timestamp column 'ts' not found"):
        prepare(f, tmp_path / "ds", read=ReadOptions(user_col="user", time_col="ts"))


def test_unparsable_lines_error_then_skip(tmp_path: Path) -> None:
    f = write(tmp_path / "ml.txt", "1 1\n1 2\n1 3\n1 4 5 6\n2 1\n2 2\n2 3\n2\n")
    with pytest.raises(DataError, match=r"ml\.txt:4: wrong number of fields: '1 4 5 6' "
                       r"\(1 more bad rows\)"):
        prepare(f, tmp_path / "ds", read=ReadOptions(format="pairs"))
    assert not (tmp_path / "ds").exists()
    out = prepare(f, tmp_path / "ds", read=ReadOptions(format="pairs", on_bad_line="skip"))
    assert sequences_of(out) == [[1, 2, 3], [1, 2, 3]]
    side = pl.read_csv(out / "skipped_rows.csv")
    assert side.get_column("line").to_list() == [4, 8]
    assert side.get_column("content").to_list() == ["1 4 5 6", "2"]
    assert json.loads((out / "meta.json").read_text())["rows_skipped"] == 2


def test_bad_timestamp_and_missing_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,x,1\na,y,2\na,z,3\na,w,soon\n"
              ",x,5\nb,,6\n")
    with pytest.raises(DataError, match=r"log\.csv:5: bad timestamp: 'a w soon'"):
        prepare(f, tmp_path / "ds")
    with caplog.at_level(logging.WARNING):
        out = prepare(f, tmp_path / "ds", read=ReadOptions(on_bad_line="skip"))
    assert "skipped 3 unparsable rows" in caplog.text
    side = pl.read_csv(out / "skipped_rows.csv")
    assert side.select("line", "reason").rows() == [
        (5, "bad timestamp"), (6, "missing user id"), (7, "missing item id")]
    assert sequences_of(out) == [[1, 2, 3]]


def test_movielens_wrong_fields(tmp_path: Path) -> None:
    f = write(tmp_path / "ratings.dat", "1::2::5::100\n1::3::4\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: wrong number of fields: '1::3::4'"):
        prepare(f, tmp_path / "ds")


def test_short_users_dropped_with_side_file_or_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = write(tmp_path / "s.txt", "u1 a b c\nu2 a b\nu3 c b a d\nu4 d\n")
    with caplog.at_level(logging.WARNING):
        out = prepare(f, tmp_path / "ds")
    assert "dropped 2 users with fewer than 3 interactions (3 interactions)" in caplog.text
    assert pl.read_parquet(out / "users.parquet").get_column("original_id").to_list() == [
        "u1", "u3"]
    side = pl.read_csv(out / "skipped_rows.csv")
    assert side.get_column("content").to_list() == ["u2 a", "u2 b", "u4 d"]
    assert side.get_column("line").to_list() == [2, 2, 4]
    with pytest.raises(DataError, match=r"s\.txt:2: user 'u2' has 2 interactions, fewer than "
                       r"min_length=3 .*\(2 such users\)"):
        prepare(f, tmp_path / "ds2", short_users="error")
    with pytest.raises(DataError, match="no user has at least min_length=5"):
        prepare(f, tmp_path / "ds3", min_length=5)


def test_duplicate_item_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inter = write(tmp_path / "s.txt", SEQ)
    same = write(tmp_path / "same.csv", "item_id,title\na,A\na,A\nb,B\n")
    out = prepare(inter, tmp_path / "ds", items=same)
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list()[:2] == ["A", "B"]
    clash = write(tmp_path / "clash.csv", "item_id,title\na,A\nb,B\na,Other\n")
    with pytest.raises(DataError, match=r"clash\.csv: item 'a' appears on lines \[2, 4\] with "
                       r"different text \('A' vs 'Other'\)"):
        prepare(inter, tmp_path / "ds2", items=clash)
    with caplog.at_level(logging.WARNING):
        out = prepare(inter, tmp_path / "ds2", items=clash,
                      item_table=ItemTableOptions(on_duplicate="first"))
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list()[0] == "A"
    assert "kept the first" in caplog.text


def test_ids_that_do_not_join(tmp_path: Path) -> None:
    inter = write(tmp_path / "s.txt", "1 1 2 3\n")
    items = write(tmp_path / "y.item.json", json.dumps({"0": {"title": "Zero"}}))
    # without the offset item "0" never meets interaction ids 1..3
    items2 = write(tmp_path / "z.item.json", json.dumps({"7": {"title": "Seven"}}))
    with pytest.raises(DataError, match=r"no item id joins .*table ids like \['7'\]"):
        prepare(inter, tmp_path / "ds", items=items2)
    bad_offset = write(tmp_path / "t.csv", "item_id,title\nabc,X\n")
    with pytest.raises(DataError, match=r"t\.csv:2: id 'abc' is not an integer"):
        read_item_table(bad_offset, ItemTableOptions(id_offset=1))
    out = prepare(inter, tmp_path / "ds", items=items, item_table=ItemTableOptions(id_offset=1))
    assert pl.read_parquet(out / "items.parquet").get_column("text").to_list() == [
        "Zero", "", ""]


def test_id_map_conflicts_and_bad_lines(tmp_path: Path) -> None:
    movies = write(tmp_path / "movies.dat", "10::A (1)::X\n")
    m1 = write(tmp_path / "m1.txt", "1 10\n1 20\n")
    with pytest.raises(DataError, match=r"m1\.txt: id '1' is mapped to several targets"):
        read_item_table(movies, ItemTableOptions(id_map=str(m1)))
    m2 = write(tmp_path / "m2.txt", "1 10\n2\n")
    with pytest.raises(DataError, match=r"m2\.txt:2: expected 'source target', got '2'"):
        read_item_table(movies, ItemTableOptions(id_map=str(m2)))
    bad = write(tmp_path / "bad.dat", "10::A (1)::X\n11::B\n")
    with pytest.raises(DataError, match=r"bad\.dat:2: expected 'MovieID::Title::Genres'"):
        read_item_table(bad)


def test_existing_output_and_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(tmp_path / "s.txt", "u1 a b c\n")
    out = prepare(f, tmp_path / "ds")
    with pytest.raises(DataError, match="already exists"):
        prepare(f, tmp_path / "ds")
    before = sorted(p.name for p in tmp_path.iterdir())

    def boom(self: pl.DataFrame, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(write(tmp_path / "s2.txt", "u9 x y z\n"), tmp_path / "ds", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        prepare(f, tmp_path / "fresh")
    monkeypatch.undo()
    # no temporary directory left, the old dataset untouched, the new one never created
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["s2.txt"]
    assert sequences_of(out) == [[1, 2, 3]]
    assert load_dataset(out).user_ids == ["u1"]


def test_bad_options(tmp_path: Path) -> None:
    f = write(tmp_path / "s.txt", "u1 a b c\n")
    with pytest.raises(DataError, match="format='xml'"):
        read_interactions(f, ReadOptions(format="xml"))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="cannot guess the format from suffix '.xyz'"):
        read_interactions(write(tmp_path / "a.xyz", "1 2\n"))
    with pytest.raises(DataError, match="removed every interaction"):
        prepare(f, tmp_path / "ds", filter=FilterOptions("kcore", min_user=5, min_item=1))
    with pytest.raises(DataError, match="min_user=0"):
        prepare(f, tmp_path / "ds", filter=FilterOptions("kcore", min_user=0))


def test_numbering_follows_first_kept_row(tmp_path: Path) -> None:
    # u1's first row holds an item the filter removes, so u2 appears first among kept rows
    f = write(tmp_path / "log.csv", "user_id,item_id\nu1,x\nu2,a\nu2,b\nu2,c\nu1,c\nu1,b\nu1,a\n")
    out = prepare(f, tmp_path / "ds", filter=FilterOptions("kcore", min_user=3, min_item=2))
    assert pl.read_parquet(out / "users.parquet").get_column("original_id").to_list() == [
        "u2", "u1"]
    assert sequences_of(out) == [[1, 2, 3], [3, 2, 1]]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["filter"]["removed"] == 1 and meta["rows_read"] == 7


def test_csv_rows_with_wrong_field_counts(tmp_path: Path) -> None:
    f = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,x,1\na,y,2,9\na,z,3\na,w\n"
              "a,v,5\n")
    with pytest.raises(DataError, match=r"log\.csv:3: wrong number of fields \(header has 3\): "
                       r"'a,y,2,9'"):
        prepare(f, tmp_path / "ds")
    out = prepare(f, tmp_path / "ds", read=ReadOptions(on_bad_line="skip"))
    side = pl.read_csv(out / "skipped_rows.csv")
    assert side.select("line", "reason", "content").rows() == [
        (3, "wrong number of fields", "a,y,2,9"), (5, "wrong number of fields", "a,w")]
    ids = pl.read_parquet(out / "items.parquet").get_column("original_id").to_list()
    assert [ids[i - 1] for i in sequences_of(out)[0]] == ["x", "z", "v"]


def test_the_sequences_are_int32_on_disk_and_read_in_place(tmp_path: Path) -> None:
    out = prepare(write(tmp_path / "s.txt", "u1 a b c a\nu2 c d b\nu3 a d\n"), tmp_path / "ds")
    assert np.load(out / "items.npy").dtype == np.int32
    assert np.load(out / "offsets.npy").dtype == np.int64
    ds = load_dataset(out)
    assert ds.store.borrowed
    want = [[1, 2, 3, 1], [3, 4, 2]]  # u3 (2 items) is dropped: shorter than min_length
    assert [ds.store.sequence(u).tolist() for u in range(ds.n_users)] == want
    # a dataset written with int64 ids (before int32) still loads, as a copy; the file is
    # replaced by a rename, as h2rec writes every file (a rewrite in place would change what
    # the mapped ``ds`` reads)
    np.save(tmp_path / "items64.npy", np.load(out / "items.npy").astype(np.int64))
    os.replace(tmp_path / "items64.npy", out / "items.npy")
    old = load_dataset(out)
    assert not old.store.borrowed
    assert [old.store.sequence(u).tolist() for u in range(old.n_users)] == want
    # the mapped arrays stay readable when the directory is replaced under a loaded dataset
    prepare(write(tmp_path / "t.txt", "v a b c\n"), out, overwrite=True)
    assert [ds.store.sequence(u).tolist() for u in range(ds.n_users)] == want
    assert load_dataset(out).store.sequence(0).tolist() == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# large logs read in chunks (h2rec.data.stream)
# ---------------------------------------------------------------------------------------------


def _log_csv(path: Path, n: int, seed: int, sep: str = ",", float_ts: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n // 6, n)
    items = rng.integers(0, n // 4, n)
    ts = rng.integers(0, n // 3, n)  # coarse: many ties
    lines = [sep.join(["user_id", "item_id", "timestamp", "rating"])]  # a column not read
    for u, i, t in zip(users, items, ts):
        stamp = f"{t}.5" if float_ts else str(t)
        # ids with spaces to strip
        lines.append(sep.join([f" u{u} ", f"item-{i}", stamp, str(int(t) % 5 + 1)]))
    lines += lines[5:8]  # rows repeated exactly
    return write(path, "\n".join(lines) + "\n")


def _dataset_files(path: Path) -> dict[str, object]:
    meta = json.loads((path / "meta.json").read_text())
    meta["read"].pop("chunk_rows")
    meta.pop("sources")
    meta.pop("name")
    out: dict[str, object] = {"meta": meta, "stats": json.loads((path / "stats.json").read_text())}
    for name in ("offsets.npy", "items.npy"):
        out[name] = np.load(path / name).tolist()
    for name in ("users.parquet", "items.parquet"):
        out[name] = pl.read_parquet(path / name).rows()
    skipped = path / "skipped_rows.csv"
    out["skipped"] = skipped.read_text() if skipped.exists() else None
    return out


@pytest.mark.parametrize(("sep", "float_ts"), [(",", False), ("\t", True)])
def test_a_log_read_in_chunks_prepares_as_the_whole_file(
    tmp_path: Path, sep: str, float_ts: bool
) -> None:
    from h2rec.data.ids import encode_ids
    from h2rec.data.stream import read_coded

    log = _log_csv(tmp_path / ("log.csv" if sep == "," else "log.tsv"), 600, 1, sep, float_ts)
    chunked = ReadOptions(chunk_rows=37)
    coded = read_coded(log, chunked)
    assert coded is not None  # read in chunks, not sent down the whole-file path
    whole = read_interactions(log, ReadOptions(chunk_rows=0))
    frame, users, items = encode_ids(whole.frame)
    assert coded.frame.equals(frame)
    assert coded.user_names.to_list() == users.to_list()
    assert coded.item_names.to_list() == items.to_list()
    a = prepare(log, tmp_path / "a", read=chunked, filter=FilterOptions("kcore", 2, 2))
    b = prepare(log, tmp_path / "b", read=ReadOptions(chunk_rows=0),
                filter=FilterOptions("kcore", 2, 2))
    assert _dataset_files(a) == _dataset_files(b)


def test_bad_rows_of_a_chunked_log_are_skipped_or_reported_as_the_whole_file_does(
    tmp_path: Path,
) -> None:
    from h2rec.data.stream import read_coded

    text = _log_csv(tmp_path / "ok.csv", 300, 2, float_ts=True).read_text().splitlines()
    text[40] = "u1,item-1,NaN,3"  # parses as a number: a bad timestamp
    text[200] = "u\x002,item-2,3.0,3"  # a NUL byte in an id
    log = write(tmp_path / "log.csv", "\n".join(text) + "\n")
    skip = ReadOptions(chunk_rows=29, on_bad_line="skip")
    coded = read_coded(log, skip)
    assert coded is not None
    assert coded.skipped.get_column("line").to_list() == [41, 201]
    assert coded.skipped.get_column("reason").to_list() == ["bad timestamp", "NUL byte in the user id"]
    a = prepare(log, tmp_path / "a", read=skip, filter=FilterOptions("none"))
    b = prepare(log, tmp_path / "b", read=ReadOptions(chunk_rows=0, on_bad_line="skip"),
                filter=FilterOptions("none"))
    assert _dataset_files(a) == _dataset_files(b)
    # under on_bad_line="error" the message is the whole-file reader's, line and all
    with pytest.raises(DataError, match=r"log.csv:41: bad timestamp: 'u1 item-1 NaN' \(1 more"):
        prepare(log, tmp_path / "c", read=ReadOptions(chunk_rows=29))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("u1,item-1,5", r"log.csv:\d+: wrong number of fields"),  # short: an unused field
        ("u1,item-1", r"log.csv:\d+: wrong number of fields"),
        ("u1,item-1,5,3,extra", r"log.csv:\d+: wrong number of fields"),  # a long one
        ("u1,,5,3", r"log.csv:\d+: missing item id"),
        ("u1,item-1,yesterday,3", r"log.csv:\d+: bad timestamp"),  # the column is not numeric
    ],
)
def test_a_chunked_log_the_whole_reader_refuses_gets_its_message(
    tmp_path: Path, line: str, message: str
) -> None:
    text = _log_csv(tmp_path / "ok.csv", 300, 3).read_text().splitlines()
    text[150] = line
    log = write(tmp_path / "log.csv", "\n".join(text) + "\n")
    for rows in (23, 0):
        with pytest.raises(DataError, match=message):
            prepare(log, tmp_path / f"out{rows}", read=ReadOptions(chunk_rows=rows))


def test_a_bad_value_in_a_column_not_used_stops_a_chunked_read_as_a_whole_one(
    tmp_path: Path,
) -> None:
    text = _log_csv(tmp_path / "ok.csv", 10_400, 4).read_text().splitlines()
    text[10_300] = "u1,item-1,5,abc"  # past the 10,000 rows the column's type is inferred from
    log = write(tmp_path / "log.csv", "\n".join(text) + "\n")
    for rows in (997, 0):
        with pytest.raises(DataError, match=r"log.csv: cannot parse"):
            prepare(log, tmp_path / f"out{rows}", read=ReadOptions(chunk_rows=rows))
