"""Prior preservation for a recipe's training: the base's own images that a judge passed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError
from ..eval.report import write_json
from ..judges.batch import score_images
from .data import IMAGE_MEMORY_GB, TrainingSet


def judged_base_images(folder: Path, base: Callable[[], object], judge, prompts: Sequence[str], seeds: Sequence[int],
                       min_score: float, max_memory_gb: float = IMAGE_MEMORY_GB) -> TrainingSet | None:
    """Prior preservation (DreamBooth's, with a judge to filter it): the base's own images of `prompts`,
    those the judge scores at least `min_score` (VQA); None if it passes none. Trained on beside a small set
    of teacher images, they keep the base from forgetting what it already drew right; they cost judge
    calls and no teacher call. Kept in `folder` (`prior.json` written last), so a rerun reads them back;
    one killed before that draws them again (`base()` loads the sampler; `seeds`, one per prompt) and the judge's answers
    come from its cache."""
    manifest = folder / "prior.json"
    if not manifest.exists():
        images = base().generate(list(prompts), list(seeds))
        judge.round = 0
        scores = score_images(judge, list(zip(images, prompts)))
        kept = [i for i, score in enumerate(scores) if score is not None and score.score >= min_score]
        folder.mkdir(parents=True, exist_ok=True)
        for i in kept:
            images[i].save(folder / f"{i:05d}.png")
        write_json(manifest, {"judged": len(prompts), "min_score": min_score,
                              "kept": [{"prompt": prompts[i], "image": f"{i:05d}.png"} for i in kept]})
    made = json.loads(manifest.read_text())
    if (made["judged"], made["min_score"]) != (len(prompts), min_score):
        raise UserError(f"{folder} holds {made['judged']} prior images judged at {made['min_score']:g}; this config asks "
                        f"{len(prompts)} at {min_score:g}: use a new output_dir")
    kept = made["kept"]
    if not kept:
        return None
    return TrainingSet.from_files([row["prompt"] for row in kept], [folder / row["image"] for row in kept], max_memory_gb)
