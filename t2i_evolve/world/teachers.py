"""Procedural teachers: stand-ins for the advanced models (often paid APIs) a user learns from.

One strong teacher draws every prompt correctly; each deficit teacher fails one named skill with
probability `p`, the way real models have known weaknesses (colors bleed, counts drift, relations are
ignored, attributes swap between objects). Every teacher is deterministic per (prompt, seed), counts
its calls, charges an assumed price per call, and can inject transient faults so retry paths run.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import Field, ValidationError, model_validator

from ..config import Config
from ..errors import CallTimeout, ConfigError, GrammarError, RequestRefused, TransientError
from ..protocols import SKILLS
from .grammar import COLORS, SHAPES, SIZES, Scene, is_binding_pair, parse
from .render import NoRoom, PlacedObject, crowding, degrade, draw, layout, seeded_rng

Skill = Literal["color", "shape", "count", "spatial", "binding", "size"]
DEFAULT_P: dict[str, float] = {"color": 0.7, "shape": 0.7, "count": 0.7, "spatial": 1.0, "binding": 0.8, "size": 0.8}
# The words a deficit can be blind to (`blind_to`), by deficit.
BLIND_WORDS: dict[str, set[str]] = {"color": set(COLORS), "shape": set(SHAPES)}


class TeacherConfig(Config):
    """A procedural teacher. `p` defaults per deficit (see DEFAULT_P) to a loss of >= 30 points."""

    id: str = "strong"
    deficit: Skill | None = None
    p: float | None = None
    blind_to: list[str] = Field(default_factory=list, description="Color or shape words a color or shape deficit "
                                "applies to (empty: every word). A real model's weakness is often systematic: "
                                "some concepts it never draws right, the rest it draws well.")
    blur: float = 0.0
    noise: float = 0.0
    resolution: int = 32
    antialias: bool = True
    price_per_call: float = 0.04
    transient_error_rate: float = 0.0
    timeout_rate: float = 0.0

    @model_validator(mode="after")
    def _blind_words_fit_the_deficit(self):
        words = BLIND_WORDS.get(self.deficit or "")
        if self.blind_to and words is None:
            raise ValueError(f"teacher {self.id}: blind_to needs a color or shape deficit, not {self.deficit!r}")
        if unknown := set(self.blind_to) - (words or set()):
            raise ValueError(f"teacher {self.id}: blind_to has words that are not {self.deficit}s: "
                              f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(words))})")
        return self


class ProceduralTeacher:
    """A `Generator` that draws the shapes world, with one optional skill deficit.

    `calls` counts successful calls; `call_log` (a file path) makes the count durable across processes
    by appending one JSON line per call, as a server's billing log would.
    """

    def __init__(self, config: TeacherConfig = TeacherConfig(), call_log: str | Path | None = None):
        self.config = config
        self.id = config.id
        self.deficit = config.deficit
        self.p = DEFAULT_P.get(config.deficit, 0.0) if config.p is None else config.p
        self.price_per_call = config.price_per_call
        self.call_log = Path(call_log) if call_log else None
        self.calls = 0
        self.faults = 0
        self._attempts: dict[tuple[str, int], int] = {}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | None]:
        """One image per prompt. A fault on a single request raises; in a batch, each request fails
        alone (None), as concurrent requests to an API do, so one fault does not sink the batch."""
        if len(prompts) == 1:
            self._maybe_fail(prompts[0], seeds[0])
            answered = [True]
        else:
            answered = [self._answers(prompt, seed) for prompt, seed in zip(prompts, seeds)]
        images = [self.draw(p, s)[0] if ok else None for p, s, ok in zip(prompts, seeds, answered)]
        drawn = [(p, s) for p, s, ok in zip(prompts, seeds, answered) if ok]
        self.calls += len(drawn)
        if self.call_log:
            lines = "".join(json.dumps({"teacher": self.id, "prompt": p, "seed": s}) + "\n" for p, s in drawn)
            fd = os.open(self.call_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        return images

    def outcomes(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | Exception | None]:
        return drawable_outcomes(self, prompts, seeds)

    def _answers(self, prompt: str, seed: int) -> bool:
        try:
            self._maybe_fail(prompt, seed)
        except TransientError:
            return False
        return True

    def _maybe_fail(self, prompt: str, seed: int) -> None:
        """Transient faults drawn per attempt, so a retry of the same request can succeed."""
        key = (prompt, seed)
        attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
        roll = seeded_rng("fault", self.id, prompt, seed, attempt).random()
        if roll < self.config.timeout_rate:
            self.faults += 1
            raise CallTimeout(f"teacher {self.id} timed out (simulated)")
        if roll < self.config.timeout_rate + self.config.transient_error_rate:
            self.faults += 1
            raise TransientError(f"teacher {self.id} answered 503 (simulated)")

    def draw(self, prompt: str | Scene, seed: int) -> tuple[Image.Image, list[PlacedObject]]:
        """The image and what is really in it (ground truth, deficits included); no call is counted."""
        scene = parse(prompt) if isinstance(prompt, str) else prompt
        rng = seeded_rng("teacher", self.id, scene, seed)
        scene = self._damage_scene(scene, rng)
        respect = not (self.deficit == "spatial" and rng.random() < self.p)
        try:
            objects = layout(scene, rng, self.config.resolution, respect_relations=respect)
        except NoRoom:  # a deficit made the scene too crowded: draw the prompt's own scene instead
            objects = layout(parse(prompt) if isinstance(prompt, str) else prompt, rng, self.config.resolution)
        if self.deficit == "binding":
            objects = self._swap_colors(scene, objects, rng)
        image = draw(objects, self.config.resolution, self.config.antialias)
        return degrade(image, rng, self.config.blur, self.config.noise), objects

    def _damage_scene(self, scene: Scene, rng: np.random.Generator) -> Scene:
        if self.deficit not in ("color", "shape", "count", "size"):
            return scene
        # Replacements avoid every color / shape of the prompt, so a miss reads as this deficit alone
        # (a color moved onto another group's shape would read as a binding error).
        unused_colors = [c for c in COLORS if all(c != g.color for g in scene.groups)]
        unused_shapes = [s for s in SHAPES if all(s != g.shape for g in scene.groups)]
        groups = list(scene.groups)
        blind = set(self.config.blind_to)
        for i, g in enumerate(groups):
            if rng.random() >= self.p or (blind and {g.color, g.shape}.isdisjoint(blind)):
                continue
            if self.deficit == "color":
                groups[i] = replace(g, color=str(rng.choice(unused_colors)))
            elif self.deficit == "shape":
                groups[i] = replace(g, shape=str(rng.choice(unused_shapes or [s for s in SHAPES if s != g.shape])))
            elif self.deficit == "count":
                more = replace(g, count=g.count + 1)
                fits = crowding(Scene(tuple(groups[:i] + [more] + groups[i + 1 :]), scene.relations)) <= 0.55
                groups[i] = more if g.count == 1 or (fits and rng.random() < 0.5) else replace(g, count=g.count - 1)
            elif self.deficit == "size" and g.size:
                choices = [s for s in (*SIZES, None) if s != g.size]
                groups[i] = replace(g, size=choices[int(rng.integers(len(choices)))])
        return Scene(tuple(groups), scene.relations)

    def _swap_colors(self, scene: Scene, objects: list[PlacedObject], rng) -> list[PlacedObject]:
        """Swap the colors of a binding pair: every color is present, but on the wrong shape. Not onto a third
        group's color and shape: that would add to its count (a count error, not a binding one)."""
        groups = scene.groups
        taken = {(g.color, g.shape) for g in groups}
        pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))
                 if is_binding_pair(groups[i], groups[j])
                 and not taken & {(groups[j].color, groups[i].shape), (groups[i].color, groups[j].shape)}]
        if not pairs or rng.random() >= self.p:
            return objects
        i, j = pairs[int(rng.integers(len(pairs)))]
        ci, cj = scene.groups[i].color, scene.groups[j].color
        swap = {i: cj, j: ci}
        return [replace(o, color=swap.get(o.group, o.color)) for o in objects]


