"""The optimiser of a run: Adam (or AdamW) over every parameter, or, with
``train.sparse_items``, Adam over the dense parameters and a lazy Adam over the item (HID) table.

A table of a million items is 256 MB at width 64. Dense Adam pays for all of it every step: the
table's gradient is materialised (a 256 MB zeroed buffer, then the batch's rows added) and every
row's moments and weights are read and written, about 0.15 s a step on one core here against a
batch's 0.08 s of model and loss. With ``sparse_items`` the table's gradient is sparse (the rows
the batch looked up) and only those rows' moments and weights are updated (:class:`LazyAdam`,
the lazy Adam of large-vocabulary embedding tables, with ``torch.optim.Adam``'s formulas; torch's
``SparseAdam`` puts eps elsewhere, so that its first step is not Adam's for small gradients).
Rows the batch does not touch keep their moments and weights unchanged, which is where it
departs from dense Adam (whose momentum keeps moving them). The recommendation loss must then be a sampled one: the
full softmax reads every row of the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from h2rec.config import RunConfig
from h2rec.errors import ConfigError


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows of sparse (row-indexed, ``nn.Embedding(sparse=True)``) gradients only.

    For the rows r the step's gradient g has (duplicates summed first, ``coalesce``):
    m_r <- b1 m_r + (1 - b1) g_r, v_r <- b2 v_r + (1 - b2) g_r^2, and
    w_r <- w_r - lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps), t the step count;
    every other row is left alone. Each row is written once, so the result does not depend on
    the thread count."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ConfigError("train.sparse_items: the item table got a dense gradient "
                                      "(something read the whole table)")
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m = state["exp_avg"][rows].mul_(b1).add_(values, alpha=1 - b1)
                v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                state["exp_avg"][rows] = m
                state["exp_avg_sq"][rows] = v
                denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(group["eps"])
                p[rows] = p[rows].addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))


class SplitAdam:
    """Two optimisers stepped as one: ``dense`` over most parameters, ``sparse``
    (:class:`LazyAdam`) over the parameters whose gradients are sparse. ``param_groups`` lists both optimisers'
    groups (the learning-rate schedule sets every group's "lr"), and the state dict holds both."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer) -> None:
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.dense.param_groups, *self.sparse.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict[str, Any]:
        return {"split": 1, "dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("split") != 1:
            raise ConfigError(
                "train.sparse_items: the checkpoint's optimiser state is a dense Adam's; resume "
                "it with the setting it was trained with"
            )
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def item_table(model: nn.Module) -> nn.Embedding | None:
    """The model's hash-ID ``nn.Embedding`` (SASRec, fusion, H2Rec), or None (SID-only)."""
    hid = getattr(model, "hid", None)
    table = getattr(hid, "table", None)
    return table if isinstance(table, nn.Embedding) else None


def check_sparse_items(cfg: RunConfig, loss_kind: str, world: int) -> None:
    """The settings ``train.sparse_items`` cannot be combined with, as clear errors."""
    t = cfg.train
    if not t.sparse_items:
        return
    if loss_kind == "softmax":
        raise ConfigError(
            "train.sparse_items=true needs a sampled loss: the full softmax reads the whole item "
            "table every step; set train.loss=sampled_softmax (with train.shared_negatives) or "
            "bce, or leave train.loss=auto with a catalogue above train.full_softmax_max_items"
        )
    for name, value in (("train.weight_decay", t.weight_decay), ("train.hid_decay", t.hid_decay),
                        ("train.grad_clip", t.grad_clip)):
        if value != 0:
            raise ConfigError(
                f"{name}={value}: not available with train.sparse_items=true (the item table's "
                "lazy Adam updates only the rows a batch touches); set it to 0"
            )
    if world > 1:
        raise ConfigError("train.sparse_items=true: not available under torchrun (world size "
                          f"{world}); train densely there")


def make_optimizer(cfg: RunConfig, model: nn.Module, device: torch.device) -> Any:
    """Adam / AdamW over ``model``'s parameters; with ``train.sparse_items`` (and a model with
    an item table) a :class:`SplitAdam` whose table, switched to sparse gradients, has a
    :class:`LazyAdam` of the same learning rate."""
    t = cfg.train
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    table = item_table(model) if t.sparse_items else None
    params: Iterator[nn.Parameter] | list[nn.Parameter] = model.parameters()
    if table is not None:
        table.sparse = True
        params = [p for p in model.parameters() if p is not table.weight]
    # the fused kernel updates every parameter in one pass (a quarter of the per-tensor loop's
    # time on CPU); it runs on CPU and CUDA, for the float32 parameters models have
    dense = opt_cls(params, lr=t.lr, weight_decay=t.weight_decay,
                    fused=device.type in ("cpu", "cuda"))
    if table is None:
        return dense
    return SplitAdam(dense, LazyAdam([table.weight], lr=t.lr))
