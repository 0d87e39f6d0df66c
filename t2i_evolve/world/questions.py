"""Yes/no questions from a scene, in the style of TIFA and DSG, and the exact rule that answers them.

Questions form a dependency graph (DSG): "is there a red circle?" is asked of an image only when "is
there a circle?" holds. Each question carries a structured `check`, so the same `answer_checks` runs on
the ground-truth objects of a render and on the objects the pixel judge segments from an image.

Which skill a question tests is chosen so a failure is blamed on the right skill:
- shape: "Is there a circle?"
- color: "Is there a red circle?" (child of shape); with a binding partner, "Is there a red object?"
- binding: "Is there a red circle?" when another group has a different color and shape (child of the
  shape and the color question: it fails only when the color exists but sits on the wrong shape)
- count / size: children of the group's color-or-binding question
- spatial: "Are the red circles left of the blue square?" (child of both groups' questions)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..protocols import Question
from .grammar import Group, Scene, is_binding_pair, parse
from .render import EXTENT, PlacedObject


@dataclass(frozen=True)
class Check:
    """Structured form of a question: `kind` in shape, color, bound, count, size, relation."""

    kind: str
    color: str | None = None
    shape: str | None = None
    value: object = None
    other: tuple[str, str] | None = None


def _q(text: str, skill: str, parents: tuple[int, ...], check: Check) -> Question:
    return Question(text=text, skill=skill, parents=parents, check=check)


def questions_for(scene_or_prompt: Scene | str) -> list[Question]:
    """The question list of a scene (or prompt): parents before children, indices stable per scene."""
    scene = parse(scene_or_prompt) if isinstance(scene_or_prompt, str) else scene_or_prompt
    qs: list[Question] = []
    anchor: list[int] = []  # per group: the question "this colored shape exists"

    def add(q: Question) -> int:
        qs.append(q)
        return len(qs) - 1

    for gi, g in enumerate(scene.groups):
        has_partner = any(is_binding_pair(g, h) for hi, h in enumerate(scene.groups) if hi != gi)
        q_shape = add(_q(f"Is there a {g.shape}?", "shape", (), Check("shape", shape=g.shape)))
        bound = Check("bound", color=g.color, shape=g.shape)
        if has_partner:
            q_color = add(_q(f"Is there a {g.color} object?", "color", (), Check("color", color=g.color)))
            anchor.append(add(_q(f"Is there a {g.color} {g.shape}?", "binding", (q_shape, q_color), bound)))
        else:
            anchor.append(add(_q(f"Is there a {g.color} {g.shape}?", "color", (q_shape,), bound)))
        n = g.count
        text = f"Is there exactly one {g.noun()}?" if n == 1 else f"Are there exactly {n} {g.noun(True)}?"
        add(_q(text, "count", (anchor[gi],), Check("count", g.color, g.shape, n)))
        if g.size:
            plain = Group(n, g.color, g.shape)
            text = f"Is the {plain.noun()} {g.size}?" if n == 1 else f"Are the {plain.noun()} {g.size}?"
            add(_q(text, "size", (anchor[gi],), Check("size", g.color, g.shape, g.size)))
    for i, relation in enumerate(scene.relations):
        if relation is None:
            continue
        a, b = scene.groups[i], scene.groups[i + 1]
        a_noun, b_noun = Group(a.count, a.color, a.shape).noun(), Group(b.count, b.color, b.shape).noun()
        verb = "Is" if a.count == 1 else "Are"
        check = Check("relation", a.color, a.shape, relation, (b.color, b.shape))
        add(_q(f"{verb} the {a_noun} {relation} the {b_noun}?", "spatial", (anchor[i], anchor[i + 1]), check))
    return qs


def size_class(extent: float, resolution: int) -> str:
    """'small', 'medium' or 'big' from an object's extent in pixels (boundaries midway between sizes)."""
    share = extent / resolution
    if share < (EXTENT["small"] + EXTENT[None]) / 2:
        return "small"
    if share > (EXTENT[None] + EXTENT["big"]) / 2:
        return "big"
    return "medium"


def relation_holds(a: Sequence[PlacedObject], b: Sequence[PlacedObject], relation: str, dead_zone: float) -> bool:
    """Group-level relation from mean centres, with a dead zone (GenEval-style) in pixels."""
    ax, ay = sum(o.cx for o in a) / len(a), sum(o.cy for o in a) / len(a)
    bx, by = sum(o.cx for o in b) / len(b), sum(o.cy for o in b) / len(b)
    return {
        "left of": ax + dead_zone < bx,
        "right of": ax - dead_zone > bx,
        "above": ay + dead_zone < by,
        "below": ay - dead_zone > by,
    }[relation]


def answer_checks(questions: Sequence[Question], objects: Sequence[PlacedObject], resolution: int) -> list[bool]:
    """Answer each question exactly from a list of objects (raw answers, before the DSG rule)."""
    answers = []
    for q in questions:
        c: Check = q.check
        same = [o for o in objects if o.color == c.color and o.shape == c.shape]
        if c.kind == "shape":
            ok = any(o.shape == c.shape for o in objects)
        elif c.kind == "color":
            ok = any(o.color == c.color for o in objects)
        elif c.kind == "bound":
            ok = bool(same)
        elif c.kind == "count":
            ok = len(same) == c.value
        elif c.kind == "size":
            ok = bool(same) and all(size_class(o.extent, resolution) == c.value for o in same)
        elif c.kind == "relation":
            others = [o for o in objects if (o.color, o.shape) == c.other]
            ok = bool(same) and bool(others) and relation_holds(same, others, c.value, 0.02 * resolution)
        else:
            raise ValueError(f"unknown check {c.kind!r}")
        answers.append(ok)
    return answers


def dsg_answers(questions: Sequence[Question], raw: Sequence[bool]) -> list[bool]:
    """The DSG rule: a question counts as no when any of its parents counts as no."""
    out: list[bool] = []
    for q, a in zip(questions, raw):
        out.append(bool(a) and all(out[p] for p in q.parents))
    return out


def dsg_score(questions: Sequence[Question], raw: Sequence[bool]) -> float:
    effective = dsg_answers(questions, raw)
    return sum(effective) / len(effective) if effective else 0.0
