"""Training speed, time to quality and full-ranking evaluation on Amazon Beauty
(../shared/data/beauty, read in place, never copied), and evaluation of a 1M-item catalogue.

- ``epoch``: seconds of one training epoch of SASRec and H2Rec with the default settings
  (hidden 64, 2 layers, max length 50, batch 128, full softmax, length-bucketed batches cut to
  their longest row; H2Rec with TF-IDF 3 x 256 SIDs and both alignment losses), on CPU and, when
  present, CUDA (bf16 autocast).
- ``epoch under load``: the SASRec epoch with another process busy on one core, for h2rec's
  default thread policy and for fixed thread counts (each in a process of its own, started with
  ``setsid`` as job schedulers do). ``spinning`` is two threads with ``OMP_WAIT_POLICY=ACTIVE``,
  what PyTorch's OpenMP does by default.
- ``time to quality`` (``H2REC_BENCH_FULL=1`` only): ``h2rec train`` with default settings
  started as a command and timed from outside, to validation NDCG@10 >= 0.050 (SASRec) and
  >= 0.060 (H2Rec); the seconds at which each validation finished are recorded.
- ``evaluate``: full ranking (all items, history excluded) of every Beauty user's test target.
- ``evaluate 1M items``: a generated catalogue of 1M items, ranked for 100k users (500 in the
  reduced run) under ``eval.max_scores_mb`` (256 MB of scores at once), in a process of its own
  whose RSS before the evaluation and peak RSS during it (``/proc/self/clear_refs``) are
  recorded.

Sizes: by default (CI runs the benches once with ``--benchmark-disable``) 3 training batches,
500 users and a short run on the built-in data; ``H2REC_BENCH_FULL=1`` runs full epochs, all
22,363 users and the time-to-quality runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DATA, FULL, record
from h2rec import _core
from h2rec.config import RunConfig, apply_overrides
from h2rec.evaluate import eval_users, evaluate
from h2rec.train import build_for, seed_everything

N_BATCHES = int(os.environ.get("H2REC_BENCH_BATCHES", "0" if FULL else "3"))  # 0: one epoch
EVAL_USERS = int(os.environ.get("H2REC_BENCH_EVAL_USERS", "0" if FULL else "500"))  # 0: all
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HERE = Path(__file__).resolve().parent


def _beauty_dir(root: Path) -> Path:
    src = DATA / "beauty"
    if not (src / "user_sequence.txt").exists():
        pytest.skip(f"{src} is not present")
    from h2rec.data import prepare
    from h2rec.embed import EmbedOptions, embed_texts, save_embeddings
    from h2rec.semantic_ids import build_sid, save_sids

    out = Path(prepare(src / "user_sequence.txt", root / "beauty", items=src / "products_lookup.csv"))
    from h2rec.data import load_dataset

    ds = load_dataset(out)
    emb = embed_texts(ds.item_text, EmbedOptions(dim=256))
    save_embeddings(emb, out / "embeddings.npy")
    save_sids(build_sid(emb, n_levels=3, codebook_size=256, n_iter=20, seed=0), out / "sid")
    return out


@pytest.fixture(scope="module")
def beauty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from h2rec.data import load_dataset
    from h2rec.semantic_ids import load_sids

    path = _beauty_dir(tmp_path_factory.mktemp("beauty"))
    ds = load_dataset(path)
    return {"path": path, "dataset": ds, "store": ds.store, "sids": load_sids(path / "sid")}


def _prepare(cfg: RunConfig, data: dict[str, Any], device: torch.device) -> Any:
    """What ``train`` sets up before its first epoch (model, loss plan and scale, fused
    optimiser, sampler), with torch's current thread count kept."""
    from h2rec.runs import replace_config
    from h2rec.train.loop import _setup

    train_cfg = replace_config(cfg.train, device=device.type, num_threads=torch.get_num_threads())
    return _setup(replace_config(cfg, train=train_cfg), data["store"], data["sids"], None, None, 0, 1, 0)