class CompoundTeacher(ProceduralTeacher):
    """One teacher with several scene deficits at once ('no-color+no-shape': blind to some colors and to some
    shapes), each applied by its own member in turn: a model that lacks what several others each lack, such
    as a base weaker than every teacher of a gallery. Scene deficits only (color, shape, count, size): spatial
    and binding ones act on the layout, which one teacher draws once."""

    def __init__(self, config: TeacherConfig, members: Sequence[ProceduralTeacher], call_log: str | Path | None = None):
        super().__init__(config, call_log)
        self.members = list(members)

    def _damage_scene(self, scene: Scene, rng: np.random.Generator) -> Scene:
        for member in self.members:
            scene = member._damage_scene(scene, rng)
        return scene


class MixtureTeacher:
    """Several teachers behind one id: each (prompt, seed) goes to one member, drawn by weight."""

    def __init__(self, id: str, members: Sequence[ProceduralTeacher], weights: Sequence[float] | None = None):
        self.id = id
        self.members = list(members)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(members), dtype=float)
        self.weights /= self.weights.sum()
        self.price_per_call = float(sum(w * m.price_per_call for w, m in zip(self.weights, self.members)))

    def member_for(self, prompt: str, seed: int) -> ProceduralTeacher:
        return self.members[int(seeded_rng("mixture", self.id, prompt, seed).choice(len(self.members), p=self.weights))]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | None]:
        """As `ProceduralTeacher.generate`: a fault on a single request raises, in a batch it fails that item
        alone (None), so the images of the others, paid for, are kept."""
        if len(prompts) == 1:
            return self.member_for(prompts[0], seeds[0]).generate(prompts, seeds)
        images: list[Image.Image | None] = []
        for p, s in zip(prompts, seeds):
            try:
                images.append(self.member_for(p, s).generate([p], [s])[0])
            except TransientError:
                images.append(None)
        return images

    def outcomes(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | Exception | None]:
        return drawable_outcomes(self, prompts, seeds)

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.members)


