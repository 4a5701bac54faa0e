"""Training: learning happens, resume is exact, two-process DDP on gloo, errors before training."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from h2rec import _core, losses
from h2rec.config import RunConfig, apply_overrides
from h2rec.data import load_dataset
from h2rec.errors import CheckpointError, ConfigError, DataError, H2RecError
from h2rec.evaluate import evaluate
from h2rec.semantic_ids import build_sid
from h2rec.train import build_for, load_checkpoint, seed_everything, train

from conftest import QUICK_TRAIN, small_builtin

FAST = ["model.hidden=32", "model.max_len=20", *QUICK_TRAIN, "sid.codebook_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_builtin(tmp_path_factory.mktemp("builtin"), n_users=300, n_items=200, seed=0,
                         emb_dim=32, levels=3, codebook=16, n_iter=10)


def _cfg(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), [*FAST, *overrides])


def test_training_improves_validation_ndcg(data: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg("model.kind=h2rec", "train.epochs=3", "train.lr=3e-3")
    seed_everything(cfg.train.seed)
    untrained = build_for(cfg, data["store"], data["sids"], None)
    before = evaluate(untrained, data["store"], "valid", cfg.eval, cfg.model.max_len).ndcg10
    result = train(cfg, data["store"], data["sids"], run_dir=tmp_path / "run")
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_valid_ndcg10 > before + 0.02
    # the model handed back is the best one: its validation NDCG@10 is the recorded best
    again = evaluate(result.model, data["store"], "valid", cfg.eval, cfg.model.max_len)
    assert again.ndcg10 == pytest.approx(result.best_valid_ndcg10)
    for name in (
        "config.json",
        "best.pt",
        "last.pt",
        "metrics.jsonl",
        "metrics.json",
        "results.md",
        "ndcg10_by_popularity.png",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_without_a_run_directory_the_best_epoch_is_tested(data: dict[str, Any]) -> None:
    # a large learning rate makes validation NDCG@10 fall after its peak
    cfg = _cfg(
        "model.kind=sasrec", "train.epochs=4", "train.lr=0.3", "train.loss=bce", "train.loss_scale=batch"
    )
    result = train(cfg, data["store"], None, run_dir=None)
    valid = [h["valid"]["NDCG@10"] for h in result.history]
    assert result.best_epoch == int(np.argmax(valid)) + 1
    assert result.best_epoch < 4  # the last epoch is not the best one, so the test can fail
    again = evaluate(result.model, data["store"], "valid", cfg.eval, cfg.model.max_len)
    assert again.ndcg10 == pytest.approx(result.best_valid_ndcg10)


class _Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(data: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg("model.kind=h2rec", "train.epochs=3")
    full = train(cfg, data["store"], data["sids"], run_dir=tmp_path / "full")

    def stop_after_first(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(
            cfg,
            data["store"],
            data["sids"],
            run_dir=tmp_path / "cut",
            on_epoch_end=stop_after_first,
        )
    # a second process would start with other global RNG states: scramble them
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = train(cfg, data["store"], data["sids"], run_dir=tmp_path / "cut", resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = ("train_seconds", "sequences_per_second", "epoch_seconds", "finished_at", "threads")
    for ra, rb in zip(full.history, resumed.history, strict=True):
        assert {k: v for k, v in ra.items() if k not in strip} == {
            k: v for k, v in rb.items() if k not in strip
        }
    assert full.test is not None and resumed.test is not None
    assert full.test.ranks.tolist() == resumed.test.ranks.tolist()
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    last_cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in last_full["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], last_cut["optimizer"]["state"][k]["exp_avg"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, root: str, cfg: RunConfig, sids: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist

    store = load_dataset(Path(root) / "dataset").store
    try:
        result = train(cfg, store, sids, run_dir=Path(root) / "run")
        seqs = sum(r["sequences_per_second"] * r["train_seconds"] for r in result.history)
        torch.save(
            {"state": result.model.state_dict(), "seqs": round(seqs), "test": result.test.ranks},
            Path(root) / f"rank{rank}.pt",
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_process_gloo_ddp(data: dict[str, Any], tmp_path: Path) -> None:
    link = tmp_path / "dataset"
    link.symlink_to(data["dataset"].path, target_is_directory=True)
    cfg = _cfg("model.kind=h2rec", "train.epochs=2")
    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path), cfg, data["sids"]), nprocs=2, join=True
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # gradients were all-reduced: both ranks hold the same weights after different batches
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # rank r trains on batches r, r + 2, ..., the last round split between the ranks: every
    # training user once an epoch (oracle: the batch sizes of a one-process epoch)
    sampler = _core.TrainSampler(data["store"], cfg.model.max_len, cfg.train.batch_size)
    n = sampler.batch_users(1).size
    sizes = [min(cfg.train.batch_size, n - s) for s in range(0, n, cfg.train.batch_size)]
    whole = len(sizes) // 2 * 2 if len(sizes) % 2 else len(sizes) - 2  # batches taken whole
    left = n - sum(sizes[:whole])  # users of the last round, split 2 ways
    expected = [2 * (sum(sizes[r:whole:2]) + (left + 1 - r) // 2) for r in (0, 1)]
    assert [r0["seqs"], r1["seqs"]] == expected
    assert r0["seqs"] + r1["seqs"] == 2 * n
    # each rank evaluated half of the users; the gathered test ranks agree
    assert np.array_equal(r0["test"], r1["test"])
    assert (tmp_path / "run" / "metrics.json").is_file()
    # the weights differ from a single-process run's (the data were split, not repeated)
    single = train(cfg, data["store"], data["sids"], run_dir=None)
    assert any(not torch.equal(v, single.model.state_dict()[k]) for k, v in r0["state"].items())
    # the ranks gathered from the two processes are one process's evaluation to the bit
    model = build_for(cfg, data["store"], data["sids"], None)
    model.load_state_dict(r0["state"])
    alone = evaluate(model, data["store"], "test", cfg.eval, cfg.model.max_len)
    assert np.array_equal(alone.ranks, r0["test"])
    # the run resumes in one process (another world size) for a third epoch over every user
    more = train(_cfg("model.kind=h2rec", "train.epochs=3"), data["store"], data["sids"],
                 run_dir=tmp_path / "run", resume=True)
    assert [h["epoch"] for h in more.history] == [1, 2, 3]
    third = more.history[2]
    assert round(third["sequences_per_second"] * third["train_seconds"]) == n


def _ddp_step_worker(
    rank: int, world: int, port: int, root: str, cfg: RunConfig, sids: Any, scale: float
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist
    from h2rec.train.loop import _setup

    store = load_dataset(Path(root) / "dataset").store
    try:
        run = _setup(cfg, store, sids, None, None, rank, world, rank)
        torch.save(_one_step(run, rank, world, scale), Path(root) / f"step{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_step(run: Any, rank: int, world: int, scale: float) -> dict[str, torch.Tensor]:
    """One optimiser step on rows rank, rank + world, ... of the first batch of epoch 1, the
    summed recommendation loss divided by ``scale``: the gradients ("grad:" + name, all-reduced
    under DDP) and the weights after the step."""
    inputs, targets, negatives = next(iter(run.sampler.epoch(1)))
    step = getattr(run.step, "module", run.step)  # inside DDP or not
    step.position_scale = scale
    rows = slice(rank, None, world)
    args = [torch.from_numpy(np.ascontiguousarray(a[rows])) for a in (inputs, targets, negatives)]
    loss, _ = run.step(*args)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {f"grad:{k}": p.grad.clone() for k, p in run.model.named_parameters()
             if p.grad is not None}
    run.optimizer.step()
    return {**grads, **{k: v.detach().clone() for k, v in run.model.state_dict().items()}}


@pytest.mark.parametrize("kind", ["sasrec", "h2rec"])
def test_two_processes_take_the_step_of_one_on_the_whole_batch(
    data: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    # DDP averages the ranks' gradients: with each rank's summed loss over S and one process's
    # over 2 S (train.loss_scale=epoch scales by positions a batch, and the two ranks' batches
    # make one of twice the users), one Adam step on half a batch each equals one step on the
    # whole batch. Dropout off; H2Rec without its alignment losses, whose in-batch negatives
    # differ between half a batch and the whole.
    from h2rec.train.loop import _setup

    (tmp_path / "dataset").symlink_to(data["dataset"].path, target_is_directory=True)
    cfg = _cfg(f"model.kind={kind}", "model.dropout=0.0", "model.align_item=false",
               "model.align_seq=false", "train.loss=full_softmax")
    mp.spawn(_ddp_step_worker, args=(2, _free_port(), str(tmp_path), cfg, data["sids"], 7.0),
             nprocs=2, join=True)
    r0 = torch.load(tmp_path / "step0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "step1.pt", weights_only=True)
    one = _one_step(_setup(cfg, data["store"], data["sids"], None, None, 0, 1, 0), 0, 1, 14.0)
    seed_everything(cfg.train.seed)  # the initial weights, as _setup builds them
    start = build_for(cfg, data["store"], data["sids"], None).state_dict()
    assert r0.keys() == one.keys()
    largest = max(float(v.abs().max()) for k, v in one.items() if k.startswith("grad:"))
    moved = 0
    for k, v in one.items():
        assert torch.equal(r0[k], r1[k]), k  # the ranks agree exactly
        if k.startswith("grad:"):  # the averaged gradient is the whole batch's
            # to rounding: summed in other orders (atol: a millionth of the largest gradient;
            # a key bias's gradient, which softmax cancels, is all rounding)
            torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-6 * largest,
                                       msg=lambda m: f"{k}: {m}")
            continue
        # Adam's first step moves each weight by about lr * sign(gradient): where the gradient
        # is rounding noise (a key bias, which softmax cancels) the sign is noise too
        g = one.get(f"grad:{k}")
        sure = torch.ones_like(v, dtype=torch.bool) if g is None else g.abs() > 1e-4 * largest
        torch.testing.assert_close(r0[k][sure], v[sure], rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, start[k]))
    assert moved >= len(start) // 2  # the step moved the weights: the comparison is not vacuous


# --------------------------------------------------------------------------- errors first


def _assert_untouched(run: Path) -> None:
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_codes_of_another_dataset_fail_before_training(
    data: dict[str, Any], tmp_path: Path
) -> None:
    bad = dataclasses.replace(data["sids"], codes=data["sids"].codes[:-3])
    with pytest.raises(DataError, match=r"codes.*\(197, 3\).*n_items=200"):
        train(_cfg("model.kind=h2rec"), data["store"], bad, run_dir=tmp_path / "run")
    _assert_untouched(tmp_path / "run")
    emb = np.zeros((5, 4), np.float32)
    with pytest.raises(DataError, match="embeddings"):
        train(_cfg("model.kind=sasrec"), data["store"], None, emb, run_dir=tmp_path / "run")
    _assert_untouched(tmp_path / "run")


def test_bad_config_fails_before_training(data: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="semantic IDs"):
        train(_cfg("model.kind=sid"), data["store"], None, run_dir=tmp_path / "run")
    _assert_untouched(tmp_path / "run")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            train(_cfg("train.device=cuda"), data["store"], None, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="resume"):
        train(_cfg(), data["store"], data["sids"], resume=True)


@pytest.fixture(scope="module")
def sasrec_run(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sasrec") / "run"
    train(_cfg("model.kind=sasrec", "train.epochs=1"), data["store"], None, run_dir=run)
    return run


def test_checkpoint_from_another_dataset_or_model(
    data: dict[str, Any], sasrec_run: Path, tmp_path: Path
) -> None:
    other = _core.SequenceStore.from_sequences([[1, 2, 3, 4]] * 5, n_items=200)
    with pytest.raises(CheckpointError, match="another dataset"):
        load_checkpoint(sasrec_run / "best.pt", other)
    with pytest.raises(CheckpointError, match="another dataset"):
        train(
            _cfg("model.kind=sasrec", "train.epochs=2"),
            other,
            None,
            run_dir=sasrec_run,
            resume=True,
        )
    with pytest.raises(CheckpointError, match=r"another configuration.*model.kind"):
        train(
            _cfg("model.kind=h2rec", "train.epochs=2"),
            data["store"],
            data["sids"],
            run_dir=sasrec_run,
            resume=True,
        )
    other_sids = build_sid(data["embeddings"], n_levels=3, codebook_size=16, n_iter=10, seed=1)
    sid_run = tmp_path / "sid"
    train(_cfg("model.kind=sid", "train.epochs=1"), data["store"], data["sids"], run_dir=sid_run)
    with pytest.raises(CheckpointError, match="other semantic IDs"):
        load_checkpoint(sid_run / "best.pt", data["store"], other_sids)
    with pytest.raises(CheckpointError, match="other semantic IDs"):
        train(
            _cfg("model.kind=sid", "train.epochs=2"),
            data["store"],
            other_sids,
            run_dir=sid_run,
            resume=True,
        )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage, data["store"])
    with pytest.raises(H2RecError, match="--overwrite"):
        train(_cfg("model.kind=sasrec"), data["store"], None, run_dir=sasrec_run)
    model, cfg = load_checkpoint(sasrec_run / "best.pt", data["store"])
    assert cfg.model.kind == "sasrec" and not model.training


@pytest.mark.parametrize(
    "settings",
    [
        (),
        ("model.align_seq_target=sid", "model.item_score=paired"),
        ("model.kind=fusion",),
        ("model.kind=sasrec", "train.ema=0.9", "train.windows=true"),
    ],
)
def test_thread_count_does_not_change_the_run(
    data: dict[str, Any], settings: tuple[str, ...]
) -> None:
    # one thread, two threads, and the per-epoch automatic choice all train the same model, to
    # the bit (MKL's strict reproducible mode, which importing h2rec asks for)
    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    if "train.windows=true" in settings:  # the data has histories longer than max_len
        rows = _core.TrainSampler(data["store"], 20, 16, windows=True).n_rows
        assert rows > _core.TrainSampler(data["store"], 20, 16).n_rows
    runs, weights = [], []
    for threads in ("train.num_threads=1", "train.num_threads=2", "train.num_threads=0"):
        cfg = _cfg("model.kind=h2rec", "train.epochs=2", threads, *settings)
        result = train(cfg, data["store"], data["sids"], run_dir=None)
        assert not losses._POOL._free  # the full-softmax loss's buffers are freed at the end
        runs.append([(h["loss"], h["valid"]["NDCG@10"]) for h in result.history])
        weights.append(result.model.state_dict())
    assert runs[0] == runs[1] == runs[2]
    for other in weights[1:]:
        for k, v in weights[0].items():
            assert torch.equal(v, other[k]), k
    torch.set_num_threads(1)


def test_automatic_threads_follow_free_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from h2rec import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_threads() == 4
    monkeypatch.setattr(threads, "free_cpus", lambda window=0.1: 1.1)
    assert threads.auto_threads() == 1
    monkeypatch.setattr(threads, "free_cpus", lambda window=0.1: 2.8)
    assert threads.auto_threads() == 3
    monkeypatch.setattr(threads, "free_cpus", lambda window=0.1: 0.0)
    assert threads.auto_threads() == 1  # never below one
    monkeypatch.setattr(threads, "free_cpus", lambda window=0.1: None)
    assert threads.auto_threads() == 4  # no /proc/stat: every available CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.default_threads() == 2 and threads.auto_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.default_threads() == 4


def test_free_cpus_reads_a_fraction_of_the_allowed_cpus() -> None:
    from h2rec import threads

    free = threads.free_cpus(0.05)
    assert free is None or 0.0 <= free <= len(os.sched_getaffinity(0))
    assert os.environ.get("OMP_WAIT_POLICY")  # importing h2rec asked for a wait policy


def test_non_causal_all_position_training_is_refused(data: dict[str, Any]) -> None:
    # without the causal mask position t would read its own target, item t+1
    cfg = _cfg("model.kind=sasrec", "train.epochs=1", "model.causal=false")
    with pytest.raises(ConfigError, match="model.causal=false with train.last_only=false"):
        train(cfg, data["store"], None, run_dir=None)
    ok = _cfg("model.kind=sasrec", "train.epochs=1", "model.causal=false", "train.last_only=true")
    assert train(ok, data["store"], None, run_dir=None).epochs_run == 1


def test_auto_loss_switches_to_shared_sampled_softmax_for_big_catalogues(
    data: dict[str, Any],
) -> None:
    from h2rec.train import SharedNegatives, loss_plan

    n = int(data["store"].n_items)
    assert loss_plan(_cfg(), n).kind == "softmax"
    plan = loss_plan(_cfg(f"train.full_softmax_max_items={n - 1}"), n)
    assert plan.kind == "sampled_softmax" and plan.shared > 0 and plan.popularity
    shared = SharedNegatives(data["store"], 5000, True, seed=3)
    a, b = shared.draw(1, 7, 0), shared.draw(1, 7, 0)
    assert (a == b).all() and a.min() >= 1 and a.max() <= n  # a pure function of the keys
    assert not (a == shared.draw(1, 8, 0)).all()
    # drawn in proportion to training popularity + 1, and log_q says so
    pop = data["store"].popularity(holdout=2)[1:] + 1.0
    q = pop / pop.sum()
    np.testing.assert_allclose(np.exp(shared.log_q[1:].numpy()), q, rtol=1e-5)
    counts = np.bincount(np.concatenate([shared.draw(2, i, 0) for i in range(40)]), minlength=n + 1)
    top = int(np.argmax(q)) + 1
    assert counts[top] / counts.sum() == pytest.approx(q[top - 1], rel=0.1)
    # a short run trains with it
    cfg = _cfg("model.kind=h2rec", "train.epochs=1", f"train.full_softmax_max_items={n - 1}")
    res = train(cfg, data["store"], data["sids"], run_dir=None)
    assert np.isfinite(res.history[0]["loss"])


@pytest.mark.parametrize("last_only", [False, True])
def test_epoch_loss_scale_weighs_every_position_the_same_whatever_the_batching(
    data: dict[str, Any], last_only: bool
) -> None:
    """With train.loss_scale=epoch a batch's loss is its sum of per-position cross-entropies
    over the epoch's mean positions per batch, so (fixed weights) an epoch's summed loss is the
    same for length-bucketed and for random batches; the per-batch mean is not."""
    import torch.nn.functional as F

    from h2rec.train import TrainStep, positions_per_batch

    ds = data["dataset"]
    cfg = _cfg("model.kind=sasrec", "train.loss=full_softmax", f"train.last_only={str(last_only).lower()}")
    seed_everything(0)
    model = build_for(cfg, ds.store, None, None)
    model.eval()  # no dropout: the loss is a function of the batch only
    with torch.no_grad():  # spread items apart, so positions' losses differ from log(n_items)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    step = TrainStep(model, cfg)
    totals: dict[tuple[int, str], float] = {}
    for buckets in (0, 4):
        sampler = _core.TrainSampler(ds.store, cfg.model.max_len, 16, 1, 0, last_only=last_only,
                                     bucket_batches=buckets, trim=True)
        scale = positions_per_batch(sampler, last_only)
        batches = list(sampler.epoch(1))
        # the oracle: mean positions per batch counted with numpy
        counts = [int((y[:, -1:] if last_only else y).astype(bool).sum()) for _, y, _ in batches]
        assert scale == pytest.approx(np.mean(counts))
        for mode in ("epoch", "batch"):
            step.position_scale = scale if mode == "epoch" else None
            total = 0.0
            with torch.no_grad():
                for x, y, neg in batches:
                    loss, _ = step(*(torch.from_numpy(a) for a in (x, y, neg)))
                    total += float(loss)
                    if mode == "epoch":  # by hand: summed cross-entropy over all items / scale
                        states = model(torch.from_numpy(x))
                        tgt = torch.from_numpy(y)
                        if last_only:
                            states, tgt = states[:, -1:], tgt[:, -1:]
                        logits = states[tgt > 0] @ model.all_item_vectors()[1:].T
                        ce = F.cross_entropy(logits, tgt[tgt > 0] - 1, reduction="sum")
                        assert float(loss) == pytest.approx(float(ce) / scale, rel=1e-5)
            totals[buckets, mode] = total
    assert totals[0, "epoch"] == pytest.approx(totals[4, "epoch"], rel=1e-5)
    if not last_only:  # bucketed batch means weigh short users' positions up
        assert abs(totals[0, "batch"] - totals[4, "batch"]) > 1e-4 * totals[0, "batch"]


def test_hid_decay_shrinks_the_hash_id_table_after_every_step(data: dict[str, Any]) -> None:
    """train.hid_decay=d: after each optimiser step the HID table (only) is multiplied by
    (1 - lr * d); oracle: the plain loop with that product done by hand."""

    from h2rec.train.loop import _setup, _train_epoch

    lr, decay = 0.01, 5.0
    cfg = _cfg("model.kind=fusion", f"train.lr={lr}", f"train.hid_decay={decay}")
    run = _setup(cfg, data["store"], data["sids"], None, None, 0, 1, 0)
    _train_epoch(run, 1, 0.0, False)  # t0 only stamps the record
    ref = _setup(_cfg("model.kind=fusion", f"train.lr={lr}"), data["store"], data["sids"], None,
                 None, 0, 1, 0)
    assert ref.hid_table is None
    for x, y, neg in ref.sampler.epoch(1):
        loss, _ = ref.step(*(torch.from_numpy(a) for a in (x, y, neg)))
        ref.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ref.optimizer.step()
        with torch.no_grad():
            ref.model.hid.weight.mul_(1.0 - lr * decay)
    got, want = run.model.state_dict(), ref.model.state_dict()
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
    # the decay did something: the table is smaller than without it
    plain = _setup(_cfg("model.kind=fusion", f"train.lr={lr}"), data["store"], data["sids"], None,
                   None, 0, 1, 0)
    _train_epoch(plain, 1, 0.0, False)
    assert float(run.model.hid.weight.detach().norm()) < 0.9 * float(plain.model.hid.weight.detach().norm())
    with pytest.raises(ConfigError, match="train.hid_decay"):
        _cfg("train.hid_decay=-1")

    with pytest.raises(ConfigError, match="model.kind='sid' has no hash-ID table"):
        _setup(_cfg("model.kind=sid", "train.hid_decay=1"), data["store"], data["sids"], None,
               None, 0, 1, 0)


def test_logit_adjust_adds_the_training_popularity_prior_to_the_loss(data: dict[str, Any]) -> None:
    """train.logit_adjust=tau: the step's loss is the plain loss of the same batch with
    tau * log(1 + training interactions) added to every item's logit (oracle: cross-entropy of
    the biased logits by hand; popularity counted with numpy from the training prefixes)."""
    import torch.nn.functional as F

    from h2rec.train.loop import _setup

    tau = 0.7
    store = data["store"]
    run = _setup(_cfg("model.kind=sasrec", "train.loss=full_softmax", f"train.logit_adjust={tau}"),
                 store, None, None, None, 0, 1, 0)
    offsets, items = store.offsets, store.items
    counts = np.zeros(store.n_items + 1)
    for u in range(offsets.size - 1):
        np.add.at(counts, items[offsets[u] : offsets[u + 1] - 2], 1)  # valid and test held out
    bias = run.step.logit_bias
    assert bias is not None
    np.testing.assert_allclose(bias.numpy(), tau * np.log1p(counts), rtol=1e-6)
    run.model.eval()
    x, y, neg = next(iter(run.sampler.epoch(1)))
    with torch.no_grad():
        run.step.position_scale = None
        loss, _ = run.step(*(torch.from_numpy(a) for a in (x, y, neg)))
        states = run.model(torch.from_numpy(x))
        tgt = torch.from_numpy(y)
        logits = states[tgt > 0] @ run.model.all_item_vectors()[1:].T + bias[1:]
        want = F.cross_entropy(logits, tgt[tgt > 0] - 1)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ConfigError, match="train.logit_adjust"):
        _cfg("train.logit_adjust=nan")


def test_a_run_saved_before_item_score_existed_loads_and_resumes_paired(
    data: dict[str, Any], tmp_path: Path
) -> None:
    """Checkpoints written before model.item_score (and train.hid_decay) existed hold neither;
    H2Rec then scored paired, so such a run loads as paired and resumes under those settings,
    while today's default (fused) is refused as another configuration."""
    paired = ("model.kind=h2rec", "model.item_score=paired", "model.align_seq_target=sid")

    def stop_after_first(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise _Interrupt

    run = tmp_path / "old"
    with pytest.raises(_Interrupt):
        train(_cfg(*paired, "train.epochs=2"), data["store"], data["sids"], run_dir=run,
              on_epoch_end=stop_after_first)
    for name in ("best.pt", "last.pt"):  # as an older h2rec wrote them
        ckpt = torch.load(run / name, weights_only=True)
        del ckpt["config"]["model"]["item_score"], ckpt["config"]["train"]["hid_decay"]
        torch.save(ckpt, run / name)
    model, cfg = load_checkpoint(run / "best.pt", data["store"], data["sids"])
    assert cfg.model.item_score == "paired" and model.out_dim == 2 * cfg.model.hidden
    with pytest.raises(CheckpointError, match="item_score: 'paired' -> 'fused'"):
        train(_cfg("model.kind=h2rec", "model.align_seq_target=sid", "train.epochs=2"),
              data["store"], data["sids"], run_dir=run, resume=True)
    resumed = train(_cfg(*paired, "train.epochs=2"), data["store"], data["sids"], run_dir=run,
                    resume=True)
    assert resumed.epochs_run == 2
    # other kinds never had the setting: an old SASRec checkpoint loads as today's
    sas = tmp_path / "sas"
    train(_cfg("model.kind=sasrec", "train.epochs=1"), data["store"], None, run_dir=sas)
    ckpt = torch.load(sas / "last.pt", weights_only=True)
    del ckpt["config"]["model"]["item_score"]
    torch.save(ckpt, sas / "last.pt")
    assert train(_cfg("model.kind=sasrec", "train.epochs=2"), data["store"], None, run_dir=sas,
                 resume=True).epochs_run == 2


def test_a_run_saved_before_the_learning_rate_decay_resumes_with_a_constant_rate(
    data: dict[str, Any], tmp_path: Path
) -> None:
    """Runs saved before train.lr_decay_patience existed trained with a constant rate: such a
    checkpoint reads as lr_decay_patience=0, resumes under it, and today's default (2) is
    refused as another configuration."""
    run = tmp_path / "old"
    train(_cfg("model.kind=sasrec", "train.epochs=1", "train.lr_decay_patience=0"), data["store"],
          None, run_dir=run)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["config"]["train"]["lr_decay_patience"]
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(CheckpointError, match="lr_decay_patience: 0 -> 2"):
        train(_cfg("model.kind=sasrec", "train.epochs=2"), data["store"], None, run_dir=run,
              resume=True)
    assert train(_cfg("model.kind=sasrec", "train.epochs=2", "train.lr_decay_patience=0"),
                 data["store"], None, run_dir=run, resume=True).epochs_run == 2


def test_learning_rate_decays_on_plateaus_and_resumes_with_it(
    data: dict[str, Any], tmp_path: Path
) -> None:
    """train.lr_decay_patience=1: each validation without a better NDCG@10 halves the rate the
    next epoch trains with (oracle: the validation curve); a run cut after an epoch and resumed
    gives the uninterrupted run's weights and rates."""
    cfg = _cfg("model.kind=sasrec", "train.epochs=16", "train.lr=0.05",
               "train.lr_decay_patience=1", "train.lr_decay_factor=0.5")
    full = train(cfg, data["store"], None, run_dir=tmp_path / "full")
    lrs = [h["lr"] for h in full.history]
    best, want = -1.0, 0.05
    for h, lr in zip(full.history, lrs, strict=True):
        assert lr == pytest.approx(want)
        if h["valid"]["NDCG@10"] > best:
            best = h["valid"]["NDCG@10"]
        else:
            want *= 0.5
    assert min(lrs) < 0.05  # the tiny run does plateau

    cut = next(i for i, lr in enumerate(lrs) if lr < 0.05) + 1  # after the first decay
    assert cut < len(lrs)

    def stop(epoch: int, record: dict[str, Any]) -> None:
        if epoch == cut:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, data["store"], None, run_dir=tmp_path / "cut", on_epoch_end=stop)
    resumed = train(cfg, data["store"], None, run_dir=tmp_path / "cut", resume=True)
    assert [h["lr"] for h in resumed.history] == lrs
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="train.lr_decay_factor"):
        _cfg("train.lr_decay_factor=0")


