"""Data stage: read interaction logs and item tables, filter, order, remap ids, write a dataset.

One module per idea, each importing only the ones above it in this list:

- ``files``: low-level reading shared by the readers (UTF-8/Latin-1, numbered lines, tables,
  unparsable rows);
- ``readers``: interaction files (csv/tsv/parquet, sequence and pair text, RecBole ``.inter``,
  MovieLens ``ratings.dat``) -> ``Interactions``;
- ``items``: item tables (csv/tsv/parquet, RecBole ``.item``, ``movies.dat``, JSON, Beauty) and
  the text templates;
- ``filters``: k-core and minimum-count filters;
- ``ids``: id strings -> integer codes;
- ``stream``: large CSV/TSV logs read in chunks and coded chunk by chunk (bounded memory);
- ``stats``: the content of ``stats.json``;
- ``dataset``: ``prepare`` (read, filter, order, remap, write the dataset directory) and
  ``load_dataset`` / ``Dataset``.

Every public name is importable from ``h2rec.data`` itself.
"""

from __future__ import annotations

# every public name of the former module h2rec/data.py, under __all__ or not, stays importable
# from h2rec.data
from h2rec.data.dataset import (
    DATASET_FORMAT,
    DATASET_VERSION,
    SKIPPED_FILE,
    Dataset,
    load_dataset,
    prepare,
    read_text_for_items,
    write_json,
)
from h2rec.data.files import NOT_UTF8
from h2rec.data.filters import FilterOptions, apply_filter
from h2rec.data.ids import encode_ids
from h2rec.data.items import (
    ITEM_FORMATS,
    ItemFormat,
    ItemTableOptions,
    apply_template,
    read_beauty_titles,
    read_item_table,
)
from h2rec.data.readers import (
    INTERACTION_FORMATS,
    Format,
    Interactions,
    ReadOptions,
    read_interactions,
)
from h2rec.data.stats import compute_stats

__all__ = [
    "Dataset",
    "FilterOptions",
    "Interactions",
    "ItemTableOptions",
    "ReadOptions",
    "apply_filter",
    "apply_template",
    "compute_stats",
    "encode_ids",
    "load_dataset",
    "prepare",
    "read_beauty_titles",
    "read_interactions",
    "read_item_table",
    "read_text_for_items",
]

