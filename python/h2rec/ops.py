"""Tensor operations whose results do not depend on the thread count.

A few PyTorch CPU kernels split their work across threads in ways that change the rounding of
the result (the LayerNorm weight gradient, the fused attention kernel, and the softmax backward
for some row lengths), so a run on two threads would drift from the same run on one. The
replacements here are built from kernels that give the same bits for any thread count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["softmax"]


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
