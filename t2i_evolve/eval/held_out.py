"""What a recipe's run is scored on: held-out prompts, which no teacher draws for its training.

The prompts come from the shapes grammar (the recipe's slice) or from the user's `prompts_file` (a seeded
share of it: `prompts.sets`). Three metrics:

- `pixel` (shapes-world prompts only): the exact pixel judge's DSG score, overall and per skill, whatever
  judges the run, so the score measures the run and not the judge's taste.
- `win_rate` (any prompts: a real base on its users' prompts): the run's own judge compares the base's
  image of each held-out prompt with the reference teacher's (the first listed), a win counting 1 and a
  tie 1/2; 0.5 is "as good as the teacher", EvolveDirector's goal. The teacher draws each distinct prompt once,
  before the seed set, through the ledger's call cache like every teacher call (so counted in the teacher budget and
  never paid twice), and the judge's verdicts are cached too: a rerun re-asks nothing. Both cost calls:
  `eval_prompts` teacher calls once, and `eval_prompts` x `eval_draws` judge calls (times its votes) per scored
  round, which a round's plan keeps room for under `max_judge_calls`.
- `vqa` (any prompts, no teacher call): the run's judge scores the base's image of each held-out prompt with
  its questions (DSG: the grammar's, an LLM writer's, or one about the whole prompt; `prompts.questions`), an
  absolute score where `win_rate` is relative to a teacher, per skill; `eval_prompts` x `eval_draws` judge calls
  (times votes) a scored round.
`auto` is `pixel` where every held-out prompt is a shapes-world prompt, else `win_rate`.
"""

from __future__ import annotations

from typing import Literal, Sequence

from ..errors import BudgetExhausted, UserError
from ..judges import PixelJudge
from ..judges.batch import compare_pairs, score_images
from ..prompts.sets import open_prompts, prompt_split, refuse_open_prompts
from .scoring import ScoreBoard, evaluate

Metric = Literal["auto", "pixel", "win_rate", "vqa"]
BASE_SEED, TEACHER_SEED = 10_000, 20_000  # fixed noise: every model of a run, every arm of a benchmark, alike


def held_out_prompts(config) -> list[str]:
    """A recipe's held-out prompts (`prompt_split`), each `eval_draws` times."""
    return prompt_split(config)[0]


def held_out_score(sampler, prompts: Sequence[str], seed: int = BASE_SEED) -> dict:
    """The `pixel` metric: the exact judge's DSG score of a model (`sampler`) on shapes-world prompts, overall and
    per skill (a skill asked 0 times scores 0.0)."""
    board = evaluate(sampler, PixelJudge(), list(prompts), seed=seed).summary()
    return {key: board[key] for key in ("score", "skills", "asked")}


class HeldOutScore:
    """Scores a model (a `Sampler`) on the held-out prompts: `score(sampler, round)` -> a metrics row's fields."""

    def __init__(self, prompts: Sequence[str], metric: Metric = "auto", *, judge=None, teachers: dict | None = None,
                 seed: int = BASE_SEED):
        self.prompts, self.judge, self.seed = list(prompts), judge, seed  # (`seed`: the noise of the model's images)
        self.metric = ("win_rate" if open_prompts(self.prompts) else "pixel") if metric == "auto" else metric
        if self.metric == "pixel":
            refuse_open_prompts(self.prompts, "the held-out set", "held_out_metric pixel scores",
                                "win_rate (the run's judge vs a teacher) or vqa")
        self.teacher_id, self.teacher = next(iter(teachers.items())) if teachers else (None, None)
        if self.metric == "win_rate" and (judge is None or self.teacher is None):
            raise UserError("held_out_metric win_rate needs the run's judge and a teacher to compare with")
        if self.metric == "vqa" and not callable(getattr(judge, "score", None)):
            raise UserError("held_out_metric vqa needs a judge that scores one image (VQA); this one only compares")
        self.references: list | None = None

    @property
    def judge_calls(self) -> int:
        """The judge calls one score may cost (each asked `votes` times): a round's plan keeps room for them."""
        return len(self.prompts) * getattr(self.judge, "votes", 1) if self.metric in ("win_rate", "vqa") else 0

    def draw_references(self, spent=None) -> None:
        """`win_rate`: the first teacher's image of each distinct held-out prompt, drawn once, before the seed set
        (round 0 in the ledger), so the teacher budget pays for them first and every round can be scored. `spent`
        (`CallBudgets`): a budget that cannot pay for them is a one-line error before any call."""
        if self.metric != "win_rate" or self.references is not None:
            return
        distinct = list(dict.fromkeys(self.prompts))
        seeds = [TEACHER_SEED + i for i in range(len(distinct))]
        if spent is not None:
            try:
                fit = spent.draws_that_fit(distinct, seeds, [self.teacher_id] * len(distinct))
            except BudgetExhausted:
                fit = []
            if len(fit) < len(distinct):
                raise UserError(f"the teacher budget cannot pay for the {len(distinct)} held-out reference images that "
                                "held_out_metric win_rate compares with: raise it, or use held_out_metric vqa (no "
                                "teacher call)")
        self.teacher.round = 0
        drawn = dict(zip(distinct, self.teacher.generate(distinct, seeds)))
        self.references = [drawn[prompt] for prompt in self.prompts]

    def score(self, sampler, round: int, spent=None) -> dict:
        """The fields of round `round`'s metrics row. `spent` (`CallBudgets`): a score whose judge calls do not fit
        `max_judge_calls` (as it stood when the round began) is not asked: the round is `unscored`, with the reason."""
        if self.metric == "pixel":
            return held_out_score(sampler, self.prompts, self.seed)
        try:
            if spent is not None:
                spent.comparisons_that_fit(1, round, self.judge_calls)  # (raises when they do not fit)
            return self._win_rate(sampler, round) if self.metric == "win_rate" else self._vqa(sampler, round)
        except BudgetExhausted as e:  # (a rerun with more budget scores the last round: the calls made are cached)
            return {"unscored": f"held-out prompts: {e}"}

    def _vqa(self, sampler, round: int) -> dict:
        images = sampler.generate(self.prompts, [self.seed + i for i in range(len(self.prompts))])
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
        self.draw_references()
        images = sampler.generate(self.prompts, [self.seed + i for i in range(len(self.prompts))])
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
        return {"score": (counts["base"] + counts["tie"] / 2) / judged, "verdicts": counts, "prompts": len(self.prompts)}
