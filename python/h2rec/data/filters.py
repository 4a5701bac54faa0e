"""Which interactions to keep: the iterated k-core, or SASRec's single-pass minimum count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

from h2rec.errors import DataError


@dataclass(frozen=True)
class FilterOptions:
    """Which interactions to keep."""

    kind: Literal["none", "kcore", "min-count"] = "none"  # kcore iterates until stable
    min_user: int = 5  # least interactions per user
    min_item: int = 5  # least interactions per item


def apply_filter(frame: pl.DataFrame, options: FilterOptions) -> tuple[pl.DataFrame, int]:
    """Keep the interactions the filter allows; return the frame and the number of passes."""
    if options.kind == "none":
        return frame, 0
    if options.min_user < 1 or options.min_item < 1:
        raise DataError(
            f"filter min_user={options.min_user}, min_item={options.min_item}: must be >= 1"
        )
    if options.kind == "min-count":
        kept = frame.filter(
            (pl.len().over("user") >= options.min_user)
            & (pl.len().over("item") >= options.min_item)
        )
        return kept, 1
    if options.kind != "kcore":
        raise DataError(f"filter kind={options.kind!r} is not one of none, kcore, min-count")
    passes = 0
    while True:
        passes += 1
        before = frame.height
        frame = frame.filter(pl.len().over("item") >= options.min_item)
        frame = frame.filter(pl.len().over("user") >= options.min_user)
        if frame.height == before:
            return frame, passes
