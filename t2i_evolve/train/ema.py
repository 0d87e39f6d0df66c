"""Exponential moving average of trainable weights, checkpointed with the rest of the training state."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class EMA:
    """Shadow copies of `params`, updated after every optimizer step.

    The decay warms up as (1 + n) / (10 + n), so a short run is not dominated by its random init.
    `applied()` swaps the averaged weights in (for evaluation and for saving) and back out.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.shadow = [s.to(p.device).float() for s, p in zip(state["shadow"], self.params)]
        self.updates = int(state["updates"])