SPARSE = ("model.kind=sasrec", "train.loss=sampled_softmax", "train.shared_negatives=64",
          "train.sparse_items=true")


def test_sparse_items_step_is_adams_on_the_touched_rows_and_leaves_the_others(
    data: dict[str, Any],
) -> None:
    """Step 1 from zero moments equals dense Adam everywhere; after it, a row the batch does not
    touch keeps its weights under the lazy update (dense Adam's momentum moves it), and a row it
    touches follows Adam's formulas with the row's own moments (a numpy oracle)."""
    from h2rec.train.loop import _setup

    store = data["store"]
    runs = {}
    for sparse in (True, False):
        cfg = _cfg(*SPARSE[:-1], f"train.sparse_items={str(sparse).lower()}", "model.dropout=0")
        runs[sparse] = _setup(cfg, store, None, None, None, 0, 1, 0)
    batches = list(runs[True].sampler.epoch(1, 0, 1))
    lr, (b1, b2), eps = 1e-3, (0.9, 0.999), 1e-8
    m = v = None
    for step, (inputs, targets, _) in enumerate(batches[:2]):
        grads = {}
        for sparse, run in runs.items():
            negatives = torch.from_numpy(run.shared.draw(1, step, 0))
            loss, _ = run.step(torch.from_numpy(inputs), torch.from_numpy(targets), negatives)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            table = run.model.hid.table.weight
            grads[sparse] = table.grad.to_dense() if sparse else table.grad.clone()
            before = table.detach().clone()
            run.optimizer.step()
            if sparse:
                assert runs[True].model.hid.table.weight.grad.is_sparse
                g = grads[True].double().numpy()
                if m is None:
                    m, v = np.zeros_like(g), np.zeros_like(g)
                touched = np.abs(g).sum(axis=1) > 0
                m[touched] = b1 * m[touched] + (1 - b1) * g[touched]
                v[touched] = b2 * v[touched] + (1 - b2) * g[touched] ** 2
                t = step + 1
                want = before.double().numpy()
                want[touched] -= lr * (m[touched] / (1 - b1**t)) / (
                    np.sqrt(v[touched] / (1 - b2**t)) + eps)
                np.testing.assert_allclose(table.detach().double().numpy(), want, rtol=0,
                                           atol=1e-7)
                untouched = ~touched
                assert torch.equal(table.detach()[untouched], before[untouched])
        torch.testing.assert_close(grads[True], grads[False])
        a, b = (runs[s].model.state_dict() for s in (True, False))
        if step == 0:  # zero moments: the lazy and the dense update agree everywhere
            for k in a:
                torch.testing.assert_close(a[k], b[k]), k
        else:  # rows of step 1 that step 2 does not touch moved under dense Adam only
            assert m is not None
            moved = (grads[True].abs().sum(1) == 0) & torch.from_numpy(np.abs(m).sum(axis=1) > 0)
            assert bool(moved.any())
            diff = (a["hid.table.weight"] - b["hid.table.weight"]).abs().sum(1)
            assert bool((diff[moved] > 0).all())


