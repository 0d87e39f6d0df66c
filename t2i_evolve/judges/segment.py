"""Find the objects in a shapes-world image from its pixels.

Tolerant by design to what a small generator draws: blur (soft edges), noise, jitter and colors a bit
off. Colors are read from hue, which mixing with the white background or darkening leaves unchanged;
how much of a pixel is ink comes from its chroma relative to the palette color of that hue. Objects are
connected components of ink (scipy.ndimage), split by color where two colors touch. Shapes come from a
few geometric features, classified by the nearest class mean of features measured on rendered shapes.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import UserError
from ..world.grammar import COLORS, SHAPES
from ..world.render import EXTENT, PlacedObject, degrade, draw, seeded_rng

COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
PALETTE_HUE = np.array([colorsys.rgb_to_hsv(*(_PALETTE[i] / 255))[0] for i in range(len(_PALETTE))])
PALETTE_CHROMA = (_PALETTE.max(1) - _PALETTE.min(1)) / 255
INK = 0.5  # a pixel is ink when at least half of it is object color


def ink_and_color(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: how much of it is object color (0..~1) and the index of the nearest palette hue."""
    rgb = pixels.astype(np.float32) / 255
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    distance = np.abs(hue[..., None] - PALETTE_HUE)
    distance = np.minimum(distance, 1 - distance)
    color = distance.argmin(-1)
    return chroma / PALETTE_CHROMA[color], color


def white_balanced(pixels: np.ndarray) -> np.ndarray:
    """Scale channels so the background (the median pixel: most of a shapes image) is white again.

    A generated image's background is rarely exactly white; a tinted background would otherwise read
    as faint ink everywhere and inflate sizes.
    """
    background = np.median(pixels.reshape(-1, 3), axis=0).astype(np.float32)
    if background.min() < 128:  # not a light background: leave the image alone
        return pixels
    return np.clip(pixels.astype(np.float32) * (255 / np.maximum(background, 1)), 0, 255)


def shape_features(ink: np.ndarray) -> np.ndarray:
    """Scale-free features of one object's ink (0..1, cropped to its box with a one-pixel border).

    Soft ink instead of a thresholded mask keeps the anti-aliased edge, which is most of a 5-pixel
    object. fill: ink over covered area (square 1, circle .79, triangle .5, star ~.4); lean: how far the
    ink sits below the middle (triangles point up); top / bottom: ink in the corner cells (squares fill
    all four, triangles the bottom two); waist: the middle row's ink over the fullest row's.
    """
    ink = np.clip(ink, 0, 1)
    rows = ink.sum(1)
    row_cover, col_cover = ink.max(1), ink.max(0)
    width, height = col_cover.sum(), row_cover.sum()
    ys = np.arange(ink.shape[0]) + 0.5
    cy = float((rows * ys).sum() / rows.sum())
    top_edge = float(np.argmax(row_cover > 0.05)) + 1 - row_cover[np.argmax(row_cover > 0.05)]
    inner = ink[1:-1, 1:-1] if min(ink.shape) > 2 else ink
    ch, cw = max(1, round(inner.shape[0] / 4)), max(1, round(inner.shape[1] / 4))
    top = (inner[:ch, :cw].mean() + inner[:ch, -cw:].mean()) / 2
    bottom = (inner[-ch:, :cw].mean() + inner[-ch:, -cw:].mean()) / 2
    waist = np.interp(top_edge + height / 2, ys, rows) / max(rows.max(), 1e-6)
    return np.array(
        [rows.sum() / (width * height), (cy - top_edge) / height - 0.5, top, bottom, waist, height / width],
        dtype=np.float32,
    )


def soft_extent(ink: np.ndarray) -> float:
    """Object size in pixels from its soft ink: the larger of its column and row coverage."""
    ink = np.clip(ink, 0, 1)
    return float(max(ink.max(0).sum(), ink.max(1).sum()))


MIN_IMAGE_SIDE = 8
"""Below this a shape is a few pixels, and the shape classes cannot be measured (the renders they come from vanish)."""


class ImageTooSmall(UserError, ValueError):
    """An image the segmenter cannot read (a ValueError too: `serve-judge` answers it with a 400)."""


