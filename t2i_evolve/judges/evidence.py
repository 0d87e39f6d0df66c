"""How much evidence a verdict needs before it spends teacher calls.

In EvolveDirector's loop a "teacher better" verdict buys `variations` teacher images, and so does a deletion
check that finds a record memorized. One verdict is one judge answer about one image of the base. Each can be
wrong for a reason of its own, and each has its own remedy here:

- the judge samples and answered wrong: ask it again (`votes`, majority deciding: `confirm_teacher_better`,
  and the `votes` of `unseen_variation_scores`);
- the base drew a bad image of a prompt it usually draws right (a diffusion model's sampling luck): let it
  draw again with new seeds (`draws`: `redraw_teacher_better`, and the `draws` of `unseen_variation_scores`).
  A skill the base lacks loses every draw; one it has loses only some, and at a teacher budget the calls
  are better spent on what it always gets wrong.

Every request is seeded and goes through the judge's call cache, so a rerun asks nothing twice.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from ..protocols import Comparison, PromptWriter
from .batch import compare_pairs, score_images


def confirm_teacher_better(judge, pairs: Sequence[tuple[Image.Image, Image.Image, str]], verdicts: list,
                           votes: int | None) -> tuple[list[Comparison | None], set[int]]:
    """A second opinion where a verdict costs: base-vs-teacher `verdicts` of `pairs` that say "teacher better"
    (each buys variations) asked again to `votes` asks, the majority deciding; with the indices it overturned
    (one the judge failed on is not among them: no evidence either way, and it has no verdict at all)."""
    again = [i for i, verdict in enumerate(verdicts) if verdict is not None and verdict.winner == "b"]
    if not votes or not again:
        return verdicts, set()
    verdicts = list(verdicts)
    for i, verdict in zip(again, compare_pairs(judge, [pairs[i] for i in again], votes)):
        verdicts[i] = verdict
    return verdicts, {i for i in again if verdicts[i] is not None and verdicts[i].winner != "b"}


def redraw_teacher_better(judge, base, pairs: Sequence[tuple[Image.Image, Image.Image, str]], verdicts: list,
                          seeds: Sequence[int], draws: int, votes: int | None = None
                          ) -> tuple[list[Comparison | None], set[int]]:
    """A fresh look at the base where a verdict costs: each "teacher better" verdict of `pairs` (base image,
    teacher image, prompt; the base image drawn with `seeds[i]`) is judged again on up to `draws - 1` new
    images of the base (`base`: a `Sampler`; seeds `seeds[i] + k`) against the same teacher image, and
    stands only if the teacher wins every time. The first verdict that does not say "teacher better"
    replaces it (None: the judge failed, no evidence). Returns the verdicts and the indices a fresh draw
    overturned (one the judge failed on is not among them: it has no verdict at all)."""
    verdicts, overturned = list(verdicts), set()
    for k in range(1, draws):
        again = [i for i, verdict in enumerate(verdicts) if verdict is not None and verdict.winner == "b"]
        if not again:
            break
        images = base.generate([pairs[i][2] for i in again], [seeds[i] + k for i in again])
        fresh = compare_pairs(judge, [(image, pairs[i][1], pairs[i][2]) for i, image in zip(again, images)], votes)
        for i, verdict in zip(again, fresh):
            if verdict is None or verdict.winner != "b":
                verdicts[i] = verdict
                if verdict is not None:  # a failed judge call is no evidence either way
                    overturned.add(i)
    return verdicts, overturned


def unseen_variation_scores(writer: PromptWriter, judge, base, prompts: Sequence[str], seeds: Sequence[int],
                            seen: set[str], confirm_below: float = 0.0, votes: int | None = None, draws: int = 1
                            ) -> list[tuple[str, float | None] | None]:
    """Does the base draw what a prompt asks, or only the prompt it was trained on? Per prompt: a variation
    of it not in `seen` (the prompts the base was taught), drawn by `base` (a `Sampler`) and scored by the
    judge (VQA), as (variation, score); None where the writer gave no unseen variation. A score of None: the
    judge failed after retries. Seeded per prompt (`seeds`), cached by the judge: a rerun asks nothing again.
    A score below `confirm_below` is asked again with `votes` asks (a judge that samples), majority deciding,
    and then the base draws the variation again (seeds `seed + k`, up to `draws - 1` more) while it
    scores below: one unlucky image does not make a record memorized."""
    variations = [next((v for v in writer.variations(prompt, 4, seed=seed) if v not in seen), None)
                  for prompt, seed in zip(prompts, seeds)]
    todo = [i for i, v in enumerate(variations) if v is not None]
    images = dict(zip(todo, base.generate([variations[i] for i in todo], [seeds[i] for i in todo]) if todo else []))
    scores = dict(zip(todo, score_images(judge, [(images[i], variations[i]) for i in todo]) if todo else []))

    def low() -> list[int]:
        return [i for i in todo if scores[i] is not None and scores[i].score < confirm_below]

    if votes and low():
        scores |= zip(low(), score_images(judge, [(images[i], variations[i]) for i in low()], votes))
    for k in range(1, draws):
        if not (again := low()):
            break
        redrawn = base.generate([variations[i] for i in again], [seeds[i] + k for i in again])
        for i, score in zip(again, score_images(judge, list(zip(redrawn, [variations[i] for i in again])), votes)):
            if score is not None:
                scores[i] = score
    return [None if v is None else (v, getattr(scores[i], "score", None)) for i, v in enumerate(variations)]


AT_A_TIME = 256  # records judged, or prompts drawn, at a time: a round of a real run holds no more images than
# this (a fifth of 100,000 records is 20,000 base and teacher images: 120 GB at 1024 px)


def base_vs_teacher(judge, compare, base, records: Sequence, seeds: Sequence[int], load_image,
                    confirm_votes: int | None, base_draws: int) -> tuple[list, int, set[int]]:
    """Discriminate: the base's image of each record's prompt (`seeds`) against the record's teacher image
    (`load_image(record.image_path)`), by `compare(pairs)`, each "teacher better" asked again
    (`confirm_teacher_better`) and on fresh draws (`redraw_teacher_better`); `AT_A_TIME` records at a time.
    Returns the verdicts, how many second opinions overturned one, and the indices judged on a fresh draw."""
    verdicts, overturned, redrawn = [], 0, set()
    for start in range(0, len(records), AT_A_TIME):
        part = records[start:start + AT_A_TIME]
        images = base.generate([rec.prompt for rec in part], list(seeds[start:start + AT_A_TIME]))
        pairs = [(image, load_image(rec.image_path), rec.prompt) for image, rec in zip(images, part)]
        found, again = confirm_teacher_better(judge, pairs, compare(pairs), confirm_votes)
        found, fresh = redraw_teacher_better(judge, base, pairs, found, seeds[start:start + AT_A_TIME], base_draws,
                                             confirm_votes)
        verdicts, overturned, redrawn = verdicts + found, overturned + len(again), redrawn | {start + i for i in fresh}
    return verdicts, overturned, redrawn
