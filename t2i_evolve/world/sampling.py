"""Random prompts from the grammar, restricted to a slice (group count, object count, crowding)."""

from __future__ import annotations

from collections.abc import Collection, Set
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, UserError
from .grammar import COLORS, MAX_GROUPS, RELATIONS, SHAPES, SIZES, Group, Scene, parse, render_prompt, scene_skills
from .render import crowding


@dataclass(frozen=True)
class GrammarSlice:
    """Which part of the grammar to draw from (a demo may use 1-2 groups, say)."""

    min_groups: int = 1
    max_groups: int = 3
    max_count: int = 3
    max_objects: int = 6
    max_crowding: float = 0.5
    resolution: int = 32
    p_size: float = 0.3
    p_relation: float = 0.7

    def __post_init__(self):  # a slice with no scenes in it fails here, in one line, not deep in a sampler
        if not 1 <= self.min_groups <= self.max_groups <= MAX_GROUPS:
            raise ConfigError(f"groups: need 1 <= min_groups <= max_groups <= {MAX_GROUPS}, got min_groups "
                              f"{self.min_groups}, max_groups {self.max_groups}")
        # Every group count the sampler may draw must have scenes (it draws the count once, then scenes of it).
        if self.max_count < 1 or self.max_objects < self.max_groups:
            raise ConfigError(f"max_count ({self.max_count}) must be at least 1 and max_objects ({self.max_objects}) "
                              f"at least max_groups ({self.max_groups})")
        size = "small" if self.p_size > 0 else None  # the least crowded scene: max_groups single objects at that size
        least = crowding(Scene(tuple(Group(1, color, "circle", size) for color in list(COLORS)[:self.max_groups]),
                               (None,) * (self.max_groups - 1)), self.resolution)
        if least > self.max_crowding:
            raise ConfigError(f"max_crowding {self.max_crowding:g} admits no scene of {self.max_groups} groups: as "
                              f"many single {size or 'medium'} objects at {self.resolution} px already need {least:.2f}")


def sample_scene(rng: np.random.Generator, slice_: GrammarSlice = GrammarSlice()) -> Scene:
    """One random scene. Groups differ in (color, shape), so every question has one referent."""
    n_groups = int(rng.integers(slice_.min_groups, slice_.max_groups + 1))
    while True:
        pairs = set()
        groups = []
        for _ in range(n_groups):
            while True:
                color = str(rng.choice(list(COLORS)))
                shape = str(rng.choice(SHAPES))
                if (color, shape) not in pairs:
                    break
            pairs.add((color, shape))
            size = str(rng.choice(SIZES)) if rng.random() < slice_.p_size else None
            groups.append(Group(int(rng.integers(1, slice_.max_count + 1)), color, shape, size))
        scene = Scene(tuple(groups), (None,) * (n_groups - 1))
        if scene.n_objects <= slice_.max_objects and crowding(scene, slice_.resolution) <= slice_.max_crowding:
            break
    relations = tuple(
        str(rng.choice(RELATIONS)) if rng.random() < slice_.p_relation else None for _ in range(n_groups - 1)
    )
    return Scene(tuple(groups), relations)


class GrammarPrompts:
    """`PromptSource` over the grammar. `skill` picks scenes that exercise that skill."""

    def __init__(self, slice_: GrammarSlice = GrammarSlice()):
        self.slice = slice_

    def sample(self, n: int, *, seed: int, skill: str | None = None) -> list[str]:
        rng = np.random.default_rng(seed)
        prompts: list[str] = []
        for _ in range(1000 * max(n, 1)):
            if len(prompts) == n:
                return prompts
            scene = sample_scene(rng, self.slice)
            if skill is None or skill in scene_skills(scene):
                prompts.append(render_prompt(scene))
        raise UserError(f"this grammar slice has (almost) no prompts that exercise {skill!r}: {self.slice}")


def distinct_prompts(slice_: GrammarSlice, n: int, *, seed: int) -> list[str]:
    """Up to `n` distinct random prompts of the slice (e.g. a held-out set)."""
    return list(dict.fromkeys(GrammarPrompts(slice_).sample(4 * n + 50, seed=seed)))[:n]


def iid_prompts(slice_: GrammarSlice, n: int, *, seed: int, exclude: Collection[str] = (),
                rare_words: Collection[str] = (), rare_weight: float = 1.0) -> list[str]:
    """`n` independent random prompts of the slice, none in `exclude`. Repeats are kept, so a set of any
    size has the slice's mix of prompts; a larger `n` extends the list a smaller one gives.

    `rare_words` give the mix a long tail, as users' prompts have: a prompt naming one of them (a color or
    a shape) is kept at `rare_weight` odds, so "yellow" can be one prompt in fifty where the slice has it in
    six. Benchmarks (GenEval, and the held-out prompts here) weigh every word alike instead."""
    exclude = exclude if isinstance(exclude, Set) else set(exclude)  # (a set's own membership: `PromptKeys`)
    drawn = GrammarPrompts(slice_).sample(4 * n + 100, seed=seed)
    if rare_words:  # one coin per drawn prompt, so the stream (and a smaller n's prefix) stays the same
        coins = np.random.default_rng([seed, 7_919]).random(len(drawn))
        rare = set(rare_words)
        drawn = [p for p, coin in zip(drawn, coins) if coin < rare_weight or not rare & _words(p)]
    drawn = [p for p in drawn if p not in exclude]
    if len(drawn) < n:
        tail = f" and with {', '.join(rare_words)} kept at {rare_weight:g} odds" if rare_words else ""
        raise UserError(f"the grammar slice is too small for {n} prompts beside {len(exclude)} excluded ones{tail}")
    return drawn[:n]


def _words(prompt: str) -> set[str]:
    """The colors and shapes a prompt names."""
    return {word for group in parse(prompt).groups for word in (group.color, group.shape)}
