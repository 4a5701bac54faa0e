"""The training loop: sample, step, validate, keep the best, stop early, test.

One call, :func:`train`, reads top to bottom:

1. check the inputs (codes and embeddings against the dataset, a checkpoint to resume against
   the dataset, codes and model) before anything is trained (:func:`_check_inputs`);
2. set up the device, seed once, build the model, the optimiser and the Rust ``TrainSampler``
   (:func:`_setup`); restore ``last.pt`` when resuming;
3. every epoch: batches from ``sampler.epoch(epoch, rank, world_size)``, recommendation loss plus
   the model's alignment losses, one optimiser step per batch (:func:`_train_epoch`); validation
   NDCG@10 every ``eval_every`` epochs, ``best.pt`` when it improves, early stop after
   ``patience`` validations without a better NDCG@10 (:func:`_validate`); ``last.pt``
   (everything needed to resume, RNG states included) after every epoch (:func:`_end_epoch`);
4. reload the best weights, evaluate them on the test split (:func:`_test_best`), write the
   report.

On CUDA the forward pass runs under bf16 autocast.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from h2rec import _core
from h2rec.config import RunConfig, save_config
from h2rec.errors import ConfigError, DataError, H2RecError
from h2rec.evaluate import EvalResult, bucket_labels
from h2rec.losses import release_loss_buffers
from h2rec.report import write_report, write_text_atomic
from h2rec.threads import auto_threads, set_threads
from h2rec.train.average import WeightAverage
from h2rec.train.build import _check_embeddings, build_for, check_codes, seed_everything
from h2rec.train.checkpoint import (
    Progress,
    Provenance,
    _read_checkpoint,
    _save_checkpoint,
    _verify_checkpoint,
    checkpoint_payload,
    restore,
    set_checkpoint_blend,
)
from h2rec.train.distributed import _dist_env, _evaluate_all, setup_device, wrap_ddp
from h2rec.train.optim import SplitAdam, check_sparse_items, item_table, make_optimizer
from h2rec.train.step import SharedNegatives, TrainStep, loss_plan, positions_per_batch

if TYPE_CHECKING:
    from h2rec.models import Recommender

# the package's logger, as before the split into modules: log lines keep reading "h2rec.train"
logger = logging.getLogger("h2rec.train")


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


@dataclass(frozen=True)
class _Run:
    """What every epoch of one run works with, set up once by :func:`_setup`."""

    cfg: RunConfig
    store: _core.SequenceStore
    device: torch.device
    rank: int
    world: int
    model: Recommender  # the model itself
    step: nn.Module  # what a batch goes through: the TrainStep, compiled and/or in DDP
    optimizer: torch.optim.Optimizer | SplitAdam
    sampler: _core.TrainSampler
    shared: SharedNegatives | None  # negatives shared by each batch, when the loss plan has them
    out: Path | None  # the run directory (None: no files)
    hid_table: torch.Tensor | None = None  # the hash-ID table when train.hid_decay > 0
    average: WeightAverage | None = None  # the weights' moving average when train.ema > 0

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda" and self.cfg.train.amp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> Path | None:
        return self.out / "last.pt" if self.out else None

    @property
    def best_path(self) -> Path | None:
        return self.out / "best.pt" if self.out else None


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
    item_text: Sequence[str] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``store``; return the best model and its test metrics.

    ``sids``: a ``SemanticIds`` (or anything with ``.codes``) for SID models; ``embeddings``:
    item text embeddings (n_items, D) when the model uses them. Files go to ``run_dir``
    (``config.json``, ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``metrics.json``,
    ``results.md``, ``ndcg10_by_popularity.png``); an existing run is an error unless
    ``resume`` (continue it exactly) or ``overwrite``. ``on_epoch_end(epoch, record)`` is called
    after each epoch's checkpoint is written. ``item_fingerprint`` (the dataset's
    ``Dataset.item_fingerprint``) is recorded in the checkpoints and checked on resume.
    ``item_text`` (the dataset's ``Dataset.item_text``): what the text blend of SID-only,
    fusion and H2Rec runs reads (h2rec.blend; without it, the ``embeddings``)."""
    # 1. checks before anything is trained
    rank, world, local_rank = _dist_env()
    if not cfg.model.uses_sids:
        sids = None  # SASRec ignores semantic IDs
    out = Path(run_dir) if run_dir is not None else None
    ckpt = _check_inputs(cfg, store, sids, embeddings, out, resume, overwrite, item_fingerprint)

    # 2. seed once, build everything; continue from last.pt when resuming
    run = _setup(cfg, store, sids, embeddings, out, rank, world, local_rank)
    start_epoch, progress = 1, Progress()
    if ckpt is not None:
        start_epoch, progress = restore(ckpt, run.model, run.optimizer)
        if run.average is not None:
            run.average.load_state_dict(ckpt["ema"], str(run.last_path))
        logger.info("resuming %s after epoch %d", run.last_path, start_epoch - 1)
    if out is not None and run.is_main:
        _prepare_run_dir(out, cfg, resumed=ckpt is not None)
    provenance = Provenance.of(cfg, store, sids, item_fingerprint)

    # 3. the epochs
    show_bar = run.is_main and sys.stderr.isatty()
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if progress.stopped:
            break
        _adapt_threads(run, epoch)
        t0 = time.perf_counter()
        record = _train_epoch(run, epoch, t0, show_bar)
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            improved = _validate(run, epoch, record, t0, progress, provenance)
            if improved is not None:
                best_state = improved
        else:
            train_s = record["train_seconds"]
            logger.info("epoch %d  loss %.4f  %.1fs", epoch, record["loss"], train_s)
        record["epoch_seconds"] = time.perf_counter() - t0  # training and validation
        record["finished_at"] = time.time()  # wall clock, for time-to-quality measurements
        progress.history.append(record)
        _end_epoch(run, epoch, progress, provenance)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if progress.stopped:
            logger.info(
                "early stop: no better validation NDCG@10 in %d validations", progress.bad_evals
            )
    epochs_run = len(progress.history)  # an early stop leaves the loop one epoch past the last run

    release_loss_buffers()  # the loss's buffers are not needed past the last step

    # 4. the best checkpoint on the test split
    test = _test_best(run, best_state, progress, provenance, embeddings, item_text)
    if out is not None and run.is_main:
        write_report(
            out,
            {_model_name(cfg): test.to_dict()},
            bucket_labels(cfg.eval.buckets),
            extra={
                "run": cfg.name,
                "best_epoch": progress.best_epoch,
                "best_valid_ndcg10": progress.best_metric,
                "epochs_run": epochs_run,
                "stopped_early": progress.stopped,
                "dataset": provenance.dataset,
                "text_blend_weight": blend_weight(run.model),  # in the test figures (0: none)
            },
        )
    return TrainResult(
        run_dir=out,
        best_epoch=progress.best_epoch,
        best_valid_ndcg10=progress.best_metric,
        epochs_run=epochs_run,
        stopped_early=progress.stopped,
        history=progress.history,
        test=test,
        model=run.model,
    )


