"""Tensor operations whose results do not depend on the thread count.

A few PyTorch CPU kernels split their work across threads in ways that change the rounding of
the result (the LayerNorm weight gradient, the fused attention kernel, and the softmax backward
for some row lengths), so a run on two threads would drift from the same run on one. The
replacements here are built from kernels that give the same bits for any thread count.

:func:`linear` and :func:`grouped_linear` run inference products (CPU, float32, no autograd)
on the Rust core's ``gemm``-crate kernels, one thread per call: about 2.3 x torch's MKL
product for the 64-wide layers of evaluation on an AVX-512 AMD CPU; :func:`layer_norm` the
LayerNorm in one pass per row (affine included).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from h2rec import _core

__all__ = ["core_inference", "grouped_linear", "layer_norm", "linear", "softmax"]


# rows shorter than this go through torch's CPU softmax padded with -inf up to it: the kernel
# runs a scalar loop per row below one AVX-512 vector (16 floats), about 5x slower per element
# than its vector loop on the attention weights of short sequences (eval batches of Beauty)
_SHORT_ROW = 16


def _forward(x: Tensor) -> Tensor:
    """``torch.softmax(x, dim=-1)``; on the CPU, rows of 2..15 values padded with -inf to 16 (the
    padding adds exp(-inf) = 0 to every sum) and the result cut back to the row length."""
    n = x.shape[-1] if x.dim() else 1
    if x.device.type == "cpu" and 1 < n < _SHORT_ROW:
        return torch.softmax(F.pad(x, (0, _SHORT_ROW - n), value=float("-inf")), dim=-1)[..., :n]
    return torch.softmax(x, dim=-1)


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension; backward p * (g - sum(g * p)) written out."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        p = _forward(x)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return p * (grad - (grad * p).sum(dim=-1, keepdim=True))


def softmax(x: Tensor) -> Tensor:
    """``torch.softmax(x, dim=-1)`` with a backward that is bit-identical for any thread count.

    The forward is :func:`_forward` with or without a backward to run, so training and
    evaluation compute the same bits (short CPU rows differ from ``torch.softmax`` in the last
    bit). Inside ``torch.jit.trace``, ``torch.compile`` and ``torch.export`` it is
    ``torch.softmax`` itself: a graph keeps no branch on the row length, and the compiler fuses
    the softmax anyway."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return torch.softmax(x, dim=-1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _forward(x)
    return _Softmax.apply(x)  # type: ignore[no-any-return]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def core_inference(*tensors: Tensor | None) -> bool:
    """Whether a product of these tensors may run on the Rust core: plain tensors (no
    subclass, fake or functorch-wrapped one, no fx proxy) on the CPU in float32, no gradient to
    record (backward or forward mode), and no tracer or compiler watching (a graph keeps torch
    ops)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:  # inside a dual level: tangents to carry
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.device.type != "cpu" or t.dtype != torch.float32:
            return False
        if (grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
    return True


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) -> (..., N). Without
    autograd on the CPU it is the Rust core's ``linear`` (same value up to float rounding),
    computed on the calling thread; otherwise ``F.linear``."""
    k, n = x.shape[-1], weight.shape[0]
    if k == 0 or not core_inference(x, weight, bias):
        return F.linear(x, weight, bias)
    out = _core.linear(
        x.detach().reshape(1, -1, k).numpy(),
        weight.detach()[None].numpy(),
        None if bias is None else bias.detach()[None].numpy(),
    )
    return torch.from_numpy(out).view(*x.shape[:-1], n)


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """G linear layers at once: x (G, M, K), weight (G, N, K), bias (G, N) -> (G, M, N), i.e.
    ``torch.baddbmm(bias[:, None], x, weight.transpose(1, 2))``; the Rust core's ``linear`` off
    autograd on the CPU (as :func:`linear`)."""
    if x.shape[-1] == 0 or not core_inference(x, weight, bias):
        prod = torch.bmm(x, weight.transpose(1, 2))
        return prod if bias is None else prod + bias[:, None]
    out = _core.linear(
        x.detach().numpy(), weight.detach().numpy(),
        None if bias is None else bias.detach().numpy(),
    )
    return torch.from_numpy(out)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``. With autograd the normalisation
    is ``F.layer_norm`` and the affine part a broadcast product and sum (the fused kernel sums
    the weight gradient over rows in per-thread chunks, so it would change with the thread
    count); without, the fused kernel, affine included (one pass instead of three)."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        y = F.layer_norm(x, (x.shape[-1],), eps=eps)
        if weight is not None:
            y = y * weight
        return y if bias is None else y + bias
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=eps)
