"""h2rec: sequential recommendation with Semantic IDs and Hash IDs (H2Rec).

The data hot path lives in the compiled extension ``h2rec._core``; its public names are
re-exported here. The Python API (loaded on first use, as it pulls in torch)::

    import h2rec
    run = h2rec.fit("interactions.csv", items="items.csv", model="h2rec")  # h2rec-train
    rec = h2rec.load(run.run_dirs["h2rec"])                                # a Recommender
    rec.recommend([["B004756YJA", "B0020YLEYK"], ["7806397051"]], k=10)    # original ids

``fit`` and ``load`` come from :mod:`h2rec.pipeline`, ``Recommender`` from
:mod:`h2rec.serving`, ``RunConfig`` and ``load_config`` from :mod:`h2rec.config`.
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

_LAZY = {
    "fit": "h2rec.pipeline",
    "load": "h2rec.pipeline",
    "FitResult": "h2rec.pipeline",
    "Recommender": "h2rec.serving",
    "RunConfig": "h2rec.config",
    "load_config": "h2rec.config",
}


def __getattr__(name: str) -> object:
    """The Python API's names, imported on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'h2rec' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FitResult",
    "H2RecError",
    "Recommender",
    "RunConfig",
    "SequenceStore",
    "TrainSampler",
    "assign_codes",
    "build_profile",
    "code_report",
    "cooccurrence",
    "fit",
    "gemm_simd_level",
    "kmeans",
    "load",
    "load_config",
    "reconstruction_errors",
    "residual_kmeans",
    "sample_candidates",
    "simd_level",
]
