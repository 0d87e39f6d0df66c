"""Many judge requests at once, for any judge: concurrently when the judge can batch them (an endpoint
judge's `compare_many` / `score_many`), one at a time otherwise, with the same requests either way."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..protocols import Comparison


def compare_pairs(judge, pairs: Sequence[tuple[Image.Image, Image.Image, str]], votes: int | None = None
                  ) -> list[Comparison | None]:
    """Judge many (image_a, image_b, prompt) pairs: concurrently when the judge can batch them. `votes`:
    asks per verdict, majority deciding (a judge that samples; default: its own `votes`)."""
    if hasattr(judge, "compare_many"):  # a verdict that failed or did not parse becomes None
        return [verdict.comparison() for verdict in judge.compare_many(pairs, votes)]
    return [judge.compare(a, b, prompt) for a, b, prompt in pairs]


def score_images(judge, items: Sequence[tuple[Image.Image, str]], votes: int | None = None) -> list:
    """VQA scores of many (image, prompt): concurrently when the judge can batch them (the same requests,
    so the same cache keys, as one at a time). `votes`: as `compare_pairs`."""
    if hasattr(judge, "score_many"):
        return judge.score_many(items, votes)
    return [judge.score(image, prompt) for image, prompt in items]
