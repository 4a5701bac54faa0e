"""Processes and devices: the torchrun ranks, the training device, the process group, the DDP
wrapper, and evaluation with the users split over the ranks.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA); rank r trains on batches r, r + world_size, ... of the epoch, the last
round split evenly so that every user is trained once an epoch and every rank takes as many
steps; each rank evaluates whole batches of one evaluation plan (the ranks of one process with
the same batch size, to the bit); only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from h2rec import _core
from h2rec.config import RunConfig
from h2rec.errors import ConfigError
from h2rec.evaluate import (
    EvalResult, batch_plan, batch_rows, eval_users, evaluate, result_from_ranks,
)
from h2rec.threads import set_threads

if TYPE_CHECKING:
    from h2rec.models import Recommender

# the package's logger, as before the split into modules: log lines keep reading "h2rec.train"
logger = logging.getLogger("h2rec.train")


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


def setup_device(cfg: RunConfig, world: int, local_rank: int) -> torch.device:
    """The device this process trains on, set up: its CPU threads (``train.num_threads``), the
    process group under torchrun, and the current CUDA device."""
    device = resolve_device(cfg.train.device, local_rank)
    if device.type == "cpu":
        set_threads(cfg.train.num_threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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


def wrap_ddp(step: nn.Module, sampler: _core.TrainSampler, device: torch.device) -> nn.Module:
    """``step`` in DistributedDataParallel, told whether some parameters get no gradient."""
    unused = _unused_parameters(step, sampler, device)
    if unused:
        logger.info("DDP: %d parameters get no gradient (%s)", len(unused), unused[0])
    return nn.parallel.DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(unused),
    )


def _evaluate_all(
    model: Recommender,
    store: _core.SequenceStore,
    split: str,
    cfg: RunConfig,
    world: int,
    rank: int,
) -> EvalResult:
    """Evaluate on this process's share of users; gather the ranks of every process."""
    users = eval_users(store, cfg.eval.sample_users, cfg.eval.seed)
    if world == 1:
        return evaluate(model, store, split, cfg.eval, cfg.model.max_len, users=users)  # type: ignore[arg-type]
    # whole batches of one plan, batch i to rank i % world: each batch is cut and computed as
    # one process with that batch size computes it. The ranks agree on the batch size first:
    # the score budget shrinks it by each rank's own thread count, and two plans would split
    # the users differently (some twice, some never).
    # (an object gather, not a tensor all_reduce: nccl would need the tensor on the GPU)
    each: list[Any] = [None] * world
    dist.all_gather_object(each, batch_rows(model, store.n_items, cfg.eval))
    ecfg = dataclasses.replace(cfg.eval, batch_size=min(each))  # within every rank's budget
    plan = batch_plan(model, store, split, ecfg, cfg.model.max_len, users)  # type: ignore[arg-type]
    mine = plan[rank::world]
    share = np.concatenate(mine) if mine else np.empty(0, dtype=np.int64)
    part = evaluate(model, store, split, ecfg, cfg.model.max_len, users=share)  # type: ignore[arg-type]
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, (part.users, part.targets, part.ranks, part.input_lengths))
    cat = [np.concatenate([s[i] for s in shards]) for i in range(4)]
    order = np.argsort(cat[0], kind="stable")
    u, t, r, lengths = (a[order] for a in cat)
    if not np.array_equal(u, users):  # every user once: anything else would skew the metrics
        raise RuntimeError(
            f"distributed evaluation: the ranks evaluated {u.size} users, {np.unique(u).size} "
            f"distinct, of {users.size}"
        )
    return result_from_ranks(split, cfg.eval, store, u, t, r, lengths, part.n_candidates)