# --------------------------------------------------------------------------- 1. checks


def _check_inputs(
    cfg: RunConfig,
    store: _core.SequenceStore,
    sids: Any,
    embeddings: np.ndarray | None,
    out: Path | None,
    resume: bool,
    overwrite: bool,
    item_fingerprint: str | None,
) -> dict[str, Any] | None:
    """Check codes, embeddings, the run directory and the configuration before anything is
    trained; return the checkpoint to resume (None when starting afresh)."""
    check_codes(sids, store.n_items)
    _check_embeddings(embeddings, store.n_items, "embeddings")
    last_path = out / "last.pt" if out else None
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
    return ckpt


# --------------------------------------------------------------------------- 2. setup


def _setup(
    cfg: RunConfig,
    store: _core.SequenceStore,
    sids: Any,
    embeddings: np.ndarray | None,
    out: Path | None,
    rank: int,
    world: int,
    local_rank: int,
) -> _Run:
    """The device; then, seeded once, the model, its loss, the optimiser and the sampler."""
    device = setup_device(cfg, world, local_rank)
    seed_everything(cfg.train.seed)
    model = build_for(cfg, store, sids, embeddings).to(device)
    plan = loss_plan(cfg, int(store.n_items))
    shared = (
        SharedNegatives(store, plan.shared, plan.popularity, cfg.train.seed)
        if plan.shared > 0
        else None
    )
    popularity = store.popularity(holdout=2) if cfg.train.logit_adjust else None
    step_module: nn.Module = TrainStep(
        model, cfg, plan, shared.log_q if shared else None, popularity
    )
    logger.info(
        "loss: %s%s",
        plan.kind,
        f" with {plan.shared} shared {'popularity' if plan.popularity else 'uniform'} negatives"
        if shared
        else "",
    )
    check_sparse_items(cfg, plan.kind, world)
    optimizer = make_optimizer(cfg, model, device)
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
            windows=cfg.train.windows,
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
        step_module = wrap_ddp(step_module, sampler, device)
    return _Run(
        cfg=cfg,
        store=store,
        device=device,
        rank=rank,
        world=world,
        model=model,
        step=step_module,
        optimizer=optimizer,
        sampler=sampler,
        shared=shared,
        out=out,
        hid_table=_hid_table(model, cfg.model.kind) if cfg.train.hid_decay > 0 else None,
        average=WeightAverage(model, cfg.train.ema) if cfg.train.ema > 0 else None,
    )


