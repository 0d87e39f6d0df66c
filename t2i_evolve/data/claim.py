"""Run folders: whose a folder is, and one process at a time in it.

A command starts or resumes a run only in a folder that is new, or its own (`check_run_folder`): never over
another command's results, a ledger it did not make, or files of the user's that it would write over.

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

import yaml

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

_claimed: dict[Path, IO[str]] = {}
"""Folder -> its open lock file: the claim lasts as long as the file stays open."""
_made: set[Path] = set()  # of those, the ones it made (`give_back_unused_folders`)


def claim_run_folder(folder: str | os.PathLike, command: str, launched: bool = False) -> Path:
    """Make `folder` if needed and hold it for this process; a one-line UserError naming the process that holds
    it already (its `command` and pid, written into the lock file). `launched`: the command may run as several
    processes (`train`, whose main process claims); others refuse to (each process would pay for every call)."""
    if not launched and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{command} runs as one process (one ledger; each teacher and judge call paid once): start it "
                        f"with `t2i-evolve {command}`, not under torchrun or accelerate launch")
    folder = Path(folder)
    made = not folder.exists()
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
    if made:
        _made.add(key)
    return folder


def give_back_unused_folders() -> None:
    """Remove the run folders this process made that hold nothing but their lock: a command refused after it
    claimed its folder (a model path that is not a model, a missing file) leaves no empty folder behind it."""
    for key in [key for key in _claimed if key in _made]:
        try:
            if os.listdir(key) == [LOCK_FILE]:
                release_run_folder(key)
                (key / LOCK_FILE).unlink()
                key.rmdir()
        except OSError:  # (gone already, or something came into it meanwhile: left as it is)
            pass


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


RUN_MARKERS = {"evolve.yaml": "evolve", "demo.yaml": "demo", "config.yaml": "train", "model_index.json": "model"}
"""The file each command leaves in a folder it writes, in the order that tells them apart (a demo's run folder holds
its trainer's config.yaml too)."""

RUN_OUTPUTS = {"evolve": ("prompts.txt", "rounds", "metrics.jsonl", "summary.json", "report.html"),
               "demo": ("config.yaml", "checkpoints", "model", "metrics.jsonl", "summary.json", "report.html"),
               "train": ("config.yaml", "checkpoints", "model", "lora", "metrics.jsonl")}
"""What each command writes into its run folder after its marker: in a folder without the marker they are someone
else's (a user's own report.html or metrics.jsonl), which a new run would write over."""


def folder_owner(folder: str | os.PathLike) -> str | None:
    """Whose folder this is: 'evolve', 'demo' or 'train' (a run of that command), 'model' (a model folder),
    'import' (a ledger with records and no run's marker), or None (new, empty, or nothing of ours)."""
    from .ledger import Ledger

    folder = Path(folder)
    for marker, owner in RUN_MARKERS.items():
        if (folder / marker).is_file() and (marker != "config.yaml" or _is_train_config(folder / marker)):
            return owner
    if (folder / "ledger.sqlite").exists():
        with Ledger(folder, read_only=True) as ledger:
            return "import" if ledger.count(None) else None
    return None


def _is_train_config(path: Path) -> bool:
    """Whether a config.yaml is one `train` saved (its keys), not some other tool's config file."""
    try:
        if path.stat().st_size > 1_000_000:
            return False
        fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return False
    return isinstance(fields, dict) and {"model", "output_dir", "steps"} <= fields.keys()


def check_run_folder(run_dir: str | os.PathLike, command: str, given: tuple[str, ...] = ()) -> Path:
    """`run_dir`, if `command` may start or resume a run there: not a file, and nothing another command wrote (a
    ledger whose records it would take for its own set, results it would write over), nor files of the user's that
    the run writes, but those it was `given` (train's --config, kept there). Else a one-line UserError."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a folder: choose a folder for the run")
    owner = folder_owner(run_dir)
    if owner not in (None, command):
        raise UserError(f"{run_dir} is {describe_owner(owner)}: choose a new output folder")
    if owner is None and (taken := [name for name in RUN_OUTPUTS[command]
                                    if name not in given and (run_dir / name).exists()]):
        raise UserError(f"{run_dir} holds {', '.join(taken)} that no {command} run made, which a {command} run would "
                        "write over: choose a new output folder (or move them)")
    return run_dir


def describe_owner(owner: str) -> str:
    """'an evolve run's folder', 'a model folder', ... for `folder_owner`'s answer."""
    if owner == "import":
        return "a ledger of records that no run made (an import)"
    return "a model folder" if owner == "model" else f"{'an' if owner == 'evolve' else 'a'} {owner} run's folder"
