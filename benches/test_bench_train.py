"""Training throughput and full-ranking evaluation time on Amazon Beauty (../shared/data/beauty,
read in place, never copied).

- ``train``: sequences per second of SASRec and H2Rec training steps (forward, recommendation
  loss + alignment losses, backward, Adam step) with the paper's settings (hidden 64, 2 layers,
  max length 50, batch 128, BCE with one negative), on CPU and, when present, CUDA (bf16 autocast).
  H2Rec uses TF-IDF embeddings and 3 x 256 residual k-means SIDs of the Beauty titles.
- ``evaluate``: full ranking (all 12,101 items, history excluded) of every Beauty user's test
  target with an untrained SASRec: the cost of one evaluation pass.

Sizes: by default (CI runs the benches once with ``--benchmark-disable``) 3 training batches and
500 users; ``H2REC_BENCH_FULL=1`` runs one full epoch and all 22,363 users; or set
``H2REC_BENCH_BATCHES`` / ``H2REC_BENCH_EVAL_USERS`` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DATA, FULL, record
from h2rec import _core
from h2rec.config import RunConfig, apply_overrides
from h2rec.evaluate import eval_users, evaluate
from h2rec.train import TrainStep, build_for, seed_everything

N_BATCHES = int(os.environ.get("H2REC_BENCH_BATCHES", "0" if FULL else "3"))  # 0: one epoch
EVAL_USERS = int(os.environ.get("H2REC_BENCH_EVAL_USERS", "0" if FULL else "500"))  # 0: all

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def beauty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = DATA / "beauty"
    if not (src / "user_sequence.txt").exists():
        pytest.skip(f"{src} is not present")
    from h2rec.data import load_dataset, prepare
    from h2rec.embed import EmbedOptions, embed_texts
    from h2rec.semantic_ids import build_sid

    out = prepare(
        src / "user_sequence.txt",
        tmp_path_factory.mktemp("beauty") / "ds",
        items=src / "products_lookup.csv",
    )
    ds = load_dataset(Path(out))
    emb = embed_texts(ds.item_text, EmbedOptions(dim=64))
    sids = build_sid(emb, n_levels=3, codebook_size=256, n_iter=10, seed=0)
    return {"dataset": ds, "store": ds.store, "sids": sids}


def _steps(
    step: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[Any], device: torch.device
) -> int:
    n = 0
    for inputs, targets, negatives in batches:
        x = torch.from_numpy(inputs).to(device)
        y = torch.from_numpy(targets).to(device)
        neg = torch.from_numpy(negatives).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = step(x, y, neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += inputs.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["sasrec", "h2rec"])
def test_train_throughput(benchmark, beauty: dict[str, Any], kind: str, device_name: str) -> None:
    cfg = apply_overrides(RunConfig(), [f"model.kind={kind}"])
    device = torch.device(device_name)
    seed_everything(0)
    model = build_for(cfg, beauty["store"], beauty["sids"], None).to(device)
    step = TrainStep(model, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    sampler = _core.TrainSampler(beauty["store"], cfg.model.max_len, cfg.train.batch_size, 1, 0)
    batches = list(sampler.epoch(1))
    if N_BATCHES:
        batches = batches[:N_BATCHES]
    _steps(step, opt, batches[:1], device)  # warm-up (allocator, autotuning)
    benchmark.group = f"train step, Beauty, {device_name}"
    n = benchmark.pedantic(_steps, args=(step, opt, batches, device), rounds=1, iterations=1)
    assert n == sum(b[0].shape[0] for b in batches)
    seconds = benchmark.stats.stats.mean if benchmark.stats else None  # None: timing disabled
    record(
        benchmark,
        sequences=n,
        batches=len(batches),
        threads=torch.get_num_threads(),
        sequences_per_second=n / seconds if seconds else None,
    )


@pytest.mark.parametrize("device_name", DEVICES)
def test_full_ranking_evaluation(benchmark, beauty: dict[str, Any], device_name: str) -> None:
    cfg = apply_overrides(RunConfig(), ["model.kind=sasrec", "eval.batch_size=512"])
    seed_everything(0)
    model = build_for(cfg, beauty["store"], None, None).to(torch.device(device_name))
    users = eval_users(beauty["store"])
    if EVAL_USERS:
        users = users[:EVAL_USERS]
    benchmark.group = "full-ranking evaluation, Beauty test split"
    res = benchmark.pedantic(
        evaluate,
        args=(model, beauty["store"], "test", cfg.eval, cfg.model.max_len, users),
        rounds=1,
        iterations=1,
    )
    assert res.users.size == users.size and res.n_candidates == beauty["store"].n_items
    assert np.all((res.ranks >= 0) & (res.ranks < res.n_candidates))
    record(
        benchmark,
        users=int(users.size),
        items=int(beauty["store"].n_items),
        threads=torch.get_num_threads(),
    )