def _hid_table(model: nn.Module, kind: str) -> torch.Tensor:
    """The model's hash-ID table (``model.hid``), for ``train.hid_decay``."""
    table = item_table(model)
    if table is None:
        raise ConfigError(
            f"train.hid_decay: model.kind={kind!r} has no hash-ID table; set it to 0"
        )
    return table.weight


def _prepare_run_dir(out: Path, cfg: RunConfig, resumed: bool) -> None:
    """Create the run directory and write config.json; a fresh run clears the old files."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    (out / "text_blend.json").unlink(missing_ok=True)  # chosen again once training ends
    if not resumed:
        for stale in ("best.pt", "last.pt", "metrics.jsonl", "metrics.json", "results.md",
                      "ndcg10_by_popularity.png"):
            (out / stale).unlink(missing_ok=True)


# --------------------------------------------------------------------------- 3. one epoch


def _adapt_threads(run: _Run, epoch: int) -> None:
    """With ``train.num_threads=0`` on CPU: as many torch threads as there are CPUs free now."""
    if run.device.type == "cpu" and run.cfg.train.num_threads == 0:
        threads = auto_threads()  # fewer when other processes hold CPUs right now
        if threads != torch.get_num_threads():
            logger.info("epoch %d: %d torch threads (CPUs free now)", epoch, threads)
            set_threads(threads)


def _train_epoch(run: _Run, epoch: int, t0: float, show_bar: bool) -> dict[str, Any]:
    """One optimiser step per batch of this rank's share of the epoch; the epoch's record
    (mean losses, speed), timed from ``t0``."""
    cfg, device, model, optimizer = run.cfg, run.device, run.model, run.optimizer
    model.train()
    total, n_steps, n_seqs = 0.0, 0, 0
    parts_sum: dict[str, float] = {}
    batches = run.sampler.epoch(epoch, run.rank, run.world)
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(batches), desc=f"epoch {epoch}", leave=False)
    # the sampler gives every rank the same number of batches, and every user to one rank
    # once an epoch, so DDP needs no join()
    for step_index, (inputs, targets, negatives) in enumerate(batches):
        if run.shared is not None:
            negatives = run.shared.draw(epoch, step_index, run.rank)  # (S,)
        inputs_t = _to_device(inputs, device)
        targets_t = _to_device(targets, device)
        negatives_t = _to_device(negatives, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_amp):
            loss, parts = run.step(inputs_t, targets_t, negatives_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        if run.hid_table is not None:
            with torch.no_grad():
                run.hid_table.mul_(1.0 - optimizer.param_groups[0]["lr"] * cfg.train.hid_decay)
        if run.average is not None:
            run.average.update()
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
    return {
        "epoch": epoch,
        "loss": total / max(n_steps, 1),
        **{f"loss_{k}": v / max(n_steps, 1) for k, v in parts_sum.items()},
        "train_seconds": train_s,
        "sequences_per_second": n_seqs / train_s if train_s > 0 else None,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "lr": optimizer.param_groups[0]["lr"],  # the rate this epoch trained with
    }


def _validate(
    run: _Run,
    epoch: int,
    record: dict[str, Any],
    t0: float,
    progress: Progress,
    provenance: Provenance,
) -> dict[str, torch.Tensor] | None:
    """Validation NDCG@10 into ``record`` and ``progress`` (best so far, patience, early stop);
    ``best.pt`` when it improves. Returns a copy of the weights when they are the new best."""
    model = run.model
    with _averaged(run):  # the weights' moving average, when the run keeps one
        valid = _evaluate_all(model, run.store, "valid", run.cfg, run.world, run.rank)
        ndcg = valid.ndcg10
        record["valid"] = valid.metrics
        best_state = None
        if ndcg > progress.best_metric:
            progress.best_metric, progress.best_epoch, progress.bad_evals = ndcg, epoch, 0
            # every rank keeps the best weights in memory: runs without a directory, and
            # ranks that cannot see rank 0's files, test the same model
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if run.best_path is not None and run.is_main:
                payload = checkpoint_payload(
                    provenance, epoch, model.state_dict(), run.optimizer, progress
                )
                _save_checkpoint(run.best_path, payload)
    if best_state is None:
        progress.bad_evals += 1
        if run.cfg.train.patience > 0 and progress.bad_evals >= run.cfg.train.patience:
            progress.stopped = True
        decay_every = run.cfg.train.lr_decay_patience
        if decay_every > 0 and progress.bad_evals % decay_every == 0 and not progress.stopped:
            # the rate lives in the optimiser's state, so last.pt carries it and a resumed
            # run continues with it
            for group in run.optimizer.param_groups:
                group["lr"] *= run.cfg.train.lr_decay_factor
            logger.info("epoch %d: learning rate now %.3g", epoch,
                        run.optimizer.param_groups[0]["lr"])
    logger.info(
        "epoch %d  loss %.4f  valid NDCG@10 %.4f HR@10 %.4f  best %.4f (epoch %d)  %.1fs",
        epoch,
        record["loss"],
        ndcg,
        valid.metrics["HR@10"],
        progress.best_metric,
        progress.best_epoch,
        time.perf_counter() - t0,
    )
    return best_state


@contextmanager
def _averaged(run: _Run) -> Iterator[None]:
    """The model holds its averaged weights within the block (train.ema), its own without."""
    if run.average is None:
        yield
    else:
        with run.average.applied():
            yield


def _end_epoch(run: _Run, epoch: int, progress: Progress, provenance: Provenance) -> None:
    """``last.pt`` and ``metrics.jsonl`` (rank 0), then wait for every rank."""
    if run.out is not None and run.is_main and run.last_path is not None:
        payload = checkpoint_payload(
            provenance, epoch, run.model.state_dict(), run.optimizer, progress
        )
        if run.average is not None:  # resuming continues the average exactly
            payload["ema"] = run.average.state_dict()
        _save_checkpoint(run.last_path, payload)
        lines = "".join(json.dumps(r) + "\n" for r in progress.history)
        write_text_atomic(run.out / "metrics.jsonl", lines)
    if run.world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- 4. test


def _test_best(
    run: _Run,
    best_state: dict[str, torch.Tensor] | None,
    progress: Progress,
    provenance: Provenance,
    embeddings: np.ndarray | None = None,
    item_text: Sequence[str] | None = None,
) -> EvalResult:
    """Load the best weights (of this run, or of ``best.pt`` when they predate a resume), choose
    their text blend on the validation split (when the run has one, h2rec.blend) and evaluate
    them on the test split; an untrained run (epochs=0) writes its ``best.pt``."""
    model, best_path = run.model, run.best_path
    if best_state is not None:
        model.load_state_dict(best_state)
    elif best_path is not None and best_path.exists():  # best epoch before a resume
        best = _read_checkpoint(best_path)
        model.load_state_dict(best["model"])
    elif progress.best_epoch == 0 and best_path is not None and run.is_main:
        untrained = checkpoint_payload(provenance, 0, model.state_dict(), run.optimizer, progress)
        _save_checkpoint(best_path, untrained)  # untrained: epochs=0
    if run.world > 1:
        dist.barrier()
    from h2rec import blend

    record = None
    if blend.blend_applies(run.cfg, embeddings, item_text):
        record = blend.choose(
            model, embeddings,
            lambda m: _evaluate_all(m, run.store, "valid", run.cfg, run.world, run.rank),
            item_text, run.store.popularity(holdout=2), run.cfg.train.text_blend,
        )
    if run.out is not None and run.is_main and best_path is not None and best_path.exists():
        set_checkpoint_blend(best_path, record)  # best.pt scores with it (or with none)
        blend.write_copy(run.out, record)
    test = _evaluate_all(model, run.store, "test", run.cfg, run.world, run.rank)
    logger.info("test (best epoch %d): %s", progress.best_epoch, _short(test.metrics))
    return test


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: CPU tensors share the array; CUDA copies go through pinned
    memory without blocking, so the copy overlaps the work already queued on the GPU."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def blend_weight(model: Any) -> float:
    """The weight of the text blend attached to ``model`` (h2rec.blend); 0 without one."""
    if getattr(model, "text_blend", None) is not None:  # the TF-IDF rows
        return float(model.text_blend.weight)
    if getattr(model, "_blend_base_dim", None) is None:
        return 0.0
    return float(model.text_match.fixed)  # dense embeddings (version 1)


def _model_name(cfg: RunConfig) -> str:
    return str(cfg.model.kind)


def _short(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
