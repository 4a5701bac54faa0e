"""The evaluation forward's kernels, h2rec's Rust core beside torch (the peer), one thread each:

- ``item scores``: every Beauty item (12,102 rows of 64) against 64 user states, the product
  full ranking repeats for every block of users (``_core.item_scores`` against torch's
  ``items @ states.T``, MKL);
- ``linear``: a 64 -> 64 layer over 1,800 rows, an evaluation batch of Beauty's short sequences
  (``_core.linear`` against ``F.linear``);
- ``text blend``: the text blend's term for 256 users of Beauty-sized TF-IDF rows (12,102 rows,
  5,540 terms, ten terms a row): ``_core.text_scores`` against the scatter-add profiles and
  ``torch.sparse.mm`` it replaces (the same scores, to rounding).

Generated inputs of those shapes, so that the figures need no data. ``H2REC_BENCH_FULL=1``
changes nothing here: the sizes are small either way.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import record

from h2rec import _core

ITEMS, DIM, USERS = 12_102, 64, 64
ROWS = 1_800
TERMS, PER_ROW, BLEND_USERS, BLEND_LEN = 5_540, 10, 256, 8


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", ["h2rec", "torch"])
def test_item_scores(benchmark, impl: str) -> None:
    g = torch.Generator().manual_seed(0)
    items, states = torch.randn(ITEMS, DIM, generator=g), torch.randn(USERS, DIM, generator=g)
    out = np.empty((ITEMS, USERS), np.float32)
    fn = (lambda: _core.item_scores(items.numpy(), states.numpy(), out)) if impl == "h2rec" \
        else (lambda: items @ states.T)
    benchmark.group = "evaluation: item scores, 12,102 items x 64 users"
    benchmark(fn)
    np.testing.assert_allclose(_core.item_scores(items.numpy(), states.numpy(), out),
                               (items @ states.T).numpy(), rtol=1e-4, atol=1e-4)
    record(benchmark, items=ITEMS, users=USERS, dim=DIM)


@pytest.mark.parametrize("impl", ["h2rec", "torch"])
def test_linear(benchmark, impl: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(ROWS, DIM, generator=g), torch.randn(DIM, DIM, generator=g), torch.randn(DIM, generator=g)
    fn = (lambda: _core.linear(x.numpy()[None], w.numpy()[None], b.numpy()[None])) if impl == "h2rec" \
        else (lambda: F.linear(x, w, b))
    benchmark.group = "evaluation: linear layer, 1,800 rows, 64 -> 64"
    benchmark(fn)
    record(benchmark, rows=ROWS, dim=DIM)


@pytest.mark.parametrize("impl", ["h2rec", "torch"])
def test_text_blend(benchmark, impl: str) -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(PER_ROW // 2, PER_ROW * 3 // 2 + 1, ITEMS)
    counts[0] = 0  # padding
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # Zipf-like term frequencies, as words in titles
    p = 1.0 / np.arange(1, TERMS + 1)
    indices = rng.choice(TERMS, size=int(indptr[-1]), p=p / p.sum()).astype(np.int64)
    data = rng.random(indices.size).astype(np.float32)
    seq = rng.integers(1, ITEMS, size=(BLEND_USERS, BLEND_LEN)).astype(np.int64)
    w = np.exp(-0.5 * np.arange(BLEND_LEN - 1, -1, -1)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                         torch.from_numpy(data), size=(ITEMS, TERMS))
    ip_t, ix_t, d_t, w_t = (torch.from_numpy(a) for a in (indptr, indices, data, w))
    seq_t = torch.from_numpy(seq)

    def torch_term() -> torch.Tensor:  # what h2rec.blend ran before
        flat = seq_t.reshape(-1)
        starts, counts_ = ip_t[flat], ip_t[flat + 1] - ip_t[flat]
        owner = torch.repeat_interleave(torch.arange(flat.numel()), counts_)
        first = torch.cumsum(counts_, 0) - counts_
        pos = starts[owner] + torch.arange(owner.numel()) - first[owner]
        vals = d_t[pos] * w_t.repeat(BLEND_USERS)[owner]
        qt = torch.zeros(TERMS * BLEND_USERS).index_add_(0, ix_t[pos] * BLEND_USERS + owner // BLEND_LEN, vals)
        return torch.sparse.mm(sparse, qt.view(TERMS, BLEND_USERS) * 3.0)

    def rust_term() -> np.ndarray:
        return _core.text_scores(indptr, indices, data, TERMS, seq, w, 3.0, n_threads=1)

    benchmark.group = "evaluation: text blend term, 256 users x 12,102 items"
    benchmark(rust_term if impl == "h2rec" else torch_term)
    # the same scores; the bits are the plain loop's (tests/test_core_inference.py), which MKL's
    # CSR product matches on some CPUs and misses in the last bit on others (AVX-512)
    np.testing.assert_allclose(rust_term(), torch_term().numpy(), rtol=1e-5, atol=1e-5)
    record(benchmark, items=ITEMS, terms=TERMS, users=BLEND_USERS, nnz=int(indices.size))
