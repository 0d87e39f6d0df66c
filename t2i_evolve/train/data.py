"""Training data for denoising fine-tuning: prompts + images, with batches that are a pure function of the step.

Batches come from `batch_indices(step, ...)`, not from a stateful iterator: the position in the data is
the step number, so a run resumed from a checkpoint sees exactly the batches it would have seen, and
processes of a multi-GPU run take disjoint slices by their rank.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..files import write_atomically
from ..images import image_size, load_image

IMAGE_MEMORY_GB = 4.0  # decoded training images held in memory up to this; a larger set is read batch by batch


class ImageFiles:
    """Training images read from their files when a batch asks for them, so that a set of any size holds only
    its paths (100,000 images of 1024 px are 300 GB decoded; a few thousand of the shapes world, a few MB, are
    held decoded instead: `TrainingSet.from_files`). An item is a path, or a decoded uint8 (3, H, W) image (a
    set joined with one held in memory). Indexed with a tensor of indices, like the uint8 (N, 3, H, W) tensor
    it stands for; a batch's files are decoded in threads (Pillow decodes without the GIL)."""

    def __init__(self, items: list, size: tuple[int, int]):
        self.items, self.size = items, size  # size: (H, W), every image's

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(decoding_pool().map(self._read, [self.items[i] for i in indices.tolist()])))

    def _read(self, item) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        image = load_image(item)  # (a file deleted or damaged since the set was made: one line naming it)
        if image.size != self.size[::-1]:
            raise UserError(f"training image {item} is {image.width}x{image.height} now, not "
                            f"{self.size[1]}x{self.size[0]} as when training began")
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


@lru_cache(maxsize=1)
def decoding_pool() -> ThreadPoolExecutor:
    """Threads that decode image files (Pillow decodes without the GIL), one pool a process."""
    return ThreadPoolExecutor(8, thread_name_prefix="t2i-evolve-images")


def joined_images(a: torch.Tensor | ImageFiles, b: torch.Tensor | ImageFiles) -> torch.Tensor | ImageFiles:
    """Two sets' images, as one (held in memory if both are)."""
    sizes = [tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else x.size for x in (a, b)]
    if sizes[0] != sizes[1]:
        (h, w), (h2, w2) = sizes
        raise UserError(f"training images differ in size: {w}x{h} and {w2}x{h2}; resize them to one size (the "
                        "model's) first")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat([a, b])
    items = [item for x in (a, b) for item in (list(x.unbind(0)) if isinstance(x, torch.Tensor) else x.items)]
    return ImageFiles(items, sizes[0])