def _batches(run: Any, device: torch.device, n_batches: int) -> tuple[int, int]:
    """Train ``n_batches`` (0: all) batches of epoch 1 as ``train`` does; (sequences, batches)."""
    n = b = 0
    for i, (x, y, neg) in enumerate(run.sampler.epoch(1)):
        if n_batches and i >= n_batches:
            break
        if run.shared is not None:
            neg = run.shared.draw(1, i, 0)
        args = [torch.from_numpy(a).to(device) for a in (x, y, neg)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = run.step(*args)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        n, b = n + x.shape[0], b + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n, b


def _epoch(cfg: RunConfig, data: dict[str, Any], device: torch.device, n_batches: int) -> tuple[int, int]:
    """Set up and train ``n_batches`` (0: all) batches (both, untimed: a warm-up)."""
    return _batches(_prepare(cfg, data, device), device, n_batches)


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["sasrec", "h2rec"])
def test_epoch(benchmark, beauty: dict[str, Any], kind: str, device_name: str) -> None:
    from h2rec.threads import set_threads

    cfg = apply_overrides(RunConfig(), [f"model.kind={kind}"])
    device = torch.device(device_name)
    threads = set_threads(0)
    _epoch(cfg, beauty, device, 2)  # warm-up
    benchmark.group = f"training epoch, Beauty, {device_name}"
    n, b = benchmark.pedantic(  # the setup (co-occurrence mining, the loss scale) is not timed
        _batches, setup=lambda: ((_prepare(cfg, beauty, device), device, N_BATCHES), {}),
        rounds=1, iterations=1,
    )
    seconds = benchmark.stats.stats.mean if benchmark.stats else None  # None: timing disabled
    total = -(-beauty["store"].n_users // cfg.train.batch_size)
    record(
        benchmark,
        sequences=n,
        batches=b,
        threads=threads,
        sequences_per_second=n / seconds if seconds else None,
        seconds_per_epoch=seconds * total / b if seconds else None,
    )
    assert b == (N_BATCHES or b) and n > 0


_LOADED = """
import sys, time
import h2rec
import torch
from h2rec.threads import auto_threads
sys.path.insert(0, {here!r})
from test_bench_train import _batches, _epoch, _load, _prepare
threads = {threads}
torch.set_num_threads(auto_threads() if threads == 0 else threads)
data = _load({path!r})
from h2rec.config import RunConfig, apply_overrides
cfg = apply_overrides(RunConfig(), ["model.kind=sasrec"])
_epoch(cfg, data, torch.device("cpu"), 2)
run = _prepare(cfg, data, torch.device("cpu"))
t0 = time.perf_counter()
n, b = _batches(run, torch.device("cpu"), {n_batches})
print(time.perf_counter() - t0, b, torch.get_num_threads())
"""


def _load(path: str) -> dict[str, Any]:
    from h2rec.data import load_dataset
    from h2rec.semantic_ids import load_sids

    ds = load_dataset(path)
    return {"store": ds.store, "sids": load_sids(Path(path) / "sid")}


POLICIES = {"h2rec default": (0, None), "2 threads": (2, None), "1 thread": (1, None),
            "2 threads spinning": (2, "ACTIVE")}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_epoch_under_load(benchmark, beauty: dict[str, Any], policy: str) -> None:
    threads, wait = POLICIES[policy]
    env = dict(os.environ)
    if wait:
        env["OMP_WAIT_POLICY"] = wait
    else:
        env.pop("OMP_WAIT_POLICY", None)
    n_batches = N_BATCHES or 60  # 60 of 175 batches: enough to tell the policies apart
    code = _LOADED.format(here=str(HERE), threads=threads, path=str(beauty["path"]), n_batches=n_batches)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    out: list[str] = []
    try:
        time.sleep(0.5)

        def run() -> None:
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", code], env=env, capture_output=True, text=True,
                    timeout=300, check=True, start_new_session=True,
                )
                out.append(proc.stdout.split()[-3:])
            except subprocess.TimeoutExpired:  # no progress: what spinning waits do under load
                out.append(["inf", str(n_batches), str(threads)])

        benchmark.group = "SASRec training epoch, Beauty, cpu, one core busy"
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        busy.kill()
        busy.wait()
    seconds, batches, used = float(out[0][0]), int(out[0][1]), int(out[0][2])
    total = -(-beauty["store"].n_users // 128)
    per_epoch = seconds * total / batches if np.isfinite(seconds) else None  # None: over 300 s
    record(benchmark, threads=used, batches=batches, seconds_per_epoch=per_epoch)


def _wall_to(metrics_jsonl: Path, start: float, threshold: float) -> tuple[float | None, list[list[float]]]:
    curve = []
    reached = None
    for line in metrics_jsonl.read_text().splitlines():
        r = json.loads(line)
        v = r.get("valid", {}).get("NDCG@10")
        if v is None:
            continue
        t = r["finished_at"] - start
        curve.append([round(t, 1), round(v, 4)])
        if reached is None and v >= threshold:
            reached = t
    return reached, curve


@pytest.mark.parametrize("kind,threshold", [("sasrec", 0.050), ("h2rec", 0.060)])
def test_time_to_quality(benchmark, beauty: dict[str, Any], tmp_path: Path, kind: str, threshold: float) -> None:
    if FULL:  # h2rec's defaults, stopped once the threshold is reached (or after 40 epochs)
        data, extra = str(beauty["path"]), ["--sids", str(beauty["path"] / "sid")]
        sets = [f"model.kind={kind}", "train.epochs=40"]
    else:  # smoke: the built-in data, two epochs
        from h2rec.synthetic import SyntheticConfig, builtin_dataset
        from h2rec.embed import embed_texts
        from h2rec.semantic_ids import build_sid, save_sids
        from h2rec.data import load_dataset

        path = builtin_dataset(tmp_path / "b", SyntheticConfig(n_users=300, n_items=200))
        ds = load_dataset(path)
        save_sids(build_sid(embed_texts(ds.item_text), n_levels=3, codebook_size=16), tmp_path / "sid")
        data, extra = str(path), ["--sids", str(tmp_path / "sid")]
        sets = [f"model.kind={kind}", "train.epochs=2", "model.max_len=20"]
        threshold = 2.0  # never reached: the run goes to its end
    cmd = [sys.executable, "-m", "h2rec.cli", "train", data, *extra, "--name", kind,
           "--output-dir", str(tmp_path / "runs")]
    for s in sets:
        cmd += ["--set", s]
    result: dict[str, Any] = {}
    jsonl = tmp_path / "runs" / kind / "metrics.jsonl"

    def run() -> None:
        start = time.time()
        log = open(tmp_path / f"{kind}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if jsonl.exists() and _wall_to(jsonl, start, threshold)[0] is not None:
                    proc.terminate()  # reached: the rest of the run is not what is measured
                    break
            proc.wait(timeout=3600)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        result["total"] = time.time() - start
        result["reached"], result["curve"] = _wall_to(jsonl, start, threshold)
        if result["reached"] is None and proc.returncode != 0:
            raise RuntimeError((tmp_path / f"{kind}.log").read_text()[-2000:])

    benchmark.group = f"time to validation NDCG@10, Beauty, cpu ({kind} >= {threshold})"
    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, threshold=threshold, seconds_to_threshold=result["reached"],
           seconds_total=result["total"], valid_curve=result["curve"])
    assert result["curve"]


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("kind", ["sasrec", "h2rec", "h2rec+blend"])
def test_full_ranking_evaluation(benchmark, beauty: dict[str, Any], kind: str, device_name: str) -> None:
    """``h2rec+blend``: with the text blend over the items' TF-IDF rows (weight 3), as a
    trained H2Rec run scores by default."""
    from h2rec import blend

    cfg = apply_overrides(RunConfig(), [f"model.kind={kind.split('+')[0]}"])
    seed_everything(0)
    model = build_for(cfg, beauty["store"], beauty["sids"], None).to(torch.device(device_name))
    if kind.endswith("+blend"):
        blend.attach_rows(model, blend.text_rows(beauty["dataset"].item_text), 3.0)
    users = eval_users(beauty["store"])
    if EVAL_USERS:
        users = users[:EVAL_USERS]
    evaluate(model, beauty["store"], "test", cfg.eval, cfg.model.max_len, users[:256])  # warm-up
    benchmark.group = "full-ranking evaluation, Beauty test split"
    res = benchmark.pedantic(
        evaluate, args=(model, beauty["store"], "test", cfg.eval, cfg.model.max_len, users),
        rounds=1, iterations=1,
    )
    assert res.users.size == users.size and res.n_candidates == beauty["store"].n_items
    assert np.all((res.ranks >= 0) & (res.ranks < res.n_candidates))
    record(benchmark, users=int(users.size), items=int(beauty["store"].n_items),
           threads=torch.get_num_threads())


_BIG = """
import sys, time
import numpy as np
import h2rec
import torch
from h2rec import _core
from h2rec.config import EvalConfig, RunConfig, apply_overrides
from h2rec.evaluate import evaluate
from h2rec.train import build_for, seed_everything
n_items, n_users, budget = {n_items}, {n_users}, {budget}
rng = np.random.default_rng(0)
lengths = rng.integers(5, 30, n_users)
pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
items = rng.choice(n_items, size=int(lengths.sum()), p=pop / pop.sum()) + 1
offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
store = _core.SequenceStore(offsets, items.astype(np.int64), n_items)
cfg = apply_overrides(RunConfig(), ["model.kind=sasrec", f"eval.max_scores_mb={{budget}}"])
seed_everything(0)
model = build_for(cfg, store, None, None)
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
del lengths, pop, items  # the generator's arrays; the store holds its own copy
import gc; gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
    f.write("5")
base = status_kb("VmRSS")
t0 = time.perf_counter()
res = evaluate(model, store, "test", cfg.eval, 50)
seconds = time.perf_counter() - t0
peak = status_kb("VmHWM")
print(seconds, base / 1024, peak / 1024, res.users.size)
"""


def test_full_ranking_1m_items(benchmark) -> None:
    n_users = 100_000 if FULL else 500
    code = _BIG.format(n_items=1_000_000, n_users=n_users, budget=256)
    out: list[str] = []

    def run() -> None:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=3600)
        out.extend(proc.stdout.split()[-4:])

    benchmark.group = "full-ranking evaluation, generated 1M items"
    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds, base_mb, peak_mb, users = float(out[0]), float(out[1]), float(out[2]), int(out[3])
    record(benchmark, users=users, items=1_000_000, score_budget_mb=256,
           evaluate_seconds=seconds, rss_before_mb=base_mb, peak_rss_mb=peak_mb)
    assert users == n_users
    # peak RSS during evaluation over the RSS before it: the 256 MB score budget, the states and
    # comparison slabs of one chunk (SASRec scores against its own table, no copy), with room
    assert peak_mb - base_mb < 256 + 150
