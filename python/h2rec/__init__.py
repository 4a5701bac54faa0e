"""h2rec: sequential recommendation with Semantic IDs and Hash IDs (H2Rec).

The data hot path lives in the compiled extension ``h2rec._core``; its public names are
re-exported here.
"""

from __future__ import annotations

from h2rec.threads import passive_waits

passive_waits()  # before anything imports torch: idle OpenMP threads sleep instead of spinning

from h2rec._core import (  # noqa: E402
    SequenceStore,
    TrainSampler,
    assign_codes,
    build_profile,
    code_report,
    cooccurrence,
    gemm_simd_level,
    kmeans,
    reconstruction_errors,
    residual_kmeans,
    sample_candidates,
    simd_level,
)
from h2rec.errors import CheckpointError, ConfigError, DataError, H2RecError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "H2RecError",
    "SequenceStore",
    "TrainSampler",
    "assign_codes",
    "build_profile",
    "code_report",
    "cooccurrence",
    "gemm_simd_level",
    "kmeans",
    "reconstruction_errors",
    "residual_kmeans",
    "sample_candidates",
    "simd_level",
]
