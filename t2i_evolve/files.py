"""Files a crash cannot leave half-written: the one way every part of t2i-evolve writes a file it reads back."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # (read by setting it: there is no other way; set back at once, before any thread starts)
    os.umask(mask)
    return mask


_UMASK = _umask()


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that `path` holds either what it held before or all of `data`, even after a crash.

    The bytes go to a temporary file in the same folder (named `.<name>.<random>.tmp`, so nothing
    mistakes it for the real file), are fsynced, and only then renamed over `path`; the folder is fsynced
    too, so the rename itself survives a power cut. Text is written as UTF-8.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if os.name == "posix":  # mkstemp's file is the owner's alone: give it the mode any new file gets here
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: str | os.PathLike):
    """What a JSON file holds; None for a file that is missing or not JSON (never written whole)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced; Windows cannot)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
