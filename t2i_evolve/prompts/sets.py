"""The prompts of a run's sets: held out, the seed set, the prior images; from the shapes grammar or from the
user's own prompts, a UTF-8 text file with one prompt per line.

A real base is improved on the prompts its users write, not on the shapes grammar. A recipe given a
`prompts_file` holds a seeded share of it out (the run is scored on those, and no teacher draws them for
training) and draws its seed set from the rest. The split depends on the file's prompts and the seed
only, so a benchmark's arms and a rerun of a run see the same one; a run keeps a copy of the prompts it
started from and refuses a file changed under it, whose split would hold out prompts it trained on.
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import UserError
from ..files import write_atomically
from ..world.grammar import scene_or_none
from ..world.sampling import distinct_prompts, iid_prompts

COPY_NAME = "prompts.txt"


def prompt_key(prompt: str) -> str:
    """What two spellings of one prompt share: lower case, single spaces, no full stop at the end ("A cat on a
    sofa." is "a cat on a sofa"), so a held-out prompt is not drawn for training under another spelling."""
    return " ".join(prompt.lower().split()).rstrip(" .")


class PromptKeys(Set):
    """A set of prompts that holds every spelling of them (`prompt_key`): the held-out prompts, as `exclude`."""

    def __init__(self, prompts: Iterable[str] = ()):
        self.keys = {prompt_key(prompt) for prompt in prompts}

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and prompt_key(prompt) in self.keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def read_prompt_file(path: Path | str) -> list[str]:
    """The distinct prompts of a text file (`prompt_key`), in file order: one per line, spaces collapsed, blank lines
    and lines starting with '#' skipped. A missing, unreadable or empty file is a one-line error."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompts_file {path}: not found") from None
    except IsADirectoryError:
        raise UserError(f"prompts_file {path}: a folder, not a text file of prompts (one per line)") from None
    except UnicodeDecodeError as e:
        line = text_line(e)
        raise UserError(f"prompts_file {path}: not UTF-8 text (line {line})") from None
    except OSError as e:
        raise UserError(f"prompts_file {path}: {e.strerror or e}") from None
    prompts, seen = [], set()
    for line in (" ".join(line.split()) for line in text.splitlines()):
        if line and not line.startswith("#") and prompt_key(line) not in seen:  # each once, as first spelled
            prompts.append(line)
            seen.add(prompt_key(line))
    if not prompts:
        raise UserError(f"prompts_file {path}: holds no prompts (one per line; '#' starts a comment line)")
    return prompts


def text_line(error: UnicodeDecodeError) -> int:
    """The 1-based line of the byte a decode failed at."""
    return error.object[: error.start].count(b"\n") + 1


def split_prompts(prompts: Sequence[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(held-out, rest): `held_out` prompts picked at random by `seed`, and the others in a seeded order, so
    a recipe that takes the first n of the rest takes a random n, and a larger n extends a smaller one's."""
    if held_out and held_out >= len(prompts):
        raise UserError(f"prompts_file has {len(prompts)} distinct prompts: eval_prompts ({held_out}) would hold out "
                        "all of them; set eval_prompts lower (0: no held-out score), or add prompts")
    order = np.random.default_rng([seed, 10_007]).permutation(len(prompts))
    return [prompts[i] for i in order[:held_out]], [prompts[i] for i in order[held_out:]]


def keep_prompts_copy(run_dir: Path, path: Path | str | None, replace: bool = False) -> None:
    """Keep the prompts a run started from in its folder (`prompts.txt`, in file order: pointed at, it splits
    alike; none: the grammar's prompts). A rerun from other prompts (another file's, the grammar's for a file's,
    a file's for the grammar's) is refused: its held-out prompts would not be the ones the run kept out of
    training. `replace`: the run has spent nothing yet, so other prompts may start it afresh."""
    copy = Path(run_dir) / COPY_NAME
    text = None if path is None else "".join(f"{prompt}\n" for prompt in read_prompt_file(path))
    if not replace:
        before = copy.read_text(encoding="utf-8") if copy.exists() else None
        if before is None and text is not None:
            raise UserError(f"{run_dir} started from the shapes grammar's prompts, not a prompts_file: rerun it "
                            "without one, or set a new output_dir")
        if before is not None and before != text:
            what = "has no prompts_file" if text is None else f"prompts_file {path} holds other prompts"
            raise UserError(f"this config {what}, but {run_dir} started from the prompts in {copy}: point prompts_file "
                            "at that copy to resume, or set a new output_dir")
        return
    if text is None:
        copy.unlink(missing_ok=True)
    else:
        write_atomically(copy, text.encode())


def prompt_split(config) -> tuple[list[str], list[str] | None]:
    """A recipe's (held-out prompts, the prompts its seed set is drawn from). Grammar: `eval_prompts` distinct
    prompts of its slice, set by its seed only, and None (the set draws from the grammar). `prompts_file`: a
    seeded share of it, and the rest. Held-out prompts repeat `eval_draws` times (images per prompt)."""
    if config.prompts_file is None:
        held_out, pool = distinct_prompts(config.grammar, config.eval_prompts, seed=config.seed + 10_007), None
    else:
        held_out, pool = split_prompts(read_prompt_file(config.prompts_file), config.eval_prompts, config.seed)
    return [prompt for prompt in held_out for _ in range(config.eval_draws)], pool


def open_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts the shapes grammar cannot read (real-world prompts), in order."""
    return [prompt for prompt in dict.fromkeys(prompts) if scene_or_none(prompt) is None]


def refuse_open_prompts(prompts: Sequence[str], source: str, part: str, instead: str) -> None:
    """One line, before any work, where `part` (which reads shapes-world prompts only) would meet others."""
    if others := open_prompts(prompts):
        raise UserError(f"{source} has {len(others)} prompts outside the shapes grammar (e.g. {others[0]!r}): "
                        f"{part} shapes-world prompts only; use {instead}")


def set_prompts(config, pool: Sequence[str] | None, n: int, seed: int, exclude: Iterable[str], **weights) -> list[str]:
    """`n` prompts for a set (the seed set, the prior images): random grammar prompts of the slice, repeats kept
    (uniform data has them; `weights`: rare words), or, with a `prompts_file`, up to n of its prompts that are not
    held out (`pool`), in an order `seed` sets (a larger n extends a smaller one's)."""
    if pool is None:
        return iid_prompts(config.grammar, n, seed=seed, exclude=exclude, **weights)
    exclude = exclude if isinstance(exclude, PromptKeys) else PromptKeys(exclude)  # (every spelling)
    pool = [prompt for prompt in pool if prompt not in exclude]  # (with random flips: held-out prompts' mirrors)
    order = np.random.default_rng([seed, 4_099]).permutation(len(pool))
    return [pool[i] for i in order[:n]]
