"""Questions about an image of a prompt (TIFA / DSG): what a VQA judge is asked, for any prompt.

- A shapes-world prompt: the grammar's exact list (`world.questions.questions_for`), parents and checks included.
- Any other prompt, with an LLM writer: the questions it writes (DSG's recipe: one atomic fact each, entities
  first, then attributes, counts and relations, each naming the questions it depends on), read strictly by
  `parse_question_list` (`OpenAIPromptWriter.questions`).
- Any other prompt without one: a single question about the whole prompt, TIFA's coarsest form.
"""

from __future__ import annotations

from typing import Any

from ..protocols import Question
from ..world.grammar import scene_or_none
from ..world.questions import questions_for
from .parsing import json_values

QUESTION_SKILLS = ("entity", "color", "shape", "count", "size", "spatial", "binding", "attribute", "action", "text",
                   "other")
"""The skills a written question may name (any other name is read as "other")."""
MAX_QUESTION_CHARS = 300


def prompt_questions(prompt: str) -> list[Question]:
    """The grammar's DSG questions where it reads the prompt; else one question about the whole prompt."""
    scene = scene_or_none(prompt)
    return questions_for(scene) if scene is not None else whole_prompt_question(prompt)


def whole_prompt_question(prompt: str) -> list[Question]:
    return [Question(f'Does this image show "{prompt}"?', "overall")]


def parse_question_list(reply: Any, limit: int) -> list[Question] | None:
    """Up to `limit` questions from an LLM's reply, or None when it holds no valid list.

    Wanted: a JSON list (bare, fenced, in an object under "questions", or inside chatter) of objects
    `{"id": 1, "question": "Is there a cat?", "skill": "entity", "parents": []}`, where parents are ids of
    earlier questions. `id` may be left out (then it is the 1-based position), `skill` too ("other").
    Anything else in a list of objects (no question text, a repeated id, a parent that is not an earlier
    question) makes the whole reply invalid: a half-read list would ask the wrong questions."""
    if not isinstance(reply, str):
        return None
    for value in json_values(reply):
        if isinstance(value, dict) and isinstance(value.get("questions"), list):
            value = value["questions"]
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            return _questions(value[:limit])
    return None


def _questions(items: list[dict]) -> list[Question] | None:
    index: dict[Any, int] = {}  # id -> position
    questions: list[Question] = []
    for position, item in enumerate(items):
        text, key, parents = item.get("question"), item.get("id", position + 1), item.get("parents", [])
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUESTION_CHARS:
            return None
        if isinstance(key, bool) or not isinstance(key, (int, str)) or key in index or not isinstance(parents, list):
            return None
        if any(isinstance(p, bool) or not isinstance(p, (int, str)) or p not in index for p in parents):
            return None  # (an unknown id, or one of a later question: a cycle)
        skill = str(item.get("skill", "other")).strip().lower()
        questions.append(Question(" ".join(text.split()), skill if skill in QUESTION_SKILLS else "other",
                                  tuple(dict.fromkeys(index[p] for p in parents))))
        index[key] = position
    return questions
