"""Exponential moving average of trainable weights, checkpointed beside the rest of the training state."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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

    def save(self, path: Path) -> None:
        """The shadow weights as safetensors (accelerate would pickle them, and unpickle them freely on resume),
        the update count in its metadata."""
        save_file({str(i): s.contiguous() for i, s in enumerate(self.shadow)}, str(path),
                  metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            updates, shadow = int(f.metadata()["updates"]), [f.get_tensor(str(i)) for i in range(len(f.keys()))]
        if len(shadow) != len(self.shadow) or any(s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise ValueError(f"its EMA holds {len(shadow)} tensors that do not match the model's {len(self.shadow)}")
        self.shadow = [s.to(p.device).float() for s, p in zip(shadow, self.params)]
        self.updates = updates
