"""Shared fixtures for the benchmarks: the real datasets beside the repository (read in place,
never copied) and generated embedding sets.

Sizes: by default the benches run on reduced inputs so that CI (which runs them once each with
``--benchmark-disable``) stays quick. Set ``H2REC_BENCH_FULL=1`` for the sizes the README's
tables report.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

FULL = os.environ.get("H2REC_BENCH_FULL", "") not in ("", "0")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def beauty_sequences() -> list[list[int]]:
    """Amazon Beauty (S3Rec processing) as one chronological item list per user."""
    path = DATA / "beauty" / "Beauty.txt"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    with path.open() as f:
        return [[int(t) for t in line.split()[1:]] for line in f if line.strip()]


def clustered_embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Unit vectors with a two-level topic structure, like sentence embeddings of a catalogue:
    64 topics, 16 subtopics each, anisotropic noise, L2-normalised."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((64, d))
    sub = topics[:, None, :] + 0.6 * rng.standard_normal((64, 16, d))
    which = rng.integers(0, 64 * 16, n)
    scale = rng.uniform(0.3, 1.2, d)  # anisotropic
    x = sub.reshape(-1, d)[which] + 0.9 * rng.standard_normal((n, d)) * scale
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def record(benchmark, **info: object) -> None:
    """Attach figures (reconstruction error, sizes) to the benchmark's JSON record."""
    benchmark.extra_info.update(info)
