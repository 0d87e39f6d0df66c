"""The pixel judge: an exact, free judge of the shapes world (and the oracle behind a simulated VLM).

It segments objects from pixels (`segment.find_objects`) and answers the scene's questions with the
same rule that answers them on ground truth, so on a correct render it agrees with the truth.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..protocols import Answer, Comparison, ImageScore, Question
from ..world.questions import answer_checks, dsg_answers, questions_for
from .segment import MIN_IMAGE_SIDE, find_objects


READ_SIDE = 128
"""Side the judge reads larger images at (area-averaged down, aspect kept). Its shape classes are measured per
side, in time that grows with the side squared (1024 px: 3.7 minutes); on the gallery's renders at 256 and 512 px
every answer read at 128 px is the one read at full size (benchmarks/RESULTS.md, forty-eighth session)."""


def _read_size(image: Image.Image) -> Image.Image:
    scale = max(READ_SIDE / max(image.size), MIN_IMAGE_SIDE / min(image.size))  # (a long strip: still readable)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.BOX)  # (a palette image would be resized by nearest pixel)


class PixelJudge:
    """`Judge` for shapes-world prompts. `tie_margin`: score gap below which a comparison is a tie."""

    id = "pixel"
    price_per_call = 0.0

    def __init__(self, tie_margin: float = 1e-9):
        self.tie_margin = tie_margin

    def answer(self, image: Image.Image, prompt: str, questions: Sequence[Question]) -> list[bool]:
        questions = _with_checks(prompt, questions)
        image = _read_size(image)
        return answer_checks(questions, find_objects(image), image.width)

    def score(self, image: Image.Image, prompt: str) -> ImageScore:
        questions = questions_for(prompt)
        raw = self.answer(image, prompt, questions)
        effective = dsg_answers(questions, raw)
        answers = tuple(Answer(q, a) for q, a in zip(questions, raw))
        return ImageScore(score=sum(effective) / len(effective), answers=answers)

    def compare(self, image_a: Image.Image, image_b: Image.Image, prompt: str) -> Comparison:
        a, b = self.score(image_a, prompt).score, self.score(image_b, prompt).score
        if abs(a - b) <= self.tie_margin:
            return Comparison("tie", a, b)
        return Comparison("a" if a > b else "b", a, b)


def _with_checks(prompt: str, questions: Sequence[Question]) -> list[Question]:
    """Questions that arrive as text only (from JSON, from a VLM prompt) get their check back."""
    if all(q.check is not None for q in questions):
        return list(questions)
    known = {q.text: q for q in questions_for(prompt)}
    missing = [q.text for q in questions if q.check is None and q.text not in known]
    if missing:
        raise ValueError(f"the pixel judge cannot answer {missing[0]!r}: not a question of {prompt!r}")
    return [q if q.check is not None else known[q.text] for q in questions]