@lru_cache(maxsize=16)
def shape_prototypes(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Class means and spread of `shape_features` per (shape, size), and measured-over-true extent.

    Measured on renders of each shape at each size and sub-pixel offset, sharp and blurred, so the
    classifier and the size scale match what the renderer (and a model trained on it) draws. One class
    per size because a 5-pixel circle and a 10-pixel circle differ more than their shapes suggest.
    """
    feats, ratios, names = [], [], []
    rng = seeded_rng("shape-prototypes", resolution)
    for shape in SHAPES:
        for size_share in EXTENT.values():
            class_feats = []
            for _ in range(40):
                extent = size_share * resolution * rng.uniform(0.9, 1.1)
                centre = resolution / 2 + rng.uniform(-0.5, 0.5, 2)
                obj = PlacedObject("red", shape, float(centre[0]), float(centre[1]), extent)
                image = degrade(draw([obj], resolution), rng, blur=float(rng.choice([0, 0, 0.5, 0.8])), noise=4)
                for features, measured in find_objects(image, classify=False):
                    class_feats.append(features)
                    ratios.append((shape, measured / extent))
            feats.append(np.asarray(class_feats))
            names.append(shape)
    means = np.stack([f.mean(0) for f in feats])
    spread = np.concatenate([f - m for f, m in zip(feats, means)]).std(0) + 1e-3
    ratio = np.array([np.median([r for s, r in ratios if s == shape]) for shape in SHAPES])
    return means, spread, ratio, names


def find_objects(image: Image.Image, classify: bool = True, min_share: float = 0.004) -> list:
    """Segment an image into `PlacedObject`s (with `classify=False`: their raw shape features)."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ImageTooSmall(f"a {image.width}x{image.height} image: the pixel judge reads scenes of at least "
                            f"{MIN_IMAGE_SIDE} px a side")
    pixels = white_balanced(np.asarray(image.convert("RGB")))
    resolution = pixels.shape[0]
    ink, color = ink_and_color(pixels)
    labels, _ = ndimage.label(ink >= INK)
    min_area = max(4, min_share * pixels.shape[0] * pixels.shape[1])
    found = []
    for index in range(1, labels.max() + 1):
        for piece, c in _split_by_color(labels == index, color, min_area):
            # The piece's ink with a one-pixel border, so its soft edge counts too.
            region = ndimage.binary_dilation(piece)
            rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            piece_ink = np.clip(ink[box] * region[box] * (color[box] == c), 0, 1)
            features, extent = shape_features(piece_ink), soft_extent(piece_ink)
            if not classify:
                found.append((features, extent))
                continue
            # Nearest class mean in units of each feature's spread; extent rescaled per shape (a
            # star's thin points cover less of its box than a square's edges do).
            means, spread, extent_ratio, names = shape_prototypes(resolution)
            shape = SHAPES.index(names[int((((features - means) / spread) ** 2).sum(1).argmin())])
            # Centre of the covered box, not of the ink: the renderer places shapes by their box,
            # and a triangle's ink sits a sixth of its height below the box centre.
            row_cover, col_cover = piece_ink.max(1), piece_ink.max(0)
            cy = float((row_cover * np.arange(len(row_cover))).sum() / row_cover.sum())
            cx = float((col_cover * np.arange(len(col_cover))).sum() / col_cover.sum())
            found.append(
                PlacedObject(
                    color=COLOR_NAMES[c],
                    shape=SHAPES[shape],
                    cx=float(cols[0] + cx + 0.5),
                    cy=float(rows[0] + cy + 0.5),
                    extent=extent / float(extent_ratio[shape]),
                )
            )
    return found


def _split_by_color(component: np.ndarray, color: np.ndarray, min_area: float) -> list[tuple[np.ndarray, int]]:
    """One component, or one piece per substantial color where objects of two colors touch."""
    counts = np.bincount(color[component], minlength=len(COLOR_NAMES))
    colors = [c for c in np.argsort(-counts) if counts[c] >= min_area and counts[c] >= 0.25 * component.sum()]
    if len(colors) <= 1:
        return [(component, int(counts.argmax()))] if component.sum() >= min_area else []
    pieces = []
    for c in colors:
        labels, n = ndimage.label(component & (color == c))
        pieces += [(labels == i, int(c)) for i in range(1, n + 1) if (labels == i).sum() >= min_area]
    return pieces
