"""An exponential moving average of the weights (``train.ema``), the model that is validated,
kept as best and tested.

After every optimiser step each trained parameter's average moves towards it:
``avg <- avg + (1 - d_t) * (p - avg)`` with ``d_t = min(ema, (1 + t) / (10 + t))`` at the t-th
update (t from 0), so the first updates follow the weights closely instead of dragging the random
initialisation along. Validation (and hence ``best.pt``, the test split, ``recommend`` and
serving) uses the averaged weights; training goes on from the raw ones, and ``last.pt`` keeps both
so that a resumed run continues exactly. Elementwise, so the same bits whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from h2rec.errors import ConfigError


class WeightAverage:
    """The moving average of ``model``'s trained floating-point parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema: {decay!r} must be in (0, 1) (0 turns it off)")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if _averaged(p)]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        """The decay of the next update."""
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the parameters as they are after an optimiser step."""
        weight = 1.0 - self.rate()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's parameters hold the averaged weights; the trained ones
        are put back after it (swapped, not copied: no extra memory, nothing rounded)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            trained = p.data
            p.data = self.shadow[i]
            self.shadow[i] = trained

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "names": list(self.names),
            "shadow": [s.detach().clone() for s in self.shadow],
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint's average; ``source`` names the file in errors."""
        if list(state.get("names", [])) != self.names:
            raise ConfigError(f"{source}: its weight average covers other parameters than this model's")
        shadow = state["shadow"]
        for i, (s, p) in enumerate(zip(shadow, self.params)):
            if s.shape != p.shape:
                raise ConfigError(
                    f"{source}: weight average of {self.names[i]} has shape {tuple(s.shape)}, "
                    f"the model's is {tuple(p.shape)}"
                )
            self.shadow[i] = s.to(device=p.device, dtype=p.dtype).clone()
        self.updates = int(state["updates"])


def _averaged(p: nn.Parameter) -> bool:
    return p.requires_grad and p.is_floating_point()
