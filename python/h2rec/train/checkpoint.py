"""Checkpoints: what ``last.pt`` and ``best.pt`` hold, how they are written, read and checked.

A checkpoint holds the weights, the optimiser state, the run's progress (epoch, best validation
NDCG@10 and its epoch, validations without improvement, early stop, per-epoch history) and the
Python, NumPy and torch RNG states, so that a resumed run continues exactly; and what it was
trained on (the resolved config, fingerprints of the dataset, its item ids and the SID codes),
checked before a checkpoint is resumed or loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from h2rec import _core
from h2rec.config import RunConfig, config_from_saved, config_to_dict
from h2rec.errors import CheckpointError, ConfigError
from h2rec.report import atomic_writer
from h2rec.train.build import build_for, check_codes, seed_everything

if TYPE_CHECKING:
    from h2rec.models import Recommender
    from h2rec.train.optim import SplitAdam


CHECKPOINT_FORMAT = "h2rec-checkpoint"
CHECKPOINT_VERSION = 1
# Settings a resumed run may change: how long to train and where to run; everything else must match.
_RESUMABLE_CHANGES = {
    "name",
    "output_dir",
    "data.path",
    "data.embeddings",
    "sid.path",
    "train.epochs",
    "train.patience",
    "train.device",
    "train.num_threads",
    "train.compile",
    "train.text_blend",  # chosen after training: the epochs are the same
    "eval.batch_size",
    "eval.max_scores_mb",
    "train.loss_memory_mb",
}


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dataset_fingerprint(store: _core.SequenceStore) -> dict[str, Any]:
    """n_items, n_users, n_interactions and a SHA-256 of the CSR arrays."""
    return {
        "n_items": int(store.n_items),
        "n_users": int(store.n_users),
        "n_interactions": int(store.n_interactions),
        "csr_sha256": _sha256(store.offsets, store.items),
    }


def codes_fingerprint(codes: np.ndarray | None) -> dict[str, Any] | None:
    """Shape and SHA-256 of the SID codes (None without codes)."""
    if codes is None:
        return None
    return {"shape": list(codes.shape), "sha256": _sha256(np.asarray(codes, dtype=np.int64))}


@dataclass
class Progress:
    """Where a run stands after an epoch: what a checkpoint carries, besides the weights, the
    optimiser and the RNG states, to resume exactly."""

    best_metric: float = -1.0  # best validation NDCG@10 so far (-1: no validation yet)
    best_epoch: int = 0  # its epoch (0 = the untrained model)
    bad_evals: int = 0  # validations since the best one
    stopped: bool = False  # patience ran out
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch run


@dataclass(frozen=True)
class Provenance:
    """What a run is trained on, recorded in each of its checkpoints and checked on resume."""

    config: dict[str, Any]  # the resolved configuration (config_to_dict)
    dataset: dict[str, Any]  # dataset_fingerprint
    items_sha256: str | None  # the dataset's item-id fingerprint, when known
    codes: dict[str, Any] | None  # codes_fingerprint (None without SID codes)

    @classmethod
    def of(
        cls, cfg: RunConfig, store: _core.SequenceStore, sids: Any, item_fingerprint: str | None
    ) -> Provenance:
        return cls(
            config=config_to_dict(cfg),
            dataset=dataset_fingerprint(store),
            items_sha256=item_fingerprint,
            codes=codes_fingerprint(getattr(sids, "codes", None)),
        )


def checkpoint_payload(
    provenance: Provenance,
    epoch: int,
    state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | SplitAdam,
    progress: Progress,
) -> dict[str, Any]:
    """What ``torch.save`` writes: the model ``state`` after ``epoch``, the optimiser's state,
    the progress and the RNG states as they are now, and the provenance."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": provenance.config,
        "dataset": provenance.dataset,
        "items_sha256": provenance.items_sha256,
        "codes": provenance.codes,
        "model": state,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "bad_evals": progress.bad_evals,
        "stopped": progress.stopped,
        "history": json.dumps(progress.history),
        "rng": _rng_state(),
    }


