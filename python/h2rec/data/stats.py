"""``stats.json``: users, items, density, length and popularity distributions, item text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl


def _distribution(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "min": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def compute_stats(
    offsets: np.ndarray, items: np.ndarray, n_items: int, text: Sequence[str] | pl.Series
) -> dict[str, Any]:
    """``stats.json`` content from the CSR arrays and the item text."""
    lengths = np.diff(offsets)
    pop = np.bincount(items, minlength=n_items + 1)[1:]
    text_s = pl.Series("text", list(text) if not isinstance(text, pl.Series) else text)
    has_text = text_s.str.strip_chars().str.len_chars() > 0
    n_text = int(has_text.sum())
    words = text_s.filter(has_text).str.extract_all(r"\S+").list.len()
    n_users = int(lengths.size)
    n_inter = int(items.size)
    sorted_pop = np.sort(pop)[::-1]
    head_n = max(1, round(0.2 * n_items)) if n_items else 0
    return {
        "users": n_users,
        "items": int(n_items),
        "interactions": n_inter,
        "density": float(n_inter / (n_users * n_items)) if n_users and n_items else 0.0,
        "length": _distribution(lengths),
        "popularity": _distribution(pop),
        "popularity_buckets": {
            "1-9": int(((pop >= 1) & (pop <= 9)).sum()),
            "10-29": int(((pop >= 10) & (pop <= 29)).sum()),
            "30-59": int(((pop >= 30) & (pop <= 59)).sum()),
            "60-99": int(((pop >= 60) & (pop <= 99)).sum()),
            ">=100": int((pop >= 100).sum()),
        },
        "head20_interaction_share": (
            float(sorted_pop[:head_n].sum() / n_inter) if n_inter else 0.0
        ),
        "text": {
            "items_with_text": n_text,
            "share": float(n_text / n_items) if n_items else 0.0,
            "words_mean": float(words.mean()) if n_text else 0.0,  # type: ignore[arg-type]
        },
    }
