"""The training loop: sample, step, validate, keep the best, stop early, test.

One call, :func:`train`, reads top to bottom:

1. check the inputs (codes and embeddings against the dataset, a checkpoint to resume against
   the dataset, codes and model) before anything is trained;
2. seed once, build the model, the optimiser and the Rust ``TrainSampler``;
3. every epoch: batches from ``sampler.epoch(epoch, rank, world_size)``, recommendation loss plus
   the model's alignment losses, one optimiser step per batch; validation NDCG@10 every
   ``eval_every`` epochs; ``best.pt`` when it improves; ``last.pt`` (everything needed to resume,
   RNG states included) after every epoch; early stop after ``patience`` validations without a
   better NDCG@10;
4. reload the best checkpoint, evaluate it on the test split, write the report.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA); rank r trains on batches r, r + world_size, ... and evaluates its share of
users; only rank 0 writes files. On CUDA the forward pass runs under bf16 autocast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from h2rec import _core
from h2rec.config import RunConfig, config_from_dict, config_to_dict, save_config
from h2rec.errors import CheckpointError, ConfigError, DataError, H2RecError
from h2rec.evaluate import (
    EvalResult,
    bucket_labels,
    eval_users,
    evaluate,
    result_from_ranks,
)
from h2rec.report import atomic_writer, write_report, write_text_atomic
from h2rec.threads import auto_threads, set_threads

if TYPE_CHECKING:
    from h2rec.models import Recommender

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

logger = logging.getLogger(__name__)

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
    "eval.batch_size",
    "eval.max_scores_mb",
    "train.loss_memory_mb",
}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path | None  # where its files are (None when run without a directory)
    best_epoch: int  # epoch of the best validation NDCG@10 (0 = the untrained model)
    best_valid_ndcg10: float  # that NDCG@10
    epochs_run: int  # epochs completed, resumed ones included
    stopped_early: bool  # patience ran out before train.epochs
    history: list[dict[str, Any]]  # one record per epoch: loss, validation metrics, seconds
    test: EvalResult | None  # the best checkpoint on the test split (rank 0 and others alike)
    model: Recommender  # the best model (unwrapped), on the training device


# --------------------------------------------------------------------------- fingerprints


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


def check_codes(sids: Any, n_items: int, where: str = "codes") -> None:
    """Codes must have one row per item of the dataset."""
    codes = getattr(sids, "codes", None)
    if codes is None:
        return
    if codes.ndim != 2 or codes.shape[0] != n_items:
        raise DataError(
            f"{where}: codes have shape {tuple(codes.shape)} but the dataset has "
            f"n_items={n_items}; build the semantic IDs from this dataset's embeddings"
        )


def _check_embeddings(embeddings: np.ndarray | None, n_items: int, where: str) -> None:
    if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[0] != n_items):
        raise DataError(
            f"{where}: embeddings have shape {tuple(embeddings.shape)} but the dataset has "
            f"n_items={n_items}"
        )


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: the one place a run's global RNGs are set."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a ConfigError."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda': no CUDA device is available")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _cooccurrence_for(cfg: RunConfig, store: _core.SequenceStore, sids: Any) -> Any:
    """PPMI co-occurrence positives mined in Rust from the training prefixes, when H2Rec's
    item-level alignment uses them (None otherwise: the model falls back to same-tuple items)."""
    m = cfg.model
    if m.kind != "h2rec" or not m.align_item or not m.align_item_cooccur or sids is None:
        return None
    from h2rec.models import CooccurrencePositives

    return CooccurrencePositives.from_store(store, codes=np.asarray(sids.codes), holdout=2)


def build_for(
    cfg: RunConfig, store: _core.SequenceStore, sids: Any, embeddings: np.ndarray | None
) -> Recommender:
    """The model ``cfg.model`` describes, for this dataset and these codes."""
    from h2rec.models import build_model

    try:
        popularity = store.popularity(holdout=2) if cfg.model.hid_pop_gate else None
        return build_model(
            cfg.model,
            store.n_items,
            sids,
            embeddings,
            _cooccurrence_for(cfg, store, sids),
            popularity,
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, H2RecError):
            raise
        raise ConfigError(f"model: {err}") from err


# loss="auto" beyond full_softmax_max_items: this many popularity negatives shared per batch
AUTO_SHARED_NEGATIVES = 4096


@dataclass(frozen=True)
class LossPlan:
    """The recommendation loss a run trains with, once ``train.loss="auto"`` is resolved."""

    kind: str  # "bce", "sampled_softmax" or "softmax" (full)
    shared: int  # sampled_softmax: negatives shared by the batch; 0 = the sampler's per position
    popularity: bool  # shared negatives drawn by training popularity (logQ-corrected)


def loss_plan(cfg: RunConfig, n_items: int) -> LossPlan:
    """Resolve ``train.loss``: "auto" is full softmax for catalogues of at most
    ``train.full_softmax_max_items`` items, and sampled softmax with AUTO_SHARED_NEGATIVES (or
    ``train.shared_negatives``) popularity negatives, logQ-corrected, beyond."""
    t = cfg.train
    if t.loss == "auto":
        if n_items <= t.full_softmax_max_items:
            return LossPlan("softmax", 0, False)
        return LossPlan("sampled_softmax", t.shared_negatives or AUTO_SHARED_NEGATIVES, True)
    if t.loss == "full_softmax":
        return LossPlan("softmax", 0, False)
    if t.loss == "sampled_softmax":
        return LossPlan("sampled_softmax", t.shared_negatives, t.negative_sampling == "popularity")
    return LossPlan("bce", 0, False)


class SharedNegatives:
    """Negatives shared by a whole batch, drawn from a fixed distribution over items 1..n.

    Each draw is a pure function of (seed, epoch, step, rank), so runs replay exactly on resume
    and for any thread count. ``log_q`` (n_items + 1,) is the log-probability of each item under
    the distribution (row 0, padding, is -inf), for the logQ correction."""

    def __init__(self, store: _core.SequenceStore, count: int, popularity: bool, seed: int) -> None:
        n = int(store.n_items)
        weights = (
            store.popularity(holdout=2)[1:].astype(np.float64) + 1.0
            if popularity
            else np.ones(n, dtype=np.float64)
        )  # add-one smoothing: every item can be drawn
        q = weights / weights.sum()
        self.count = count
        self.seed = seed
        self.cdf = np.cumsum(q)
        self.cdf[-1] = 1.0
        log_q = np.full(n + 1, -np.inf)
        log_q[1:] = np.log(q)
        self.log_q = torch.from_numpy(log_q).float()  # (n_items + 1,)

    def draw(self, epoch: int, step: int, rank: int) -> np.ndarray:
        """(count,) int64 item ids in 1..n_items, with replacement."""
        rng = np.random.default_rng([self.seed, epoch, step, rank])
        u = rng.random(self.count)
        return np.searchsorted(self.cdf, u, side="right").astype(np.int64) + 1


class TrainStep(nn.Module):
    """Wraps the model so that the whole loss is one ``forward`` (what DDP synchronises)."""

    log_q: torch.Tensor | None

    def __init__(
        self,
        model: Recommender,
        cfg: RunConfig,
        plan: LossPlan | None = None,
        log_q: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model: Recommender = model
        self.plan = plan or loss_plan(cfg, model.n_items)
        self.last_only = cfg.train.last_only
        self.max_logits = max(cfg.train.loss_memory_mb * 2**20 // 4, 1)
        self.log_q = log_q if self.plan.popularity else None
        # train.loss_scale="epoch": mean positions per batch over the epoch (see positions_per_batch)
        self.position_scale: float | None = None

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs (B, T), targets (B, T), negatives (B, T, n) or shared (S,) -> (loss, parts)."""
        from h2rec.losses import recommendation_loss

        states = self.model(inputs)  # (B, T, E)
        log_q = self.log_q.to(states.device) if self.log_q is not None else None
        rec = recommendation_loss(
            self.model,
            states,
            targets,
            negatives,
            kind=self.plan.kind,
            last_only=self.last_only,
            max_logits=self.max_logits,
            log_q=log_q,
        )
        if self.position_scale is not None:  # sum over positions / the epoch's mean per batch
            real = targets[:, -1:] if self.last_only else targets
            rec = rec * ((real > 0).sum().to(rec.dtype) / self.position_scale)
        parts = {"rec": rec}
        for name, value in self.model.aux_losses(inputs, states, targets).items():
            parts[name] = value
        total = sum(parts.values(), torch.zeros((), device=rec.device))
        return total, parts


