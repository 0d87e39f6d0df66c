"""What a recipe's run is scored on: held-out prompts, which no teacher draws for its training.

The prompts come from the shapes grammar (the recipe's slice) or from the user's `prompts_file` (a seeded
share of it: `prompts.sets`). Two metrics:

- `pixel` (shapes-world prompts only): the exact pixel judge's DSG score, overall and per skill, whatever
  judges the run, so the score measures the run and not the judge's taste.
- `win_rate` (any prompts: a real base on its users' prompts): the run's own judge compares the base's
  image of each held-out prompt with the reference teacher's (the first listed), a win counting 1 and a
  tie 1/2; 0.5 is "as good as the teacher", EvolveDirector's goal. The teacher draws each prompt once, through
  the ledger's call cache like every teacher call (so counted in the teacher budget and never paid twice),
  and the judge's verdicts are cached too: a rerun re-asks nothing. Both cost calls: `eval_prompts` judge
  calls (times its votes) per scored round, and `eval_prompts` teacher calls once.
- `vqa` (any prompts, no teacher call): the run's judge scores the base's image of each held-out prompt with
  its questions (DSG: the grammar's, an LLM writer's, or one about the whole prompt; `prompts.questions`), an
  absolute score where `win_rate` is relative to a teacher; `eval_prompts` judge calls (times votes) a round.
`auto` is `pixel` where every held-out prompt is a shapes-world prompt, else `win_rate`.
"""

from __future__ import annotations

from typing import Literal, Sequence

from ..errors import BudgetExhausted, UserError
from ..judges import PixelJudge
from ..judges.batch import compare_pairs, score_images
from ..prompts.sets import open_prompts, prompt_split
from .scoring import ScoreBoard, evaluate

Metric = Literal["auto", "pixel", "win_rate", "vqa"]
BASE_SEED, TEACHER_SEED = 10_000, 20_000  # fixed noise: every model of a run, every arm of a benchmark, alike


def held_out_prompts(config) -> list[str]:
    """A recipe's held-out prompts (`prompt_split`), each `eval_draws` times."""
    return prompt_split(config)[0]


def held_out_score(sampler, prompts: Sequence[str]) -> dict:
    """The `pixel` metric: the exact judge's DSG score of a model (`sampler`) on shapes-world prompts, overall and
    per skill (a skill asked 0 times scores 0.0)."""
    board = evaluate(sampler, PixelJudge(), list(prompts), seed=BASE_SEED).summary()
    return {key: board[key] for key in ("score", "skills", "asked")}


class HeldOutScore:
    """Scores a model (a `Sampler`) on the held-out prompts: `score(sampler, round)` -> a metrics row's fields."""

    def __init__(self, prompts: Sequence[str], metric: Metric = "auto", *, judge=None, teachers: dict | None = None):
        self.prompts, self.judge = list(prompts), judge
        others = open_prompts(self.prompts)
        self.metric = ("win_rate" if others else "pixel") if metric == "auto" else metric
        if self.metric == "pixel" and others:
            raise UserError(f"held_out_metric pixel scores shapes-world prompts only, and {len(others)} held-out "
                            f"prompts are not (e.g. {others[0]!r}): use win_rate (the run's judge vs a teacher)")
        self.teacher = next(iter(teachers.values())) if teachers else None
        if self.metric == "win_rate" and (judge is None or self.teacher is None):
            raise UserError("held_out_metric win_rate needs the run's judge and a teacher to compare with")
        if self.metric == "vqa" and not callable(getattr(judge, "score", None)):
            raise UserError("held_out_metric vqa needs a judge that scores one image (VQA); this one only compares")
        self.references: list | None = None

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def score(self, sampler, round: int) -> dict:
        if self.metric == "pixel":
            return held_out_score(sampler, self.prompts)
        try:
            return self._win_rate(sampler, round) if self.metric == "win_rate" else self._vqa(sampler, round)
        except BudgetExhausted as e:  # scored later (a rerun with more budget: the calls made are cached)
            return {"unscored": f"held-out prompts: {e}"}

    def _vqa(self, sampler, round: int) -> dict:
        images = sampler.generate(self.prompts, [BASE_SEED + i for i in range(len(self.prompts))])
        self.judge.round = round
        drawn = [(image, prompt) for image, prompt in zip(images, self.prompts) if image is not None]
        scores = [score for score in score_images(self.judge, drawn) if score is not None]
        if not scores:
            return {"unscored": f"held-out prompts: no verdict on {len(self.prompts)} images"}
        board = ScoreBoard()  # per skill: the skills the questions name (an LLM's: entity, color, spatial, ...)
        for score in scores:
            board.add([answer.question for answer in score.answers], [answer.answer for answer in score.answers])
        summary = board.summary()
        return {"score": sum(score.score for score in scores) / len(scores), "skills": summary["skills"],
                "asked": summary["asked"], "prompts": len(self.prompts), "judged": len(scores)}

    def _win_rate(self, sampler, round: int) -> dict:
        seeds = [BASE_SEED + i for i in range(len(self.prompts))]
        if self.references is None:  # the reference images, drawn once (round 0 in the ledger's call log)
            self.teacher.round = 0
            self.references = self.teacher.generate(self.prompts, [TEACHER_SEED + i for i in range(len(self.prompts))])
        images = sampler.generate(self.prompts, seeds)
        asked = [i for i, ref in enumerate(self.references) if ref is not None and images[i] is not None]
        self.judge.round = round
        verdicts = compare_pairs(self.judge, [(images[i], self.references[i], self.prompts[i]) for i in asked])
        counts = {"base": 0, "tie": 0, "teacher": 0}
        for verdict in verdicts:
            if verdict is not None and verdict.winner in ("a", "b", "tie"):
                counts[{"a": "base", "b": "teacher", "tie": "tie"}[verdict.winner]] += 1
        judged = sum(counts.values())
        if not judged:
            return {"unscored": f"held-out prompts: no verdict on {len(self.prompts)} comparisons"}
        return {"score": (counts["base"] + counts["tie"] / 2) / judged, "verdicts": counts,
                "asked": len(self.prompts)}
