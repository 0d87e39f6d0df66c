"""The quality gate: the judge's score of each new teacher image, so that a wrong one is never trained on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from PIL import Image

if TYPE_CHECKING:
    from ..data import Ledger


class QualityGate:
    """The judge's score of each new teacher image (VQA): one below `min_score` is rejected (op 'reject', the
    score in its reason), kept in the ledger, never trained on. `min_score` None: the gate is off."""

    def __init__(self, judge, min_score: float | None):
        self.judge, self.min_score = judge, min_score

    def scores(self, images: Sequence[Image.Image | None], prompts: Sequence[str], round: int) -> list[float | None]:
        """The judge's score of each image; None: gate off, no image, or the judge failed after retries (no
        evidence). Asked all at once where the judge can (a VLM's `score_many` sends them concurrently; one at a
        time, a 10,000-prompt seed set's gate took hours). Repeats are read from the call cache."""
        if self.min_score is None:
            return [None] * len(images)
        self.judge.round = round
        asked = [i for i, image in enumerate(images) if image is not None]
        items = [(images[i], prompts[i]) for i in asked]
        many = getattr(self.judge, "score_many", None)
        verdicts = many(items) if callable(many) else [self.judge.score(image, prompt) for image, prompt in items]
        scores: list[float | None] = [None] * len(images)
        for i, verdict in zip(asked, verdicts):
            scores[i] = None if verdict is None else verdict.score
        return scores

    def passes(self, images: Sequence[Image.Image | None], prompts: Sequence[str], round: int) -> list[bool]:
        return [score is None or score >= self.min_score for score in self.scores(images, prompts, round)]

    def reject_if_wrong(self, ledger: Ledger, record_id: int, score: float | None, round: int) -> None:
        """Reject the record whose image scored `score` (`scores`) below `min_score`."""
        if score is not None and score < self.min_score:
            ledger.delete_record(record_id, round=round, op="reject",
                                 reason=f"teacher image scored {score:.2f} < min_teacher_score {self.min_score:g}")
