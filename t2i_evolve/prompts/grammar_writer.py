"""A `PromptWriter` for the shapes world: what an LLM writer does, done exactly and offline by the grammar.

It lets every recipe that expands, mutates or asks for skill-specific prompts run (and be tested) with
no LLM, and it is the reference an LLM writer can be checked against, since each of its promises is a
property of parsed scenes:

- `variations` keep a prompt's *structure* (`structure`: the number of groups, the relations, which
  groups are plural and which carry a size word) and its skills, and redraw the details: colors,
  shapes, counts of plural groups (two or three) and sizes (small or big); a writer made with
  `keep=("color",)` (or shape) also keeps each group's color (shape), as an LLM told to keep the
  concept a base model missed would;
- `new_structures` returns prompts whose structure none of the given prompts has (nor each other);
- `skill_prompts(skill)` returns prompts that exercise `skill` per `scene_skills` (and, for count,
  with a count above one).

Every output is a canonical `render_prompt` text inside the writer's `GrammarSlice`, so it parses.
Distinct means a distinct scene here: in a grammar of a few dozen words, ROUGE-L above 0.7 is what a
one-word change gives, and "two red circles" versus "two red squares" are different data, not
duplicates. Everything is drawn from the seed (and the input), so a call is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace

import numpy as np

from ..errors import UserError
from ..protocols import SKILLS
from ..world.grammar import COLORS, SHAPES, SIZES, Group, Scene, parse, render_prompt, scene_skills
from ..world.render import crowding, seeded_rng
from ..world.sampling import GrammarSlice, sample_scene

Structure = tuple[int, tuple[str | None, ...], tuple[bool, ...], tuple[bool, ...]]

TRIES_PER_PROMPT = 200
"""Draws per prompt asked for before giving up (a narrow slice may simply not have k more)."""


def structure(scene: Scene) -> Structure:
    """What variations keep and new structures change: groups, relations, plural and size patterns."""
    return (
        len(scene.groups),
        scene.relations,
        tuple(g.count > 1 for g in scene.groups),
        tuple(g.size is not None for g in scene.groups),
    )


def exercises(scene: Scene, skill: str) -> bool:
    """Whether a scene is a good prompt for `skill`: the skill is among `scene_skills`, and a count
    prompt has a count above one (every scene is tagged count, but "a red circle" barely tests it).
    """
    if skill == "count":
        return any(g.count > 1 for g in scene.groups)
    return skill in scene_skills(scene)


class GrammarPromptWriter:
    """`PromptWriter` over the shapes grammar, restricted to a `GrammarSlice`. Offline and seeded."""

    def __init__(self, slice_: GrammarSlice = GrammarSlice(), id: str = "grammar-writer",
                 keep: Collection[str] = ()):
        if unknown := set(keep) - {"color", "shape"}:
            raise UserError(f"a variation can keep a group's color or shape, not {', '.join(sorted(unknown))}")
        self.slice = slice_
        self.id = id
        self.keep = frozenset(keep)

    def sample(self, n: int, *, seed: int, skill: str | None = None) -> list[str]:
        """Up to `n` distinct prompts from the slice (exercising `skill` if given)."""
        if skill is not None:
            return self.skill_prompts(skill, n, seed=seed)
        rng = seeded_rng("sample", self.slice, seed)
        return self._draw(n, lambda: sample_scene(rng, self.slice), keep=lambda scene: True)

    def variations(self, prompt: str, k: int, *, seed: int) -> list[str]:
        """Up to `k` scenes with `prompt`'s structure and skills and other details (never `prompt`)."""
        scene = parse(prompt)
        rng = seeded_rng("variations", self.slice, render_prompt(scene), seed)
        want_structure, want_skills = structure(scene), scene_skills(scene)

        def keep(new: Scene) -> bool:
            return structure(new) == want_structure and scene_skills(new) == want_skills

        out = self._draw(k, lambda: self._redraw(scene, rng), keep=keep, exclude=[scene])
        if len(out) < k:  # a rare pattern (three groups of one shape: no binding), which free redraws seldom keep
            out += self._draw(k - len(out), lambda: self._redraw(scene, rng, same_pattern=True), keep=keep,
                              exclude=[scene, *map(parse, out)])
        return out

    def new_structures(self, prompts: Sequence[str], k: int, *, seed: int) -> list[str]:
        """Up to `k` scenes whose structures differ from those of `prompts` and from each other."""
        scenes = [parse(p) for p in prompts]
        taken = {structure(s) for s in scenes}
        rng = seeded_rng("new_structures", self.slice, tuple(render_prompt(s) for s in scenes), seed)

        def keep(scene: Scene) -> bool:
            if structure(scene) in taken:
                return False
            taken.add(structure(scene))
            return True

        # Relations and sizes are drawn at the slice's rates, which can make some structures rare;
        # drawing them at even odds explores the structures the slice allows more evenly.
        explore = replace(self.slice, p_relation=_even(self.slice.p_relation), p_size=_even(self.slice.p_size))
        return self._draw(k, lambda: sample_scene(rng, explore), keep=keep, exclude=scenes)

    def skill_prompts(self, skill: str, k: int, *, seed: int, examples: Sequence[str] = ()) -> list[str]:
        """Up to `k` scenes that exercise `skill`; `examples` are left out of the answer.

        The slice is tilted towards the skill (two or more groups for spatial and binding, a relation
        for spatial, more size words for size); when the slice cannot have the skill at all (one group
        for spatial), the answer is empty.
        """
        if skill not in SKILLS:
            raise UserError(f"unknown skill {skill!r} (the shapes world has {', '.join(SKILLS)})")
        tilted = _tilt(self.slice, skill)
        if tilted is None:
            return []
        rng = seeded_rng("skill", self.slice, skill, seed)
        exclude = [parse(e) for e in examples]
        return self._draw(k, lambda: sample_scene(rng, tilted), keep=lambda s: exercises(s, skill), exclude=exclude)

    # -- helpers -------------------------------------------------------------------------------------

    def _draw(
        self,
        k: int,
        draw: Callable[[], Scene],
        keep: Callable[[Scene], bool],
        exclude: Iterable[Scene] = (),
    ) -> list[str]:
        """Distinct prompts from `draw` that `keep` accepts, not in `exclude`, at most `k` of them."""
        seen = {render_prompt(s) for s in exclude}
        out: list[str] = []
        for _ in range(TRIES_PER_PROMPT * max(k, 0)):
            if len(out) == k:
                break
            scene = draw()
            text = render_prompt(scene)
            if text not in seen and keep(scene):
                seen.add(text)
                out.append(text)
        return out

    def _redraw(self, scene: Scene, rng: np.random.Generator, same_pattern: bool = False) -> Scene:
        """`scene` with new colors, shapes (unless `keep` names them), plural counts and sizes;
        relations and patterns kept. `same_pattern`: colors and shapes renamed one for one, so the groups that
        shared a color (or shape) still do and the rest still differ: the scene's skills stay as they were.

        Groups get distinct (color, shape) pairs, as `sample_scene` gives them, and the scene must fit
        the slice; a draw that does not is returned unchanged, and `_draw` then rejects it.
        """
        if same_pattern:
            colors = dict(zip(COLORS, map(str, rng.permutation(list(COLORS)))))
            shapes = dict(zip(SHAPES, map(str, rng.permutation(list(SHAPES)))))
        pairs: set[tuple[str, str]] = set()
        groups = []
        for g in scene.groups:
            if same_pattern:
                color, shape = colors[g.color], shapes[g.shape]
            else:
                color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            color = g.color if "color" in self.keep else color
            shape = g.shape if "shape" in self.keep else shape
            plural = g.count > 1 and self.slice.max_count >= 2
            count = int(rng.integers(2, self.slice.max_count + 1)) if plural else g.count
            size = None if g.size is None else str(rng.choice(SIZES))
            pairs.add((color, shape))
            groups.append(Group(count, color, shape, size))
        new = Scene(tuple(groups), scene.relations)
        if len(pairs) < len(groups) or not self._fits(new):
            return scene
        return new

    def _fits(self, scene: Scene) -> bool:
        s = self.slice
        return (
            s.min_groups <= len(scene.groups) <= s.max_groups
            and all(g.count <= s.max_count for g in scene.groups)
            and scene.n_objects <= s.max_objects
            and crowding(scene, s.resolution) <= s.max_crowding
        )


def _even(p: float) -> float:
    """0.5 where the slice allows both outcomes; 0 or 1 stays, since the slice forbids the other."""
    return p if p in (0.0, 1.0) else 0.5


def _tilt(slice_: GrammarSlice, skill: str) -> GrammarSlice | None:
    """`slice_` biased towards scenes that exercise `skill`; None when it has none."""
    if skill in ("spatial", "binding"):
        if slice_.max_groups < 2 or (skill == "spatial" and slice_.p_relation == 0.0):
            return None
        slice_ = replace(slice_, min_groups=max(2, slice_.min_groups))
        if skill == "spatial":
            slice_ = replace(slice_, p_relation=1.0)
    if skill == "size":
        if slice_.p_size == 0.0:
            return None
        slice_ = replace(slice_, p_size=max(slice_.p_size, 0.7))
    if skill == "count" and slice_.max_count < 2:
        return None
    return slice_
