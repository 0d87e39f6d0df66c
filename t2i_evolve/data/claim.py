"""One process at a time in a run folder.

Two processes in one run folder (a command started twice, a scheduler that requeues a job still running) would
each take the other's calls in flight for dead ones and pay for them again, and write over each other's
checkpoints. A command that writes a run folder claims it first: an exclusive `flock` on `<folder>/.lock`, which
the kernel drops when the process exits however it ends (SIGKILL included), so a rerun after a crash resumes.
A run releases its folder when it finishes; one stopped by an error keeps it until its process exits (a CLI
command at once) or reruns it there (a notebook: claiming a folder this process holds is a no-op). Where there is
no `flock` (Windows, some network file systems) nothing is locked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

_claimed: dict[Path, IO[str]] = {}
"""Folder -> its open lock file: the claim lasts as long as the file stays open."""


def claim_run_folder(folder: str | os.PathLike, command: str, launched: bool = False) -> Path:
    """Make `folder` if needed and hold it for this process; a one-line UserError naming the process that holds
    it already (its `command` and pid, written into the lock file). `launched`: the command may run as several
    processes (`train`, whose main process claims); others refuse to (each process would pay for every call)."""
    if not launched and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{command} runs as one process (one ledger; each teacher and judge call paid once): start it "
                        f"with `t2i-evolve {command}`, not under torchrun or accelerate launch")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _claimed:
        if _still_ours(folder, _claimed[key]):
            return folder
        _claimed.pop(key).close()  # the folder was deleted (and made again) since: claim it afresh
    if fcntl is None:
        return folder
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{folder} is in use by {holder}: let it finish or stop it, then rerun") from None
    except OSError:  # the file system has no flock: run unlocked, as before claims existed
        handle.close()
        return folder
    handle.seek(0)
    handle.truncate()
    handle.write(f"t2i-evolve {command} (pid {os.getpid()})\n")
    handle.flush()
    _claimed[key] = handle
    return folder


def release_run_folder(folder: str | os.PathLike) -> None:
    """Let other processes run in `folder` again (its run is done); a folder this process does not hold is a no-op."""
    handle = _claimed.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file drops its flock


def _still_ours(folder: Path, handle: IO[str]) -> bool:
    """Whether the lock file we hold is still the folder's (not deleted, with its folder, since we took it)."""
    try:
        return os.stat(folder / LOCK_FILE).st_ino == os.fstat(handle.fileno()).st_ino
    except OSError:
        return False
