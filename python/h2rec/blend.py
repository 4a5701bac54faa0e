"""Text blend: the text-match term added to a trained model's scores, its weight picked on the
validation split.

A rare item is rarely a training target, so its ID and code vectors learn little; its text says
what it is. After training, ``score(u, i) = model(u, i) + beta * <q_u, e_i>`` with q_u the
decayed sum of the (unit-norm) text embeddings of the user's items (h2rec.models.text_match, the
weight fixed) and beta chosen from BLEND_GRID by validation NDCG@10 (ties: the smaller beta).
The test split is never read. Trained jointly instead (``model.text_match``), the ID part
leans on the text for popular items and the tail gets worse; added to a model trained without
it, it lifts the tail (Beauty validation, H2Rec: tail NDCG@10 0.0413 -> 0.0462 at beta = 2).

The choice is saved in ``best.pt`` itself (a readable copy: ``text_blend.json`` beside it);
``load_checkpoint`` attaches it, so evaluation, ``recommend``, the exports and serving score with
it, wherever the checkpoint is copied to.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from h2rec.errors import CheckpointError, ConfigError
from h2rec.models.config import TEXT_KINDS

logger = logging.getLogger(__name__)

BLEND_FILE = "text_blend.json"
BLEND_FORMAT = "h2rec-text-blend"
BLEND_VERSION = 1
BLEND_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLEND_DECAY = 0.5  # q_u weighs the item k steps back by exp(-0.5 k)


def blend_applies(cfg: Any, embeddings: np.ndarray | None) -> bool:
    """Whether a run of ``cfg`` gets a text blend: ``train.text_blend="auto"``, a model that
    reads item text (SID-only, fusion, H2Rec; SASRec stays hash IDs only) without a jointly
    trained text match, and item embeddings to read."""
    return (
        cfg.train.text_blend == "auto"
        and cfg.model.kind in TEXT_KINDS
        and not cfg.model.text_match
        and embeddings is not None
    )


def embeddings_digest(embeddings: np.ndarray) -> str:
    """sha256 of the float32 embedding rows: a blend is only applied with the same text."""
    return hashlib.sha256(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes()).hexdigest()


def attach(model: Any, embeddings: np.ndarray, weight: float, decay: float = BLEND_DECAY) -> None:
    """Give ``model`` (trained without a text match) the text-match term with a fixed weight:
    its states and item vectors gain the text columns. The text rows are not saved with the
    model's weights (its ``state_dict`` is unchanged)."""
    from h2rec.models.text_match import TextMatch

    base = getattr(model, "_blend_base_dim", None)
    if base is None:
        if getattr(model, "text_match", None) is not None:
            raise ConfigError("text blend: the model already trains a text match (model.text_match)")
        base = model.out_dim
        model._blend_base_dim = base
    device = next(model.parameters()).device
    model.text_match = TextMatch(
        base, embeddings, model.n_items, decay, 1.0, learned=False, weight=weight
    ).to(device)
    model.out_dim = base + model.text_match.dim


def detach(model: Any) -> None:
    """Undo :func:`attach`."""
    base = getattr(model, "_blend_base_dim", None)
    if base is not None:
        model.text_match = None
        model.out_dim = base
        del model._blend_base_dim


def choose(
    model: Any, embeddings: np.ndarray, evaluate_valid: Callable[[Any], Any]
) -> dict[str, Any]:
    """Evaluate the validation split at every weight of BLEND_GRID (``evaluate_valid(model)``:
    an ``EvalResult`` of the validation split, gathered over every process under DDP); attach
    the best (by NDCG@10, the smaller weight on a tie) and return the record to save."""
    table: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    best_w, best_v = 0.0, -1.0
    for w in BLEND_GRID:
        if w == 0.0:
            detach(model)
        elif getattr(model, "_blend_base_dim", None) is None:
            attach(model, embeddings, w)
        else:  # the text rows are already there: change the weight only
            model.text_match.fixed = float(w)
        result = evaluate_valid(model)
        ndcg = float(result.metrics["NDCG@10"])
        table[f"{w:g}"] = ndcg
        groups[f"{w:g}"] = {
            g: m["NDCG@10"] for g, m in result.groups.items() if g in ("head", "tail")
        }  # None for an empty group
        if ndcg > best_v:
            best_w, best_v = w, ndcg
    if best_w > 0:  # the text rows are attached (the grid ends above 0): set the weight
        model.text_match.fixed = float(best_w)
    else:
        detach(model)
    logger.info(
        "text blend: weight %g (validation NDCG@10 %.4f; %g: %.4f)",
        best_w, best_v, 0.0, table["0"],
    )
    return {
        "format": BLEND_FORMAT,
        "version": BLEND_VERSION,
        "weight": best_w,
        "decay": BLEND_DECAY,
        "chosen_by": "validation NDCG@10",
        "valid_ndcg10": table,
        "valid_ndcg10_head_tail": groups,  # for the record: the choice reads only the above
        "embeddings_sha256": embeddings_digest(embeddings),
    }


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A blend record, checked: format, version, weight >= 0, decay >= 0, the embeddings' hash."""
    try:
        ok = record.get("format") == BLEND_FORMAT and record.get("version") == BLEND_VERSION
        weight, decay = float(record["weight"]), float(record["decay"])
        digest = record["embeddings_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{where}: not a readable text blend: {err!r}") from err
    if not ok or not (np.isfinite(weight) and np.isfinite(decay) and weight >= 0 and decay >= 0):
        raise CheckpointError(
            f"{where}: not an h2rec text blend (format {record.get('format')!r}, version "
            f"{record.get('version')!r}, weight {record.get('weight')!r}, decay "
            f"{record.get('decay')!r})"
        )
    if not isinstance(digest, str):
        raise CheckpointError(f"{where}: text blend without the sha256 of its embeddings")
    return record


def apply_record(
    model: Any, record: dict[str, Any] | None, embeddings: np.ndarray | None, where: str
) -> float:
    """Attach the blend ``record`` (from a checkpoint; None: none) to ``model``; its weight."""
    if record is None:
        return 0.0
    record = check_record(record, where)
    weight = float(record["weight"])
    if weight == 0.0:
        return 0.0
    cfg = model.cfg
    if cfg.kind not in TEXT_KINDS or getattr(model, "text_match", None) is not None:
        raise CheckpointError(
            f"{where}: holds a text blend, which a {cfg.kind} model"
            f"{' with model.text_match' if cfg.text_match else ''} never gets"
        )
    if embeddings is None:
        raise ConfigError(
            f"{where}: the run scores with a text blend, which needs the item embeddings it was "
            "chosen with: give data.embeddings (--embeddings) or keep the dataset's "
            "embeddings.npy"
        )
    if embeddings_digest(embeddings) != record["embeddings_sha256"]:
        raise CheckpointError(
            f"{where}: its text blend was chosen with other item embeddings than the ones given "
            "(embeddings_sha256 differs); choose it again: h2rec blend RUN --overwrite"
        )
    attach(model, embeddings, weight, float(record["decay"]))
    return weight


def write_copy(run_dir: Path, record: dict[str, Any] | None) -> None:
    """``text_blend.json`` beside the checkpoints: a readable copy of the blend of ``best.pt``
    (the checkpoint holds the blend it scores with); removed when there is none."""
    from h2rec.report import write_text_atomic

    path = Path(run_dir) / BLEND_FILE
    if record is None:
        path.unlink(missing_ok=True)
    else:
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