def restore(
    ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | SplitAdam
) -> tuple[int, Progress]:
    """Load a ``last.pt`` into the model and the optimiser and set the RNGs to its states;
    return the first epoch still to run and the progress so far."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    start_epoch = int(ckpt["epoch"]) + 1
    progress = Progress(
        best_metric=float(ckpt["best_metric"]),
        best_epoch=int(ckpt["best_epoch"]),
        bad_evals=int(ckpt["bad_evals"]),
        stopped=bool(ckpt["stopped"]),
        history=json.loads(ckpt["history"]),
    )
    _set_rng_state(ckpt["rng"])
    return start_epoch, progress


def _rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_writer(path, lambda f: torch.save(payload, f))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: checkpoint not found") from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable h2rec checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an h2rec checkpoint (format field missing)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r}, expected {CHECKPOINT_VERSION}"
        )
    return ckpt


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _verify_checkpoint(
    path: Path,
    ckpt: dict[str, Any],
    store: _core.SequenceStore,
    sids: Any,
    cfg: RunConfig | None,
    resumable_only: bool,
    item_fingerprint: str | None = None,
) -> None:
    """CheckpointError unless ``ckpt`` was trained on this dataset, these codes and this model."""
    saved_items = ckpt.get("items_sha256")
    if item_fingerprint is not None and saved_items is not None and saved_items != item_fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint was trained on other item ids (fingerprint {saved_items[:12]}, "
            f"this dataset {item_fingerprint[:12]})"
        )
    fp = dataset_fingerprint(store)
    saved = ckpt["dataset"]
    if saved != fp:
        diff = [
            f"{k}: checkpoint {saved.get(k)!r} vs data {v!r}"
            for k, v in fp.items()
            if saved.get(k) != v
        ]
        raise CheckpointError(
            f"{path}: checkpoint was trained on another dataset ({'; '.join(diff)})"
        )
    if cfg is not None:
        # the saved config as this h2rec reads it: settings added since take the value the run
        # had (config_from_saved), so an older run resumes under the same settings
        old = _flat(config_to_dict(config_from_saved(ckpt["config"])))
        new = _flat(config_to_dict(cfg))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if not resumable_only:
            changed = [k for k in changed if k.startswith("model.")]
        else:
            changed = [k for k in changed if k not in _RESUMABLE_CHANGES]
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
            raise CheckpointError(f"{path}: checkpoint is from another configuration ({detail})")
    codes = codes_fingerprint(getattr(sids, "codes", None))
    if ckpt["codes"] != codes:
        raise CheckpointError(
            f"{path}: checkpoint was trained with other semantic IDs "
            f"(checkpoint {ckpt['codes']!r}, given {codes!r})"
        )


def load_checkpoint(
    path: str | Path,
    store: _core.SequenceStore,
    sids: Any = None,
    embeddings: np.ndarray | None = None,
    device: torch.device | None = None,
    item_fingerprint: str | None = None,
    apply_blend: bool = True,
    item_text: Sequence[str] | None = None,
) -> tuple[Recommender, RunConfig]:
    """The model of a checkpoint (eval mode) and its config, after checking dataset and codes
    (and the dataset's item-id fingerprint, when given and recorded), with the text blend the
    checkpoint holds attached (h2rec.blend; ``apply_blend=False``: without it), which reads
    ``item_text`` (the dataset's ``Dataset.item_text``) or, for an older blend, the
    ``embeddings``."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    try:
        cfg = config_from_saved(ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its config does not load: {err}") from err
    if not cfg.model.uses_sids:
        sids = None  # SASRec ignores semantic IDs
    check_codes(sids, store.n_items)
    _verify_checkpoint(path, ckpt, store, sids, None, False, item_fingerprint)
    seed_everything(cfg.train.seed)
    model = build_for(cfg, store, sids, embeddings)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model}: {err}") from err
    model.to(device or torch.device("cpu"))
    model.eval()
    if apply_blend:
        from h2rec.blend import apply_record

        apply_record(model, ckpt.get("text_blend"), embeddings, str(path), item_text,
                     store.popularity(holdout=2))
    return model, cfg


def checkpoint_blend(path: str | Path) -> dict[str, Any] | None:
    """The text blend record a checkpoint holds (None: none was chosen for it)."""
    return _read_checkpoint(Path(path)).get("text_blend")


def set_checkpoint_blend(path: str | Path, record: dict[str, Any] | None) -> None:
    """Rewrite the checkpoint ``path`` (atomically) holding the text blend ``record``, or none."""
    ckpt = _read_checkpoint(Path(path))
    if record is None:
        if "text_blend" not in ckpt:
            return
        ckpt.pop("text_blend")
    else:
        ckpt["text_blend"] = record
    _save_checkpoint(Path(path), ckpt)