def drawable_outcomes(teacher, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image | Exception | None]:
    """`teacher.generate`, where a prompt outside the grammar (an LLM writer's, an import's) is refused alone, as an
    images endpoint refuses a prompt it cannot draw, instead of stopping the run at it (`CachedGenerator` reads
    these outcomes)."""
    refused = {}
    for i, prompt in enumerate(prompts):
        try:
            parse(prompt)
        except GrammarError as e:
            refused[i] = RequestRefused(f"teacher {teacher.id} cannot draw {prompt!r}: {e}")
    drawable = [i for i in range(len(prompts)) if i not in refused]
    images = iter(teacher.generate([prompts[i] for i in drawable], [seeds[i] for i in drawable]) if drawable else [])
    return [refused[i] if i in refused else next(images) for i in range(len(prompts))]


def gallery_teacher(id: str, resolution: int = 32, p: float | None = None, price_per_call: float | None = None,
                    blind_to: Sequence[str] = ()) -> ProceduralTeacher:
    """'strong' or 'no-<skill>' (that skill broken with probability `p`, default the gallery's; only on the
    words in `blind_to`, if any), or several deficits joined by '+' ('no-color+no-shape': each member takes
    the words of `blind_to` that are its kind's, every word of its kind where there are none)."""
    if "+" in id:
        parts = id.split("+")
        words = [BLIND_WORDS.get(part.removeprefix("no-"), set()) for part in parts]
        if stray := set(blind_to).difference(*words):
            raise ConfigError(f"teacher {id}: blind_to has words none of its deficits is about: "
                              f"{', '.join(sorted(stray))}")
        members = [gallery_teacher(part, resolution, p, None, [w for w in blind_to if w in kind])
                   for part, kind in zip(parts, words)]
        if tangled := [m.id for m in members if m.deficit in ("spatial", "binding")]:  # they act on the layout
            raise ConfigError(f"teacher {id}: {', '.join(tangled)} cannot join others (color, shape, count, size can)")
        price = {} if price_per_call is None else {"price_per_call": price_per_call}
        return CompoundTeacher(TeacherConfig(id=id, resolution=resolution, **price), members)
    deficit = None if id == "strong" else id.removeprefix("no-")
    if deficit is not None and deficit not in SKILLS:
        raise ConfigError(f"unknown gallery teacher {id!r}: use 'strong' or one of "
                          f"{', '.join('no-' + s for s in SKILLS)}")
    fields = {"id": id, "deficit": deficit, "resolution": resolution, "blind_to": list(blind_to)}
    fields |= {} if p is None else {"p": p}
    fields |= {} if price_per_call is None else {"price_per_call": price_per_call}
    try:
        return ProceduralTeacher(TeacherConfig(**fields))
    except ValidationError as e:  # e.g. a blind_to word that is not a color or shape: one line
        raise ConfigError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def default_gallery(resolution: int = 32, **overrides) -> list[ProceduralTeacher]:
    """The strong teacher and one teacher per skill deficit ('no-color', 'no-count', ...)."""
    configs = [TeacherConfig(id="strong", resolution=resolution, **overrides)]
    configs += [TeacherConfig(id=f"no-{s}", deficit=s, resolution=resolution, **overrides) for s in SKILLS]
    return [ProceduralTeacher(c) for c in configs]
