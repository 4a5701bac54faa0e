"""Tensor operations whose results do not depend on the thread count.

A few PyTorch CPU kernels split their work across threads in ways that change the rounding of
the result (the LayerNorm weight gradient, the fused attention kernel, and the softmax backward
for some row lengths), so a run on two threads would drift from the same run on one. The
replacements here are built from kernels that give the same bits for any thread count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["softmax"]


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension; backward p * (g - sum(g * p)) written out."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        p = torch.softmax(x, dim=-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        return p * (grad - (grad * p).sum(dim=-1, keepdim=True))


def softmax(x: Tensor) -> Tensor:
    """``torch.softmax(x, dim=-1)`` with a backward that is bit-identical for any thread count.

    Without a backward to run (no grad, or a trace for export) it is
    ``torch.softmax`` itself: the forward is the same computation."""
    if torch.jit.is_tracing() or not (torch.is_grad_enabled() and x.requires_grad):
        return torch.softmax(x, dim=-1)
    return _Softmax.apply(x)  # type: ignore[no-any-return]
