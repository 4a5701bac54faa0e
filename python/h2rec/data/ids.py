"""Id mapping: user and item id strings to integer codes in order of first appearance.

``prepare`` works on these codes and keeps the strings once, as two Series (code -> original id);
the final numbering (users by first appearance in the file, items by first appearance in the
sorted sequences) is done in ``h2rec.data.dataset``.
"""

from __future__ import annotations

import polars as pl


def encode_ids(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """Replace the ``user`` and ``item`` strings by UInt32 codes (in order of first appearance
    in the frame); return the coded frame and the two Series of names (code -> original id)."""
    user_names = frame.get_column("user").unique(maintain_order=True)
    item_names = frame.get_column("item").unique(maintain_order=True)

    def code(col: str, names: pl.Series) -> pl.Series:
        # a hash join keeps the left order; much faster than replace_strict on strings
        table = names.to_frame(col).with_row_index("code")
        joined = frame.select(col).join(table, on=col, how="left", maintain_order="left")
        return joined.get_column("code").rename(col)

    rest = [c for c in frame.columns if c not in ("line", "user", "item")]
    coded = frame.select(
        pl.col("line"),
        code("user", user_names),
        code("item", item_names),
        *[pl.col(c) for c in rest],
    )
    return coded, user_names, item_names
