"""Reading images a user hands us, with one-line errors instead of PIL tracebacks."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import UserError


# what PIL raises for a file it cannot read (one past its size limit, a decompression bomb, too)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; a missing or corrupt file raises `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is a folder, not an image" if path.is_dir() else f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UNREADABLE as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it; `UserError` if it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except UNREADABLE as e:  # (a missing file is an OSError too)
        raise UserError(f"cannot read {what} {path}: {e}") from None