def positions_per_batch(sampler: _core.TrainSampler, last_only: bool) -> float:
    """Mean number of trained positions per batch over an epoch (the same for every epoch:
    only the grouping of users into batches changes)."""
    total = batches = 0
    for _, targets, _ in sampler.epoch(0):
        real = targets[:, -1:] if last_only else targets
        total += int((real > 0).sum())
        batches += 1
    return total / max(batches, 1)


def _unused_parameters(
    step: nn.Module, sampler: _core.TrainSampler, device: torch.device
) -> list[str]:
    """Names of trainable parameters that one training step leaves without a gradient.

    DDP must be told when there are any. The probe step runs on a batch of epoch 0 (training
    starts at epoch 1) with the RNG state forked, so it changes nothing the run depends on."""
    inputs, targets, negatives = next(iter(sampler.epoch(0)))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss, _ = step(*(torch.from_numpy(a).to(device) for a in (inputs, targets, negatives)))
        loss.backward()
    names = [n for n, p in step.named_parameters() if p.requires_grad and p.grad is None]
    step.zero_grad(set_to_none=True)
    return names


# --------------------------------------------------------------------------- checkpoints


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
        old = _flat(ckpt["config"])
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
) -> tuple[Recommender, RunConfig]:
    """The model of a checkpoint (eval mode) and its config, after checking dataset and codes
    (and the dataset's item-id fingerprint, when given and recorded)."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
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
    return model, cfg


# --------------------------------------------------------------------------- evaluation helper


def _evaluate_all(
    model: Recommender,
    store: _core.SequenceStore,
    split: str,
    cfg: RunConfig,
    world: int,
    rank: int,
) -> EvalResult:
    """Evaluate on this process's share of users; gather the ranks of every process."""
    users = eval_users(store)
    if world == 1:
        return evaluate(model, store, split, cfg.eval, cfg.model.max_len, users=users)  # type: ignore[arg-type]
    part = evaluate(model, store, split, cfg.eval, cfg.model.max_len, users=users[rank::world])  # type: ignore[arg-type]
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, (part.users, part.targets, part.ranks, part.input_lengths))
    cat = [np.concatenate([s[i] for s in shards]) for i in range(4)]
    order = np.argsort(cat[0], kind="stable")
    u, t, r, lengths = (a[order] for a in cat)
    return result_from_ranks(split, cfg.eval, store, u, t, r, lengths, part.n_candidates)


