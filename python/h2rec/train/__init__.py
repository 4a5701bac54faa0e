"""Training: one call, :func:`train`, from a configuration and a dataset to the best model and
its test metrics, with checkpoints, exact resume and DDP.

One module per idea, each importing only the ones above it in this list:

- ``build``: seed the run, check codes and embeddings, build the model a config describes;
- ``step``: the loss plan, shared negatives, ``TrainStep`` (model + whole loss in one forward)
  and the per-epoch loss scale;
- ``checkpoint``: ``last.pt`` / ``best.pt`` (weights, optimiser, progress, RNG states,
  fingerprints of what the run is trained on), resume and ``load_checkpoint``;
- ``distributed``: torchrun ranks, the device, the process group, DDP, evaluation split over
  the ranks;
- ``loop``: :func:`train` itself: setup, epochs, validation and early stopping, the test.

Every name importable from the former module ``h2rec/train.py`` is importable from
``h2rec.train``.
"""

from __future__ import annotations

from h2rec.train.build import build_for, check_codes, seed_everything
from h2rec.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    codes_fingerprint,
    dataset_fingerprint,
    load_checkpoint,
)
from h2rec.train.distributed import resolve_device
from h2rec.train.loop import TrainResult, train
from h2rec.train.step import (
    AUTO_SHARED_NEGATIVES,
    LossPlan,
    SharedNegatives,
    TrainStep,
    loss_plan,
    positions_per_batch,
)

__all__ = [
    "TrainResult",
    "TrainStep",
    "build_for",
    "check_codes",
    "codes_fingerprint",
    "dataset_fingerprint",
    "load_checkpoint",
    "resolve_device",
    "seed_everything",
    "train",
]
