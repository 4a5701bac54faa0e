"""The Rust core's inference kernels against numpy oracles (float64 sums of the definitions):
the CSR product in float32 (and added in place), full-ranking item scores, the text blend's
scores and linear layers; their errors; and h2rec.ops choosing them (and the fused LayerNorm)
only off autograd on the CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from h2rec import _core, ops


def _csr(rng: np.random.Generator, n: int, m: int, per_row: int = 5) -> tuple[np.ndarray, ...]:
    counts = rng.integers(0, per_row + 1, size=n)
    counts[0] = 0  # an empty row
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = rng.integers(0, m, size=int(indptr[-1])).astype(np.int64)
    data = rng.normal(size=indices.size).astype(np.float32)
    return indptr, indices, data


def _dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, m: int) -> np.ndarray:
    a = np.zeros((indptr.size - 1, m))
    for r in range(indptr.size - 1):
        for j in range(indptr[r], indptr[r + 1]):
            a[r, indices[j]] += data[j]
    return a


@pytest.mark.parametrize("k", [1, 64, 150])
def test_float32_csr_product_and_its_in_place_sum(k: int) -> None:
    rng = np.random.default_rng(k)
    n, m = 90, 30
    indptr, indices, data = _csr(rng, n, m)
    x = rng.normal(size=(m, k)).astype(np.float32)
    want = _dense(indptr, indices, data, m) @ x.astype(np.float64)
    got = _core.csr_matmul(indptr, indices, data, x, n_threads=1)
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for threads in (2, None):  # the same bits for any thread count
        assert np.array_equal(_core.csr_matmul(indptr, indices, data, x, n_threads=threads), got)
    base = rng.normal(size=(n, k)).astype(np.float32)
    out = base.copy()
    assert _core.csr_matmul(indptr, indices, data, x, out=out) is out
    assert np.array_equal(out, base + got)  # the bits of adding the product afterwards


def test_csr_product_errors() -> None:
    indptr, indices, data = np.array([0, 1, 2]), np.array([0, 1]), np.ones(2, np.float32)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        _core.csr_matmul(indptr, indices, data, x, out=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.csr_matmul(indptr, indices, data, x, out=np.zeros((3, 2), np.float32).T)
    ro = np.zeros((2, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="not writable"):
        _core.csr_matmul(indptr, indices, data, x, out=ro)
    with pytest.raises(TypeError, match="float32"):
        _core.csr_matmul(indptr, indices, data, x.astype(np.float64), out=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="outside"):
        _core.csr_matmul(indptr, np.array([0, 2]), data, x)


def test_item_scores_are_inner_products() -> None:
    rng = np.random.default_rng(3)
    items = rng.normal(size=(1001, 24)).astype(np.float32)
    states = rng.normal(size=(37, 24)).astype(np.float32)
    out = np.full((1001, 37), np.nan, np.float32)
    assert _core.item_scores(items, states, out) is out
    np.testing.assert_allclose(out, items.astype(np.float64) @ states.T.astype(np.float64), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        _core.item_scores(items, states[:, :5], out)
    with pytest.raises(ValueError, match="out has shape"):
        _core.item_scores(items, states, out[:, :3].copy())
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.item_scores(items, states, np.zeros((37, 1001), np.float32).T)


def test_text_scores_match_the_profile_definition_bit_for_bit() -> None:
    rng = np.random.default_rng(4)
    n_rows, n_terms, b, t = 60, 25, 9, 7
    indptr, indices, data = _csr(rng, n_rows, n_terms, per_row=4)
    seq = rng.integers(0, n_rows, size=(b, t)).astype(np.int64)
    seq[0, :4] = 0  # left padding
    w = np.exp(-0.5 * np.arange(t - 1, -1, -1)).astype(np.float32)
    a = _dense(indptr, indices, data, n_terms)
    q = np.stack([sum(w[p] * a[seq[u, p]] for p in range(t)) for u in range(b)], axis=1)  # (terms, b)
    want = 2.5 * (a @ q)  # (rows, b)
    got = _core.text_scores(indptr, indices, data, n_terms, seq, w, 2.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the bits of the definition: torch's scatter-add profiles, then each row's plain loop over
    # its entries in index order, products rounded before they are added; torch's own sparse
    # product agrees to rounding only (with MKL on AVX-512 CPUs it uses fused multiply-adds)
    vals, owner, pos = [], [], []
    flat = seq.reshape(-1)
    for f, item in enumerate(flat):
        for j in range(indptr[item], indptr[item + 1]):
            owner.append(f)
            pos.append(j)
    owner_t, pos_t = torch.tensor(owner, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)
    wt = torch.from_numpy(w).repeat(b)
    vals = torch.from_numpy(data)[pos_t] * wt[owner_t]
    qt = torch.zeros(n_terms * b).index_add_(0, torch.from_numpy(indices)[pos_t] * b + owner_t // t, vals)
    qt = qt.view(n_terms, b) * 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                         torch.from_numpy(data), size=(n_rows, n_terms))
        torch_ref = torch.sparse.mm(sparse, qt).numpy()
    qn = qt.numpy()
    ref = np.zeros((n_rows, b), np.float32)
    for r in range(n_rows):
        for j in range(indptr[r], indptr[r + 1]):
            ref[r] = ref[r] + np.float32(data[j]) * qn[indices[j]]
    assert np.array_equal(got, ref)
    np.testing.assert_allclose(got, torch_ref, rtol=1e-6, atol=1e-6)
    base = rng.normal(size=(n_rows, b)).astype(np.float32)
    out = base.copy()
    _core.text_scores(indptr, indices, data, n_terms, seq, w, 2.5, out=out)
    assert np.array_equal(out, base + ref)
    with pytest.raises(ValueError, match="not an item row"):
        _core.text_scores(indptr, indices, data, n_terms, seq + n_rows, w, 1.0)
    with pytest.raises(ValueError, match="weights"):
        _core.text_scores(indptr, indices, data, n_terms, seq, w[:3], 1.0)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_layers_match_numpy(bias: bool) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 50, 16)).astype(np.float32)
    w = rng.normal(size=(3, 12, 16)).astype(np.float32)
    b = rng.normal(size=(3, 12)).astype(np.float32)
    got = _core.linear(x, w, b if bias else None)
    want = np.einsum("gmk,gnk->gmn", x.astype(np.float64), w.astype(np.float64))
    if bias:
        want = want + b[:, None, :]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert _core.linear(x[:, :0], w).shape == (3, 0, 12)
    with pytest.raises(ValueError, match="w has shape"):
        _core.linear(x, w[:, :, :5])
    with pytest.raises(ValueError, match="bias has shape"):
        _core.linear(x, w, b[:, :3])


def test_ops_use_the_core_only_off_autograd() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16)
    lin = torch.nn.Linear(16, 8)
    ln_w, ln_b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    with torch.enable_grad():  # parameters that want gradients: torch's ops, a graph
        y = ops.linear(x, lin.weight, lin.bias)
        z = ops.layer_norm(x, ln_w, ln_b)
        g = ops.grouped_linear(x, lin.weight[None].expand(5, 8, 16), lin.bias[None].expand(5, 8))
    assert y.requires_grad and z.requires_grad and g.requires_grad
    with torch.inference_mode():
        y2 = ops.linear(x, lin.weight, lin.bias)
        z2 = ops.layer_norm(x, ln_w, ln_b)
        g2 = ops.grouped_linear(x, lin.weight[None].expand(5, 8, 16), lin.bias[None].expand(5, 8))
    torch.testing.assert_close(y2, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z2, z.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g2, g.detach(), atol=1e-5, rtol=1e-5)
    # a non-contiguous input is read as what it shows
    xt = torch.randn(16, 9).T
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(xt, lin.weight, lin.bias),
                                   torch.nn.functional.linear(xt, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_a_users_scores_do_not_depend_on_the_block_size() -> None:
    rng = np.random.default_rng(7)
    items = rng.normal(size=(777, 64)).astype(np.float32)
    states = rng.normal(size=(70, 64)).astype(np.float32)

    def scores(s: np.ndarray) -> np.ndarray:
        return _core.item_scores(items, s, np.empty((777, s.shape[0]), np.float32))

    whole = scores(states)
    for b in (1, 2, 3, 17, 64):  # one user is scored as two: the one-column kernel rounds otherwise
        assert np.array_equal(scores(states[:b]), whole[:, :b]), b


# torch's forward-mode AD loads its decompositions through torch.jit.script, which warns
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_ops_call_the_core_only_when_nothing_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _core.linear
    monkeypatch.setattr(ops._core, "linear", lambda *a: calls.append(1) or real(*a))
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    with torch.inference_mode():
        ops.linear(x, lin.weight, lin.bias)
    assert len(calls) == 1
    with torch.enable_grad():  # parameters wanting gradients
        assert ops.linear(x, lin.weight, lin.bias).requires_grad
    import torch.autograd.forward_ad as fwad
    with torch.no_grad(), fwad.dual_level():  # forward-mode tangents to carry
        y = ops.linear(fwad.make_dual(x, torch.ones_like(x)), lin.weight, lin.bias)
        assert fwad.unpack_dual(y).tangent is not None
    with torch.no_grad():
        torch.func.vmap(lambda r: ops.linear(r, lin.weight, lin.bias))(x)  # functorch-wrapped
        ops.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert torch.equal(ops.linear(torch.randn(3, 0), torch.randn(2, 0), torch.ones(2)),
                           torch.ones(3, 2))
    assert len(calls) == 1


def test_text_term_added_in_place_has_the_bits_of_adding_it_afterwards() -> None:
    from h2rec import blend

    rng = np.random.default_rng(8)
    indptr, indices, data = _csr(rng, 50, 20, per_row=4)
    data = np.abs(data)
    rows = blend.TextRows(indptr, indices, data, 20)
    term = blend.TextScores(rows, 2.0)
    seq = torch.from_numpy(rng.integers(0, 50, size=(6, 5)).astype(np.int64))
    added = term(seq)  # (6, 50)
    base = torch.randn(50, 6)
    in_place = base.clone().T  # the layout evaluation scores in: the Rust path
    term.add_to(in_place, seq)
    assert torch.equal(in_place, base.T + added)
    fallback = base.T.contiguous()  # another layout: scores += forward(seq)
    term.add_to(fallback, seq)
    assert torch.equal(fallback, base.T + added)


def test_evaluation_workers_survive_an_error_and_restore_the_thread_count() -> None:
    from h2rec import evaluate as ev

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        done: list[int] = []

        def work(pos: np.ndarray) -> None:
            if int(pos[0]) == 3:
                raise RuntimeError("batch 3 failed")
            done.append(int(pos[0]))

        batches = [np.array([i]) for i in range(8)]
        with pytest.raises(RuntimeError, match="batch 3 failed"):
            ev._run_batches(work, batches, torch.device("cpu"))
        assert torch.get_num_threads() == 2
        done.clear()
        ev._run_batches(lambda pos: done.append(int(pos[0])), batches, torch.device("cpu"))
        assert sorted(done) == list(range(8))
        ev._run_batches(lambda pos: done.append(int(pos[0])), batches[:1], torch.device("cpu"))
        assert len([p for p in ev._POOLS.values() if not p._shutdown]) >= 1
    finally:
        torch.set_num_threads(before)
