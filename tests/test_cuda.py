"""The CUDA path: losses and models agree with the CPU, bf16 autocast training, torch.compile.

Skipped where no CUDA device is present (CI has none); ``benches/gpu.sh`` runs them on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from h2rec.config import RunConfig, apply_overrides
from h2rec.data import load_dataset
from h2rec.embed import EmbedOptions, embed_texts
from h2rec.losses import fused_full_softmax
from h2rec.semantic_ids import build_sid
from h2rec.synthetic import SyntheticConfig, builtin_dataset
from h2rec.train import TrainStep, build_for, seed_everything, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("builtin")
    ds = load_dataset(builtin_dataset(root, SyntheticConfig(n_users=300, n_items=200, seed=0)))
    emb = embed_texts(ds.item_text, EmbedOptions(dim=32))
    return {"store": ds.store, "sids": build_sid(emb, n_levels=3, codebook_size=16, seed=0)}


def _cfg(*o: str) -> RunConfig:
    return apply_overrides(RunConfig(), ["model.hidden=32", "model.max_len=20", *o])


def test_fused_softmax_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    user, items = torch.randn(300, 16, generator=g), torch.randn(1000, 16, generator=g)
    tgt = torch.randint(0, 1000, (300,), generator=g)
    for max_logits in (10**9, 5000):
        cpu = fused_full_softmax(user, items, tgt, max_logits)
        gpu = fused_full_softmax(user.cuda(), items.cuda(), tgt.cuda(), max_logits)
        assert float(gpu) == pytest.approx(float(cpu), rel=1e-5)


@pytest.mark.parametrize("kind", ["sasrec", "h2rec"])
def test_model_loss_on_cuda_matches_cpu(data: dict[str, Any], kind: str) -> None:
    cfg = _cfg(f"model.kind={kind}", "model.dropout=0.0")
    seed_everything(0)
    model = build_for(cfg, data["store"], data["sids"], None)
    from h2rec import _core

    x, y, n = (torch.from_numpy(a) for a in next(iter(_core.TrainSampler(data["store"], 20, 32, 1, 0).epoch(1))))
    cpu_loss, _ = TrainStep(model, cfg)(x, y, n)
    model.cuda()
    gpu_loss, _ = TrainStep(model, cfg)(x.cuda(), y.cuda(), n.cuda())
    assert float(gpu_loss.detach()) == pytest.approx(float(cpu_loss.detach()), rel=1e-4)


@pytest.mark.parametrize("compile_", [False, True])
def test_bf16_training_on_cuda(data: dict[str, Any], compile_: bool) -> None:
    cfg = _cfg("model.kind=h2rec", "train.epochs=2", "train.device=cuda", f"train.compile={str(compile_).lower()}")
    res = train(cfg, data["store"], data["sids"], run_dir=None)
    assert res.epochs_run == 2 and res.test is not None
    assert np.isfinite([h["loss"] for h in res.history]).all()
    assert 0.0 <= res.test.ndcg10 <= 1.0
