"""Draw a scene: place objects consistently with the relations, with a gap between them, then paint.

Rendering is split in two steps so teachers can damage either one (a wrong layout, a wrong paint job)
and so the ground truth of an image is always known: `layout()` returns the placed objects, and the
same question-answering code that the pixel judge runs on segmented pixels runs on that list.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UserError
from .grammar import COLORS, Scene, parse, render_prompt

# Object extent (bounding-box side) as a share of the image side, per size word.
EXTENT = {"small": 0.17, None: 0.23, "big": 0.31}
SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)


class NoRoom(UserError):
    """The scene's objects do not fit on the canvas with gaps between them."""


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: what it is and where (pixel units of the final image)."""

    color: str
    shape: str
    cx: float
    cy: float
    extent: float
    group: int = -1


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded by a stable hash of `parts` (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _allowed(
    grid: np.ndarray, extent: float, placed: list[PlacedObject], gap: float, resolution: int
) -> np.ndarray:
    """Mask of candidate centres (rows of `grid`) where an object of `extent` fits without touching."""
    lo, hi = extent / 2 + 1, resolution - extent / 2 - 1
    ok = (grid[:, 0] >= lo) & (grid[:, 0] <= hi) & (grid[:, 1] >= lo) & (grid[:, 1] <= hi)
    for p in placed:
        reach = (extent + p.extent) / 2 + gap
        ok &= (np.abs(grid[:, 0] - p.cx) >= reach) | (np.abs(grid[:, 1] - p.cy) >= reach)
    return ok


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _side(grid: np.ndarray, relation: str, others: list[PlacedObject], margin: float) -> np.ndarray:
    """Mask of centres standing in `relation` to every object of `others`."""
    x, y = grid[:, 0], grid[:, 1]
    if relation == "left of":
        return x + margin <= min(o.cx for o in others)
    if relation == "right of":
        return x - margin >= max(o.cx for o in others)
    if relation == "above":
        return y + margin <= min(o.cy for o in others)
    return y - margin >= max(o.cy for o in others)


def crowding(scene: Scene, resolution: int = 32) -> float:
    """Share of the canvas the scene's objects need, gaps included (above ~0.5 random layouts jam)."""
    gap = max(2.0, 0.06 * resolution)
    need = sum(g.count * (EXTENT[g.size] * resolution + gap) ** 2 for g in scene.groups)
    return need / (resolution - 2) ** 2


def _try_layout(scene, rng, grid, resolution, gap, margin, respect_relations) -> list[PlacedObject] | None:
    # Biggest groups first: random sequential placement jams later, so the hardest objects go first.
    order = sorted(range(len(scene.groups)), key=lambda i: -EXTENT[scene.groups[i].size])
    objects: list[PlacedObject] = []
    for gi in order:
        group = scene.groups[gi]
        constraints = []
        if respect_relations and gi < len(scene.relations) and scene.relations[gi]:
            constraints.append((scene.relations[gi], gi + 1))
        if respect_relations and gi > 0 and scene.relations[gi - 1]:
            constraints.append((INVERSE[scene.relations[gi - 1]], gi - 1))
        for _ in range(group.count):
            extent = EXTENT[group.size] * resolution * rng.uniform(0.92, 1.08)
            ok = _allowed(grid, extent, objects, gap, resolution)
            for relation, other in constraints:
                others = [o for o in objects if o.group == other]
                if others:
                    ok &= _side(grid, relation, others, margin)
            candidates = np.flatnonzero(ok)
            if len(candidates) == 0:
                return None
            cx, cy = grid[rng.choice(candidates)]
            objects.append(PlacedObject(group.color, group.shape, float(cx), float(cy), float(extent), gi))
    return sorted(objects, key=lambda o: o.group)


def layout(
    scene: Scene,
    rng: np.random.Generator,
    resolution: int = 32,
    respect_relations: bool = True,
    tries: int = 200,
) -> list[PlacedObject]:
    """Random non-touching placement satisfying the scene's relations.

    Each object's centre is drawn uniformly from the half-pixel grid of centres that keep a gap to
    every placed object and stand in the right relation to the neighbouring groups already placed. A
    dead end (no room left) restarts the layout, so a failed attempt biases nothing; scenes too crowded
    for the canvas end in a `NoRoom` error naming them.
    """
    gap = max(2.0, 0.06 * resolution)
    margin = 0.05 * resolution
    axis = np.arange(0, resolution, 0.5) + 0.25
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    for _ in range(tries):
        objects = _try_layout(scene, rng, grid, resolution, gap, margin, respect_relations)
        if objects is not None:
            return objects
    raise NoRoom(
        f"no room for the {scene.n_objects} objects of {render_prompt(scene)!r} at {resolution}px "
        f"(crowding {crowding(scene, resolution):.2f}); try a larger resolution"
    )


def _polygon(shape: str, cx: float, cy: float, e: float) -> list[tuple[float, float]] | None:
    h = e / 2
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        # Outer radius r; the star's bounding box is 1.90r wide and 1.81r tall: scale it to e.
        r = e / 1.90
        top = cy - (1.81 * r) / 2
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.5 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), top + r + radius * math.sin(angle)))
        return points
    return None


def draw(objects: list[PlacedObject], resolution: int = 32, antialias: bool = True) -> Image.Image:
    """Paint objects on a white canvas; anti-aliased by drawing 4x larger and box-downsampling."""
    scale = SUPERSAMPLE if antialias else 1
    canvas = Image.new("RGB", (resolution * scale, resolution * scale), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    for o in objects:
        cx, cy, e = o.cx * scale, o.cy * scale, o.extent * scale
        fill = COLORS[o.color]
        polygon = _polygon(o.shape, cx, cy, e)
        box = [cx - e / 2, cy - e / 2, cx + e / 2, cy + e / 2]
        if o.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif o.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon(polygon, fill=fill)
    if scale > 1:
        canvas = canvas.resize((resolution, resolution), Image.BOX)
    return canvas


def degrade(image: Image.Image, rng: np.random.Generator, blur: float = 0.0, noise: float = 0.0) -> Image.Image:
    """Blur (Gaussian radius in pixels) and add Gaussian pixel noise (std in 0-255 units)."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (*image.size[::-1], 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def render(
    prompt: str | Scene, seed: int = 0, resolution: int = 32, antialias: bool = True
) -> tuple[Image.Image, list[PlacedObject]]:
    """A correct image of the prompt and its ground truth; deterministic per (prompt, seed)."""
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    objects = layout(scene, seeded_rng("render", scene, seed), resolution)
    return draw(objects, resolution, antialias), objects
