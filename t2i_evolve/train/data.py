"""Training data for denoising fine-tuning: prompts + images, with batches that are a pure function of the step.

Batches come from `batch_indices(step, ...)`, not from a stateful iterator: the position in the data is
the step number, so a run resumed from a checkpoint sees exactly the batches it would have seen, and
processes of a multi-GPU run take disjoint slices by their rank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError


@dataclass
class TrainingSet:
    """Prompts and their images, held as uint8 (N, 3, H, W) so a few thousand images cost little memory.
    `rows` (one image index per prompt; default: prompt i is image i) repeats images without copying them."""

    prompts: list[str]
    images: torch.Tensor
    rows: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.prompts) == 0:
            raise UserError("the training set is empty")
        rows = len(self.images) if self.rows is None else len(self.rows)
        if len(self.prompts) != rows:
            raise ValueError(f"{len(self.prompts)} prompts but {rows} {'images' if self.rows is None else 'rows'}")

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_images(cls, prompts: Sequence[str], images: Sequence[Image.Image]) -> "TrainingSet":
        sizes = Counter(image.size for image in images)
        if len(sizes) > 1:  # the rarer sizes, with a prompt of each, so the odd images can be found
            odd = [f"{n} at {w}x{h} (e.g. {prompts[[i.size for i in images].index((w, h))]!r})"
                   for (w, h), n in sizes.most_common()[1:4]]
            (w, h), n = sizes.most_common(1)[0]
            raise UserError(f"training images differ in size: {n} at {w}x{h}, {', '.join(odd)}; resize them to one "
                            "size (the model's) first")
        array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
        return cls(list(prompts), torch.from_numpy(array).permute(0, 3, 1, 2).contiguous())

    @classmethod
    def from_generator(cls, generator, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> "TrainingSet":
        """Each prompt drawn once by `generator` (seeds 0..n-1 unless given): e.g. a teacher's data."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        return cls.from_images(prompts, generator.generate(list(prompts), seeds))

    @classmethod
    def from_ledger(cls, ledger, status: str = "active") -> "TrainingSet":
        """The records of a ledger (active ones by default) that have an image."""
        records = [r for r in ledger.records(status) if r.image_path]
        if not records:
            raise UserError(f"no {status} records with images in the ledger at {ledger.run_dir}")
        return cls.from_records(ledger, records)

    @classmethod
    def from_records(cls, ledger, records) -> "TrainingSet":
        """These ledger records' prompts and images."""
        return cls.from_images([r.prompt for r in records], [ledger.load_image(r.image_path) for r in records])

    def mixed_with(self, other: "TrainingSet", share: float) -> "TrainingSet":
        """This set and `other`, `other` making about `share` of the rows. Each set is repeated whole, so
        within a set every image is seen alike (replay: a share of old data keeps a model from forgetting)."""
        if not 0 < share < 1:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        per_own = share * len(self) / ((1 - share) * len(other))  # copies of `other` per copy of this set
        own, theirs = (1, max(1, round(per_own))) if per_own >= 1 else (max(1, round(1 / per_own)), 1)
        mine, others = self.image_rows(), other.image_rows() + len(self.images)
        return TrainingSet(self.prompts * own + other.prompts * theirs,
                           torch.cat([self.images, other.images]), torch.cat([mine] * own + [others] * theirs))

    def image_rows(self) -> torch.Tensor:
        """The image index of each prompt."""
        return torch.arange(len(self.images)) if self.rows is None else self.rows

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at `indices` as float pixels in [-1, 1]."""
        return self.images[indices if self.rows is None else self.rows[indices]].float() / 127.5 - 1.0


def replayable_records(ledger) -> list:
    """A ledger's deleted records that training may go back to: the judge's deletions (what the base had
    learned), not the quality gate's rejects (wrong images)."""
    return [rec for rec in ledger.records("deleted") if rec.deleted_op == "delete" and rec.image_path]


def evolving_set(ledger, replay_share: float = 0.0, prior: TrainingSet | None = None,
                 prior_share: float = 0.3) -> TrainingSet:
    """What a judged, evolving set trains on: its active records, with the judge's deletions mixed in at
    `replay_share` (a small set is overtrained, and the base forgets what it deleted) or alone where no
    record is active, and `prior` (the base's own images) at `prior_share`."""
    deleted = replayable_records(ledger)
    if ledger.count() == 0 and deleted:
        mixed = TrainingSet.from_records(ledger, deleted)
    elif replay_share and deleted:
        mixed = TrainingSet.from_ledger(ledger).mixed_with(TrainingSet.from_records(ledger, deleted), replay_share)
    else:
        mixed = TrainingSet.from_ledger(ledger)
    return mixed.mixed_with(prior, prior_share) if prior else mixed


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(position: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the batch starting at `position` (counted in examples) in a reshuffled-per-epoch stream."""
    positions = torch.arange(position, position + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        mask = positions // n == epoch
        out[mask] = _epoch_order(n, seed, epoch)[positions[mask] % n]
    return out
