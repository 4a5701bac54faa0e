"""GPU throughput and time to quality, printed as a table (run by ``benches/gpu.sh``).

- sequences/s of SASRec and H2Rec training steps (default settings, bf16 autocast, optionally
  ``torch.compile``) on Amazon Beauty and on a generated catalogue of 1M items;
- seconds from the start to validation NDCG@10 >= 0.060 of a default H2Rec run on Beauty, and
  of SASRec to 0.050.

Usage: ``python benches/gpu_throughput.py [--device cuda] [--compile] [--epochs N]``. Runs on
CPU too (``--device cpu``) for a dry run; Beauty is read from ../shared/data (never copied).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import h2rec  # noqa: F401  (thread policy before torch)
import torch
from h2rec import _core
from h2rec.config import RunConfig, apply_overrides
from h2rec.train import SharedNegatives, TrainStep, build_for, loss_plan, seed_everything, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def beauty(root: Path) -> dict[str, Any]:
    from h2rec.data import load_dataset, prepare
    from h2rec.embed import EmbedOptions, embed_texts
    from h2rec.semantic_ids import build_sid

    src = DATA / "beauty"
    out = prepare(src / "user_sequence.txt", root / "beauty", items=src / "products_lookup.csv")
    ds = load_dataset(Path(out))
    emb = embed_texts(ds.item_text, EmbedOptions(dim=256))
    sids = build_sid(emb, n_levels=3, codebook_size=256, n_iter=20, seed=0)
    return {"store": ds.store, "sids": sids}


def generated(n_users: int, n_items: int, seed: int = 0) -> dict[str, Any]:
    """Power-law item popularity, lengths 5..60, SIDs from random 3 x 256 codes."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 61, n_users)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=int(lengths.sum()), p=pop / pop.sum()) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    store = _core.SequenceStore(offsets, items.astype(np.int64), n_items)

    class Sids:
        codes = rng.integers(0, 256, (n_items, 3))
        codebooks = rng.standard_normal((3, 256, 64)).astype(np.float32)

    return {"store": store, "sids": Sids()}


def throughput(data: dict[str, Any], kind: str, device: torch.device, compile_: bool, steps: int) -> float:
    cfg = apply_overrides(RunConfig(), [f"model.kind={kind}"])
    seed_everything(0)
    store = data["store"]
    model = build_for(cfg, store, data["sids"], None).to(device)
    plan = loss_plan(cfg, int(store.n_items))
    shared = SharedNegatives(store, plan.shared, plan.popularity, 0) if plan.shared else None
    step: Any = TrainStep(model, cfg, plan, shared.log_q if shared else None).to(device)
    if compile_:
        step = torch.compile(step, dynamic=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = _core.TrainSampler(store, 50, cfg.train.batch_size, 1, 0, bucket_batches=16, trim=True)
    n = 0
    t0 = 0.0
    for i, (x, y, neg) in enumerate(sampler.epoch(1)):
        if i == 5:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        if i == steps + 5:
            break
        if shared is not None:
            neg = shared.draw(1, i, 0)
        args = [torch.from_numpy(a).pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                else torch.from_numpy(a) for a in (x, y, neg)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = step(*args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def time_to(data: dict[str, Any], kind: str, threshold: float, device: str, epochs: int) -> dict[str, Any]:
    cfg = apply_overrides(
        RunConfig(), [f"model.kind={kind}", f"train.device={device}", f"train.epochs={epochs}"]
    )
    start = time.time()
    reached: list[float] = []

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        v = record.get("valid", {}).get("NDCG@10", 0.0)
        if v >= threshold and not reached:
            reached.append(record["finished_at"] - start)
        print(f"  {kind} epoch {epoch}: valid NDCG@10 {v:.4f} at {record['finished_at'] - start:.1f}s",
              flush=True)

    res = train(cfg, data["store"], data["sids"], run_dir=None, on_epoch_end=on_epoch)
    return {"seconds_to_threshold": reached[0] if reached else None, "best_valid": res.best_valid_ndcg10,
            "test_ndcg10": res.test.ndcg10 if res.test else None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        b = beauty(Path(tmp))
        big = generated(100_000, 1_000_000)
        for name, data in (("beauty", b), ("generated-1M-items", big)):
            for kind in ("sasrec", "h2rec"):
                sps = throughput(data, kind, device, args.compile, args.steps)
                out[f"{name}/{kind}/sequences_per_second"] = round(sps, 1)
                print(f"{name:20s} {kind:7s} {sps:10.1f} sequences/s", flush=True)
        if not args.skip_quality:
            out["sasrec_to_0.050"] = time_to(b, "sasrec", 0.050, args.device, args.epochs)
            out["h2rec_to_0.060"] = time_to(b, "h2rec", 0.060, args.device, args.epochs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
