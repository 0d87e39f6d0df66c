"""Reading images a user hands us, with one-line errors instead of PIL tracebacks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import UserError


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; a missing or corrupt file raises `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is a folder, not an image" if path.is_dir() else f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
