"""The shapes-world prompt grammar: a scene spec, a parser, a renderer of text, and a sampler.

A prompt is one to three object groups; consecutive groups are joined by a relation or by "and":

    prompt   := group (link group){0,2}
    group    := count [size] color shape          ("a red circle", "two big blue squares")
    count    := a | an | one | two | three
    link     := and | left of | right of | above | below
    size     := small | big

"A left of B above C" means A is left of B and B is above C (relations chain between neighbours).
`parse(render_prompt(spec)) == spec` for every spec whose groups differ in color or shape (property-tested): two
groups of red circles would be one to the judge, so a prompt that has them is not in the grammar.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import GrammarError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 20),
    "magenta": (200, 40, 200),
    "cyan": (20, 190, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "big")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
MAX_GROUPS = 3


@dataclass(frozen=True)
class Group:
    """`count` objects of one color and shape, optionally all small or all big."""

    count: int
    color: str
    shape: str
    size: str | None = None

    def noun(self, plural: bool | None = None) -> str:
        """'red circle', 'small red circles' (plural follows the count unless given)."""
        plural = self.count > 1 if plural is None else plural
        words = ([self.size] if self.size else []) + [self.color, self.shape + ("s" if plural else "")]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """A parsed prompt. `relations[i]` links group i to group i+1 (None for "and")."""

    groups: tuple[Group, ...]
    relations: tuple[str | None, ...] = ()

    def __post_init__(self):
        if not 1 <= len(self.groups) <= MAX_GROUPS:
            raise GrammarError(f"a scene has 1 to {MAX_GROUPS} groups, not {len(self.groups)}")
        if len(self.relations) != len(self.groups) - 1:
            raise GrammarError("a scene needs one relation (or None) between each pair of neighbours")
        for g in self.groups:
            if g.color not in COLORS or g.shape not in SHAPES or g.count < 1:
                raise GrammarError(f"not a shapes-world group: {g}")
            if g.size is not None and g.size not in SIZES:
                raise GrammarError(f"unknown size: {g.size!r}")
        for r in self.relations:
            if r is not None and r not in RELATIONS:
                raise GrammarError(f"unknown relation: {r!r}")

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_json(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "relations": list(self.relations)}

    @classmethod
    def from_json(cls, data: dict | str) -> "Scene":
        data = json.loads(data) if isinstance(data, str) else data
        return cls(tuple(Group(**g) for g in data["groups"]), tuple(data["relations"]))


def render_prompt(scene: Scene) -> str:
    """The canonical text of a scene ("a" / "an" for one object)."""
    parts = []
    for i, group in enumerate(scene.groups):
        if i:
            parts.append(scene.relations[i - 1] or "and")
        if group.count == 1:
            article = "an" if group.noun()[0] in "aeiou" else "a"
        else:
            article = NUMBER_WORDS.get(group.count, str(group.count))
        parts.append(f"{article} {group.noun()}")
    return " ".join(parts)


def parse(prompt: str) -> Scene:
    """Parse a prompt into a `Scene`; raise `GrammarError` naming the first word that does not fit."""
    words = prompt.lower().replace(",", " ").split()
    if words and words[-1].endswith("."):
        words[-1] = words[-1][:-1]
    if not words:
        raise GrammarError("empty prompt")
    pos = 0

    def expect(what: str) -> str:
        if pos >= len(words):
            raise GrammarError(f"prompt ends where {what} was expected: {prompt!r}")
        return words[pos]

    def fail(word: str, what: str):
        raise GrammarError(f"cannot read {word!r} in {prompt!r} (expected {what})", word)

    groups, relations = [], []
    while True:
        word = expect("a count (a, one, two, three)")
        if word not in COUNT_WORDS:
            fail(word, "a count: a, an, one, two, three")
        count = COUNT_WORDS[word]
        pos += 1
        size = None
        if expect("a color") in SIZES:
            size = words[pos]
            pos += 1
        color = expect("a color")
        if color not in COLORS:
            fail(color, "a color: " + ", ".join(COLORS))
        pos += 1
        shape_word = expect("a shape")
        shape = shape_word[:-1] if shape_word.endswith("s") and shape_word[:-1] in SHAPES else shape_word
        if shape not in SHAPES:
            fail(shape_word, "a shape: " + ", ".join(SHAPES))
        if (shape_word != shape) != (count > 1):
            fail(shape_word, f"{'plural' if count > 1 else 'singular'} for count {count}")
        pos += 1
        if any((g.color, g.shape) == (color, shape) for g in groups):  # (the judge could not tell the groups apart)
            raise GrammarError(f"two groups of {color} {shape}s in {prompt!r}: a judge cannot tell them apart (one "
                               f"group of them, 'two {color} {shape}s', can be told)", shape_word)
        groups.append(Group(count, color, shape, size))
        if pos == len(words):
            break
        if len(groups) == MAX_GROUPS:
            fail(words[pos], f"the end of the prompt (at most {MAX_GROUPS} groups)")
        word = words[pos]
        if word == "and":
            relations.append(None)
            pos += 1
        elif word in ("above", "below"):
            relations.append(word)
            pos += 1
        elif word in ("left", "right") and pos + 1 < len(words) and words[pos + 1] == "of":
            relations.append(f"{word} of")
            pos += 2
        else:
            fail(word, "and, left of, right of, above, below")
    return Scene(tuple(groups), tuple(relations))


def scene_or_none(prompt: str) -> Scene | None:
    """The prompt's scene, or None for a prompt outside the grammar (a real-world prompt: no spec, no skills)."""
    try:
        return parse(prompt)
    except ValueError:  # GrammarError, or a scene the grammar cannot hold
        return None


def is_binding_pair(a: Group, b: Group) -> bool:
    """Two groups that test attribute binding: different colors and different shapes."""
    return a.color != b.color and a.shape != b.shape


def scene_skills(scene: Scene) -> list[str]:
    """The skills a scene exercises (the skill tags of its ledger records)."""
    skills = ["color", "shape", "count"]
    if any(r is not None for r in scene.relations):
        skills.append("spatial")
    if any(is_binding_pair(a, b) for i, a in enumerate(scene.groups) for b in scene.groups[i + 1 :]):
        skills.append("binding")
    if any(g.size for g in scene.groups):
        skills.append("size")
    return skills