def test_sparse_items_resume_and_thread_count_are_exact(
    data: dict[str, Any], tmp_path: Path,
) -> None:
    cfg = _cfg(*SPARSE, "train.epochs=2")
    full = train(cfg, data["store"], None, run_dir=tmp_path / "full")
    assert full.model.hid.table.sparse
    try:
        two = train(_cfg(*SPARSE, "train.epochs=2", "train.num_threads=2"), data["store"], None)
    finally:
        torch.set_num_threads(1)

    def stop_after_first(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, data["store"], None, run_dir=tmp_path / "cut", on_epoch_end=stop_after_first)
    torch.manual_seed(999)
    resumed = train(cfg, data["store"], None, run_dir=tmp_path / "cut", resume=True)
    a = full.model.state_dict()
    for other in (resumed.model.state_dict(), two.model.state_dict()):
        for k in a:
            assert torch.equal(a[k], other[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("extra, message", [
    (("train.loss=full_softmax",), "needs a sampled loss"),
    (("train.weight_decay=0.01",), "train.weight_decay=0.01: not available"),
    (("train.grad_clip=1.0",), "train.grad_clip=1.0: not available"),
    (("train.hid_decay=1.0",), "train.hid_decay=1.0: not available"),
])
def test_sparse_items_refuses_what_it_cannot_do(
    data: dict[str, Any], extra: tuple[str, ...], message: str,
) -> None:
    with pytest.raises(ConfigError, match=message):
        train(_cfg(*SPARSE, "train.epochs=1", *extra), data["store"], None)


def test_sparse_items_refuses_torchrun() -> None:
    from h2rec.train.optim import check_sparse_items

    cfg = _cfg(*SPARSE)
    check_sparse_items(cfg, "sampled_softmax", world=1)
    with pytest.raises(ConfigError, match="not available under torchrun \\(world size 2\\)"):
        check_sparse_items(cfg, "sampled_softmax", world=2)


def test_weight_average_is_the_decayed_mean_of_the_weights_after_every_step(
    data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from h2rec.train import loop

    # a run without the average, its weights recorded after every optimiser step
    snapshots: list[list[np.ndarray]] = []
    make = loop.make_optimizer

    def recording(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> Any:
        optimizer = make(cfg, model, device)
        params = [p for p in model.parameters() if p.requires_grad]
        snapshots.append([p.detach().double().numpy().copy() for p in params])  # the start
        optimizer.register_step_post_hook(
            lambda *_: snapshots.append([p.detach().double().numpy().copy() for p in params])
        )
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    plain = _cfg("model.kind=h2rec", "train.epochs=2")
    train(plain, data["store"], data["sids"], run_dir=tmp_path / "plain")
    monkeypatch.undo()
    decay = 0.9
    averaged = _cfg("model.kind=h2rec", "train.epochs=2", f"train.ema={decay}")
    result = train(averaged, data["store"], data["sids"], run_dir=tmp_path / "avg")

    # the oracle: avg_0 = the initial weights, avg_{t+1} = d_t avg_t + (1 - d_t) w_{t+1},
    # d_t = min(decay, (1 + t) / (10 + t))
    expected = snapshots[0]
    for t, weights in enumerate(snapshots[1:]):
        d = min(decay, (1 + t) / (10 + t))
        expected = [d * a + (1 - d) * w for a, w in zip(expected, weights, strict=True)]
    last_avg = torch.load(tmp_path / "avg" / "last.pt", weights_only=True)
    last_plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    assert last_avg["ema"]["updates"] == len(snapshots) - 1
    shadow = last_avg["ema"]["shadow"]
    assert len(shadow) == len(expected)
    for got, want in zip(shadow, expected, strict=True):
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)
    # training itself goes on from the raw weights: the same bits as without the average
    for k, v in last_plain["model"].items():
        assert torch.equal(v, last_avg["model"][k]), k
    # what is validated is the average: the last epoch's record is its NDCG@10, not the raw one's
    raw_model, _ = load_checkpoint(tmp_path / "plain" / "last.pt", data["store"], data["sids"])
    raw = evaluate(raw_model, data["store"], "valid", averaged.eval, averaged.model.max_len).ndcg10
    model, _ = load_checkpoint(tmp_path / "avg" / "last.pt", data["store"], data["sids"])
    names = last_avg["ema"]["names"]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in zip(names, shadow, strict=True):
            params[name].copy_(value)
    avg_ndcg = evaluate(model, data["store"], "valid", averaged.eval, averaged.model.max_len).ndcg10
    assert result.history[-1]["valid"]["NDCG@10"] == pytest.approx(avg_ndcg)
    assert avg_ndcg != raw
    # and the best checkpoint holds averaged weights, the model handed back is it
    best = torch.load(tmp_path / "avg" / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    if result.best_epoch == 2:
        for name, value in zip(names, shadow, strict=True):
            assert torch.equal(best["model"][name], value), name
    again = evaluate(result.model, data["store"], "valid", averaged.eval, averaged.model.max_len)
    assert again.ndcg10 == pytest.approx(result.best_valid_ndcg10)


def test_resume_continues_the_weight_average_exactly(data: dict[str, Any], tmp_path: Path) -> None:
    cfg = _cfg("model.kind=sasrec", "train.epochs=3", "train.ema=0.95")
    full = train(cfg, data["store"], None, run_dir=tmp_path / "full")

    def stop_after_first(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(cfg, data["store"], None, run_dir=tmp_path / "cut", on_epoch_end=stop_after_first)
    resumed = train(cfg, data["store"], None, run_dir=tmp_path / "cut", resume=True)
    assert [h["valid"] for h in full.history] == [h["valid"] for h in resumed.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["ema"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["ema"]
    assert a["updates"] == b["updates"] > 0
    for x, y in zip(a["shadow"], b["shadow"], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_weight_average_decay_outside_its_range_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="train.ema"):
        _cfg(f"train.ema={value}")