def _held(images: Iterable[Image.Image], n: int, size: tuple[int, int], odd_size=lambda: None) -> torch.Tensor:
    """`n` images of `size` (width, height) as uint8 (n, 3, H, W), filled one image at a time into the array the
    tensor shares: holding the decoded images, their arrays and a stacked copy at once peaked at 3.7x the set's
    size (benchmarks/RESULTS.md, 48th session). `odd_size()` is told of an image of another size (and raises)."""
    width, height = size
    held = np.empty((n, 3, height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        if image.size != size:
            odd_size()
        held[i] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    return torch.from_numpy(held)


def _one_size(prompts: Sequence[str], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) every image has; one line naming the odd ones, with a prompt of each, otherwise."""
    counts = Counter(sizes)
    if len(counts) > 1:  # the rarer sizes, with a prompt of each, so the odd images can be found
        odd = [f"{n} at {w}x{h} (e.g. {prompts[list(sizes).index((w, h))]!r})" for (w, h), n in counts.most_common()[1:4]]
        (w, h), n = counts.most_common(1)[0]
        raise UserError(f"training images differ in size: {n} at {w}x{h}, {', '.join(odd)}; resize them to one "
                        "size (the model's) first")
    return sizes[0]


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
        size = _one_size(prompts, [image.size for image in images]) if images else (0, 0)
        return cls(list(prompts), _held(images, len(images), size))

    @classmethod
    def from_files(cls, prompts: Sequence[str], paths: Sequence[str | Path],
                   max_memory_gb: float = IMAGE_MEMORY_GB) -> "TrainingSet":
        """Prompts and their image files: decoded into memory if they fit `max_memory_gb` (judged by the first
        image; decoding checks every one), else read batch by batch (`ImageFiles`), each file's size read (its header
        only) first: a missing, unreadable or odd-sized image is one line now, not an error hours into training."""
        if not paths:
            return cls(list(prompts), torch.empty(0, 3, 0, 0, dtype=torch.uint8))  # (says the set is empty)
        width, height = image_size(paths[0], "training image")
        if len(paths) * 3 * width * height > max_memory_gb * 2**30:
            width, height = _one_size(prompts, [image_size(path, "training image") for path in paths])
            return cls(list(prompts), ImageFiles(list(paths), (height, width)))
        def odd_size() -> None:  # one line naming the odd sizes, each with a prompt
            _one_size(prompts, [image_size(path, "training image") for path in paths])
        return cls(list(prompts), _held((load_image(path) for path in paths), len(paths), (width, height), odd_size))

    @classmethod
    def from_generator(cls, generator, prompts: Sequence[str], seeds: Sequence[int] | None = None) -> "TrainingSet":
        """Each prompt drawn once by `generator` (seeds 0..n-1 unless given): e.g. a teacher's data."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        return cls.from_images(prompts, generator.generate(list(prompts), seeds))

    @classmethod
    def from_ledger(cls, ledger, status: str = "active", max_memory_gb: float = IMAGE_MEMORY_GB) -> "TrainingSet":
        """The records of a ledger (active ones by default) that have an image."""
        records = [r for r in ledger.records(status) if r.image_path]
        if not records:
            raise UserError(f"no {status} records with images in the ledger at {ledger.run_dir}")
        return cls.from_records(ledger, records, max_memory_gb)

    @classmethod
    def from_records(cls, ledger, records, max_memory_gb: float = IMAGE_MEMORY_GB) -> "TrainingSet":
        """These ledger records' prompts and images (`from_files`)."""
        return cls.from_files([r.prompt for r in records], [ledger.run_dir / r.image_path for r in records],
                              max_memory_gb)

    def mixed_with(self, other: "TrainingSet", share: float) -> "TrainingSet":
        """This set and `other`, `other` making about `share` of the rows. Each set is repeated whole, so
        within a set every image is seen alike (replay: a share of old data keeps a model from forgetting)."""
        if not 0 < share < 1:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        per_own = share * len(self) / ((1 - share) * len(other))  # copies of `other` per copy of this set
        own, theirs = (1, max(1, round(per_own))) if per_own >= 1 else (max(1, round(1 / per_own)), 1)
        mine, others = self.image_rows(), other.image_rows() + len(self.images)
        return TrainingSet(self.prompts * own + other.prompts * theirs,
                           joined_images(self.images, other.images), torch.cat([mine] * own + [others] * theirs))

    def save(self, path: Path) -> Path:
        """Write the set as a manifest (prompts, image files, rows) that `load` reads in another process (a round
        trained under a launcher). Only a set read from files (`ImageFiles` of paths) has one to write."""
        if not isinstance(self.images, ImageFiles) or any(isinstance(i, torch.Tensor) for i in self.images.items):
            raise ValueError("only a set of image files (max_memory_gb=0) can be saved as a manifest")
        rows = None if self.rows is None else self.rows.tolist()
        write_atomically(path, json.dumps({"prompts": self.prompts, "images": [str(i) for i in self.images.items],
                                           "rows": rows}))
        return path

    @classmethod
    def load(cls, path: Path, max_memory_gb: float = IMAGE_MEMORY_GB) -> "TrainingSet":
        """A set `save` wrote."""
        try:
            manifest = json.loads(Path(path).read_text())
            prompts, images, rows = manifest["prompts"], manifest["images"], manifest["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the training-set manifest {path}: {type(e).__name__}: {e}") from None
        if rows is None:
            return cls.from_files(prompts, images, max_memory_gb)
        by_image = [""] * len(images)  # (`from_files` checks each image with a prompt of it)
        for prompt, row in zip(prompts, rows):
            by_image[row] = by_image[row] or prompt
        files = cls.from_files(by_image, images, max_memory_gb)
        return cls(prompts, files.images, torch.tensor(rows, dtype=torch.long))

    def fingerprint(self) -> str:
        """A short hash of the prompts in order and which image each shows: whether a run carried on from another's
        checkpoint trains on the same set (a run split in two) or on another (an evolve round's)."""
        digest = hashlib.sha256("\n".join(self.prompts).encode())
        digest.update(f"{len(self.images)}:".encode() + self.image_rows().numpy().tobytes())
        return digest.hexdigest()[:16]

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
                 prior_share: float = 0.3, max_memory_gb: float = IMAGE_MEMORY_GB) -> TrainingSet:
    """What a judged, evolving set trains on: its active records, with the judge's deletions mixed in at
    `replay_share` (a small set is overtrained, and the base forgets what it deleted) or alone where no
    record is active, and `prior` (the base's own images) at `prior_share`."""
    deleted, memory = replayable_records(ledger), max_memory_gb
    if ledger.count() == 0 and deleted:
        mixed = TrainingSet.from_records(ledger, deleted, memory)
    elif replay_share and deleted:  # (each part's images held in memory if it fits half of it)
        active = TrainingSet.from_ledger(ledger, max_memory_gb=memory / 2)
        mixed = active.mixed_with(TrainingSet.from_records(ledger, deleted, memory / 2), replay_share)
    else:
        mixed = TrainingSet.from_ledger(ledger, max_memory_gb=memory)
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
