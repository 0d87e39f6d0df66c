"""Evaluation suites a user can compare with papers: GenEval's six tasks, drawn from the grammar.

GenEval scores an image as passing only when every clause of its prompt holds; a task's score is the
mean over its images and the overall score the mean of the six tasks. Here a task's clauses are the
prompt's questions whose skills the task tests (after the DSG parent rule). Prompts carry colors in this
grammar, so every task also needs the color right, a little stricter than GenEval's object-only tasks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..protocols import Question
from .grammar import COLORS, RELATIONS, SHAPES, Group, Scene, render_prompt
from .questions import dsg_answers

# Task -> (number of prompts, as in GenEval's 553, and the skills whose questions are its clauses).
TASKS: dict[str, tuple[int, frozenset[str]]] = {
    "single_object": (80, frozenset({"shape", "color"})),
    "two_object": (99, frozenset({"shape", "color", "binding"})),
    "counting": (80, frozenset({"shape", "color", "count"})),
    "colors": (94, frozenset({"shape", "color"})),
    "position": (100, frozenset({"shape", "color", "binding", "spatial"})),
    "color_attr": (100, frozenset({"shape", "color", "binding"})),
}


def _group(rng, count: int = 1, exclude: Group | None = None, binding: bool = False) -> Group:
    while True:
        g = Group(count, str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        if exclude is None or (g.shape != exclude.shape if not binding else
                               g.shape != exclude.shape and g.color != exclude.color):
            return g


_BUILDERS: dict[str, Callable[[np.random.Generator], Scene]] = {
    "single_object": lambda rng: Scene((_group(rng),)),
    "two_object": lambda rng: _pair(rng, None, binding=False),
    "counting": lambda rng: Scene((_group(rng, count=int(rng.integers(2, 4))),)),
    "colors": lambda rng: Scene((_group(rng),)),
    "position": lambda rng: _pair(rng, str(rng.choice(RELATIONS)), binding=False),
    "color_attr": lambda rng: _pair(rng, None, binding=True),
}


def _pair(rng, relation: str | None, binding: bool) -> Scene:
    first = _group(rng)
    return Scene((first, _group(rng, exclude=first, binding=binding)), (relation,))


def geneval_suite(seed: int = 0, scale: float = 1.0) -> dict[str, list[str]]:
    """Prompts per task (GenEval's counts times `scale`), fixed by `seed`."""
    suite = {}
    for task, (n, _) in TASKS.items():
        rng = np.random.default_rng([seed, list(TASKS).index(task)])
        suite[task] = [render_prompt(_BUILDERS[task](rng)) for _ in range(max(1, round(n * scale)))]
    return suite


def passes(task: str, questions: Sequence[Question], raw: Sequence[bool]) -> bool:
    """GenEval's rule: the image passes when every clause of the task holds."""
    skills = TASKS[task][1]
    return all(a for q, a in zip(questions, dsg_answers(questions, raw)) if q.skill in skills)