# --------------------------------------------------------------------------- the loop


def train(
    cfg: RunConfig,
    store: _core.SequenceStore,
    sids: Any = None,
    embeddings: np.ndarray | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    item_fingerprint: str | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``store``; return the best model and its test metrics.

    ``sids``: a ``SemanticIds`` (or anything with ``.codes``) for SID models; ``embeddings``:
    item text embeddings (n_items, D) when the model uses them. Files go to ``run_dir``
    (``config.json``, ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``metrics.json``,
    ``results.md``, ``ndcg10_by_popularity.png``); an existing run is an error unless
    ``resume`` (continue it exactly) or ``overwrite``. ``on_epoch_end(epoch, record)`` is called
    after each epoch's checkpoint is written. ``item_fingerprint`` (the dataset's
    ``Dataset.item_fingerprint``) is recorded in the checkpoints and checked on resume."""
    # 1. checks before anything is trained
    rank, world, local_rank = _dist_env()
    if not cfg.model.uses_sids:
        sids = None  # SASRec ignores semantic IDs
    check_codes(sids, store.n_items)
    _check_embeddings(embeddings, store.n_items, "embeddings")
    out = Path(run_dir) if run_dir is not None else None
    last_path = out / "last.pt" if out else None
    best_path = out / "best.pt" if out else None
    ckpt: dict[str, Any] | None = None
    if out is not None and last_path is not None:
        if resume:
            ckpt = _read_checkpoint(last_path)
            _verify_checkpoint(last_path, ckpt, store, sids, cfg, True, item_fingerprint)
        elif (last_path.exists() or (out / "metrics.json").exists()) and not overwrite:
            raise H2RecError(
                f"{out}: a run already exists there; pass --overwrite to replace it "
                "or --resume to continue it"
            )
    elif resume:
        raise ConfigError("resume needs a run directory")
    if not cfg.model.causal and not cfg.train.last_only:
        raise ConfigError(
            "model.causal=false with train.last_only=false: without the causal mask position t "
            "reads item t+1, which is its own training target; set train.last_only=true "
            "(train on each sequence's last position only) or keep model.causal=true"
        )

    device = resolve_device(cfg.train.device, local_rank)
    if device.type == "cpu":
        set_threads(cfg.train.num_threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_amp = device.type == "cuda" and cfg.train.amp
    is_main = rank == 0

    # 2. seed once, build everything
    seed_everything(cfg.train.seed)
    model = build_for(cfg, store, sids, embeddings).to(device)
    plan = loss_plan(cfg, int(store.n_items))
    shared = (
        SharedNegatives(store, plan.shared, plan.popularity, cfg.train.seed)
        if plan.shared > 0
        else None
    )
    step_module: nn.Module = TrainStep(model, cfg, plan, shared.log_q if shared else None)
    logger.info(
        "loss: %s%s",
        plan.kind,
        f" with {plan.shared} shared {'popularity' if plan.popularity else 'uniform'} negatives"
        if shared
        else "",
    )
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    try:
        sampler = _core.TrainSampler(
            store,
            cfg.model.max_len,
            cfg.train.batch_size,
            cfg.train.n_negatives,
            cfg.train.seed,
            negative_sampling=cfg.train.negative_sampling,
            last_only=cfg.train.last_only,
            bucket_batches=cfg.train.length_buckets,
            trim=True,
        )
    except ValueError as err:  # e.g. a user whose training prefix holds every item
        raise DataError(f"dataset: {err}; drop such users or use a larger catalogue") from err
    if sampler.n_batches == 0:
        raise DataError("dataset: no user has a training item (every sequence is shorter than 3)")
    if cfg.train.loss_scale == "epoch":
        assert isinstance(step_module, TrainStep)
        step_module.position_scale = positions_per_batch(sampler, cfg.train.last_only)
    if cfg.train.compile:  # batch widths vary with the length buckets: dynamic shapes
        step_module = torch.compile(step_module, dynamic=True)  # type: ignore[assignment]
    if world > 1:
        unused = _unused_parameters(step_module, sampler, device)
        if unused:
            logger.info("DDP: %d parameters get no gradient (%s)", len(unused), unused[0])
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(unused),
        )

    start_epoch, best_ndcg, best_epoch, bad_evals, stopped = 1, -1.0, 0, 0, False
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"]) + 1
        best_ndcg = float(ckpt["best_metric"])
        best_epoch = int(ckpt["best_epoch"])
        bad_evals = int(ckpt["bad_evals"])
        stopped = bool(ckpt["stopped"])
        history = json.loads(ckpt["history"])
        _set_rng_state(ckpt["rng"])
        logger.info("resuming %s after epoch %d", last_path, start_epoch - 1)
    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
        if ckpt is None:
            for stale in ("best.pt", "last.pt", "metrics.jsonl", "metrics.json", "results.md",
                          "ndcg10_by_popularity.png"):
                (out / stale).unlink(missing_ok=True)
    data_fp = dataset_fingerprint(store)
    codes_fp = codes_fingerprint(getattr(sids, "codes", None))
    cfg_dict = config_to_dict(cfg)

    def payload(epoch: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": cfg_dict,
            "dataset": data_fp,
            "items_sha256": item_fingerprint,
            "codes": codes_fp,
            "model": state,
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "best_metric": best_ndcg,
            "best_epoch": best_epoch,
            "bad_evals": bad_evals,
            "stopped": stopped,
            "history": json.dumps(history),
            "rng": _rng_state(),
        }

    # 3. the epochs
    show_bar = is_main and sys.stderr.isatty()
    best_state: dict[str, torch.Tensor] | None = None
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if stopped:
            break
        if device.type == "cpu" and cfg.train.num_threads == 0:
            threads = auto_threads()  # fewer when other processes hold CPUs right now
            if threads != torch.get_num_threads():
                logger.info("epoch %d: %d torch threads (CPUs free now)", epoch, threads)
                set_threads(threads)
        t0 = time.perf_counter()
        model.train()
        total, n_steps, n_seqs = 0.0, 0, 0
        parts_sum: dict[str, float] = {}
        batches = sampler.epoch(epoch, rank, world)
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=-(-sampler.n_batches // world), desc=f"epoch {epoch}", leave=False)
        # the sampler gives every rank the same number of batches, so DDP needs no join()
        for step_index, (inputs, targets, negatives) in enumerate(batches):
            if shared is not None:
                negatives = shared.draw(epoch, step_index, rank)  # (S,)
            inputs_t = _to_device(inputs, device)
            targets_t = _to_device(targets, device)
            negatives_t = _to_device(negatives, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, parts = step_module(inputs_t, targets_t, negatives_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            total += float(loss.detach())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach())
            n_steps += 1
            n_seqs += inputs.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / n_steps:.4f}")
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": total / max(n_steps, 1),
            **{f"loss_{k}": v / max(n_steps, 1) for k, v in parts_sum.items()},
            "train_seconds": train_s,
            "sequences_per_second": n_seqs / train_s if train_s > 0 else None,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        }
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            valid = _evaluate_all(model, store, "valid", cfg, world, rank)
            ndcg = valid.ndcg10
            record["valid"] = valid.metrics
            if ndcg > best_ndcg:
                best_ndcg, best_epoch, bad_evals = ndcg, epoch, 0
                # every rank keeps the best weights in memory: runs without a directory, and
                # ranks that cannot see rank 0's files, test the same model
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if best_path is not None and is_main:
                    _save_checkpoint(best_path, payload(epoch, model.state_dict()))
            else:
                bad_evals += 1
                if cfg.train.patience > 0 and bad_evals >= cfg.train.patience:
                    stopped = True
            logger.info(
                "epoch %d  loss %.4f  valid NDCG@10 %.4f HR@10 %.4f  best %.4f (epoch %d)  %.1fs",
                epoch,
                record["loss"],
                ndcg,
                valid.metrics["HR@10"],
                best_ndcg,
                best_epoch,
                time.perf_counter() - t0,
            )
        else:
            logger.info("epoch %d  loss %.4f  %.1fs", epoch, record["loss"], train_s)
        record["epoch_seconds"] = time.perf_counter() - t0  # training and validation
        record["finished_at"] = time.time()  # wall clock, for time-to-quality measurements
        history.append(record)
        if out is not None and is_main and last_path is not None:
            _save_checkpoint(last_path, payload(epoch, model.state_dict()))
            lines = "".join(json.dumps(r) + "\n" for r in history)
            write_text_atomic(out / "metrics.jsonl", lines)
        if world > 1:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if stopped:
            logger.info("early stop: no better validation NDCG@10 in %d validations", bad_evals)
    epochs_run = len(history)  # an early stop leaves the loop one epoch past the last run

    # 4. the best checkpoint on the test split
    if best_state is not None:
        model.load_state_dict(best_state)
    elif best_path is not None and best_path.exists():  # best epoch before a resume
        best = _read_checkpoint(best_path)
        model.load_state_dict(best["model"])
    elif best_epoch == 0 and best_path is not None and is_main:
        _save_checkpoint(best_path, payload(0, model.state_dict()))  # untrained: epochs=0
    if world > 1:
        dist.barrier()
    test = _evaluate_all(model, store, "test", cfg, world, rank)
    logger.info("test (best epoch %d): %s", best_epoch, _short(test.metrics))
    if out is not None and is_main:
        write_report(
            out,
            {_model_name(cfg): test.to_dict()},
            bucket_labels(cfg.eval.buckets),
            extra={
                "run": cfg.name,
                "best_epoch": best_epoch,
                "best_valid_ndcg10": best_ndcg,
                "epochs_run": epochs_run,
                "stopped_early": stopped,
                "dataset": data_fp,
            },
        )
    return TrainResult(
        run_dir=out,
        best_epoch=best_epoch,
        best_valid_ndcg10=best_ndcg,
        epochs_run=epochs_run,
        stopped_early=stopped,
        history=history,
        test=test,
        model=model,
    )


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: CPU tensors share the array; CUDA copies go through pinned
    memory without blocking, so the copy overlaps the work already queued on the GPU."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _model_name(cfg: RunConfig) -> str:
    return str(cfg.model.kind)


def _short(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
