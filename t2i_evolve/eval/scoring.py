"""Turn judged images into the numbers users compare: a DSG score, per-skill scores, GenEval tasks.

Per-skill scores are conditional: a skill's question counts only when its parents hold. A teacher that
draws a green circle for "a red circle" then loses on color, not also on count, size and position of a
circle it never drew in red; a judge that blames the wrong skill would mislead every recipe.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from ..protocols import SKILLS, Generator, Judge, Question
from ..world.questions import dsg_answers, questions_for
from ..world.suites import TASKS, passes


@dataclass
class ScoreBoard:
    """Accumulates judged images. `summary()` gives score, skills and (when tasks were given) GenEval."""

    scores: list[float] = field(default_factory=list)
    skill_right: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skill_asked: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    task_passes: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    images: list[Image.Image] = field(default_factory=list)

    def add(self, questions: Sequence[Question], raw: Sequence[bool], task: str | None = None) -> float:
        effective = dsg_answers(questions, raw)
        score = sum(effective) / len(effective) if effective else 0.0
        self.scores.append(score)
        for q, a in zip(questions, raw):
            if all(effective[p] for p in q.parents):
                self.skill_asked[q.skill] += 1
                self.skill_right[q.skill] += bool(a)
        if task is not None:
            self.task_passes[task].append(passes(task, questions, raw))
        return score

    def skill_names(self) -> list[str]:
        """The package's skills, then any other a question named (an LLM's questions about a real prompt: entity...)."""
        return [*SKILLS, *(s for s in self.skill_asked if s not in SKILLS)]

    def skills(self) -> dict[str, float]:
        """Share right per skill, over questions whose parents hold (0.0 where none could be asked)."""
        return {s: self.skill_right[s] / self.skill_asked[s] if self.skill_asked[s] else 0.0 for s in self.skill_names()}

    def summary(self) -> dict:
        out = {
            "score": sum(self.scores) / len(self.scores) if self.scores else 0.0,
            "skills": self.skills(),
            "asked": {s: self.skill_asked[s] for s in self.skill_names()},
            "images": len(self.scores),
        }
        if self.task_passes:
            tasks = {t: sum(v) / len(v) for t, v in self.task_passes.items()}
            out["geneval"] = {"overall": sum(tasks.values()) / len(tasks), "tasks": tasks}
        return out


def evaluate(
    generator: Generator,
    judge: Judge,
    prompts: Sequence[str],
    seed: int = 0,
    tasks: Sequence[str | None] | None = None,
    batch_size: int = 64,
    progress=None,
    keep: int = 0,
) -> ScoreBoard:
    """Draw each prompt once (seed `seed + i`) and judge it. `progress(n)` is called per batch.

    The first `keep` images stay in `board.images` (for report grids), so no caller samples twice.
    """
    board = ScoreBoard()
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        images = generator.generate(chunk, [seed + start + i for i in range(len(chunk))])
        board.images += images[: max(0, keep - len(board.images))]
        for i, (image, prompt) in enumerate(zip(images, chunk)):
            questions = questions_for(prompt)
            raw = judge.answer(image, prompt, questions) if image is not None else [False] * len(questions)
            board.add(questions, raw, tasks[start + i] if tasks else None)
        if progress:
            progress(len(chunk))
    return board


def suite_prompts(suite: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """Flatten a {task: prompts} suite into prompts and their task names."""
    prompts, tasks = [], []
    for task in TASKS:
        prompts += suite.get(task, [])
        tasks += [task] * len(suite.get(task, []))
    return prompts, tasks


def grammar_evaluator(prompts: int = 128, seed: int = 987_654, sampler=None):
    """`Trainer`'s evaluation in the shapes world (`t2i-evolve train`'s `eval_every`): the model being trained
    draws held-out grammar prompts with `sampler` (a `SamplerConfig`; None: its defaults, the shapes model's usual),
    which the pixel judge scores."""
    from ..judges import PixelJudge
    from ..models import Sampler, SamplerConfig
    from ..world import GrammarPrompts

    texts, sampler = GrammarPrompts().sample(prompts, seed=seed), sampler or SamplerConfig()
    return lambda model, step: evaluate(Sampler(model, sampler), PixelJudge(), texts, seed=10_000).summary()
