"""How a run's teachers draw its prompts: each by the teacher named for it (`draw_by_teacher`: an expansion, by
its parent's), or by every teacher with the judge keeping the better image (`tournament`: EvolveDirector's
discrimination among teachers).

Both draw through the run's `CachedGenerator`s, whose caps every teacher shares: a teacher's retries leave room for
the first tries still to come, its own later chunks' and those of the teachers after it (`reserve`), so a batch the
run's plan fitted to the cap (`CallBudgets.draws_that_fit`) does not stop half-way for what the retries spent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from ..data import CachedGenerator


def draw_by_teacher(teachers: dict[str, CachedGenerator], prompts: Sequence[str], seeds: Sequence[int],
                    teacher_ids: Sequence[str], round: int, tries: Sequence[int], reserve: int = 0) -> list:
    """Each prompt drawn by the teacher named for it (an expansion: its parent's), teacher by teacher. A teacher's
    retries leave room for the first tries after its own (`tries`: each draw's; `reserve`: those after these), so a
    batch that fitted the cap does not stop half-way for want of what the retries spent."""
    images, order = [None] * len(prompts), list(dict.fromkeys(teacher_ids))
    for n, tid in enumerate(order):
        idx = [i for i, t in enumerate(teacher_ids) if t == tid]
        later = reserve + sum(tries[i] for i, t in enumerate(teacher_ids) if t in order[n + 1:])
        teachers[tid].round = round
        for i, image in zip(idx, teachers[tid].generate([prompts[i] for i in idx], [seeds[i] for i in idx],
                                                        reserve=later)):
            images[i] = image
    return images


def tournament(teachers: dict[str, CachedGenerator], prompts: Sequence[str], seeds: Sequence[int], round: int, *,
               passes_gate: Callable[[list, Sequence[str]], list[bool]], compare: Callable[[list], list],
               until_pass: bool = False, reserve: int = 0) -> tuple[list[str], list]:
    """EvolveDirector's discrimination among teachers: every teacher draws every prompt and the judge keeps
    the better image, teacher by teacher; returns the winning teacher id and image per prompt.

    With a quality gate (`passes_gate(images, prompts)`, a teacher's images at once, None for one it failed to
    draw; always True without one), only images that pass it are compared: one
    that passes beats one that does not (a pairwise verdict can prefer the wrong image), and of two that fail,
    either will be rejected. Rank: 0 no image, 1 drawn but fails the gate, 2 drawn and passes. `until_pass`: a
    teacher draws only the prompts no earlier one drew so that it passes, so nothing is compared and a prompt
    the first teacher draws right costs one call. `reserve`: the first tries the caller sends after these (its next
    prompts), for which every teacher's retries leave room, as they do for the teachers after it."""
    drawn, rank, ids = {}, {}, list(teachers)
    for n, (tid, teacher) in enumerate(teachers.items()):
        todo = [i for i in range(len(prompts)) if not (until_pass and any(rank[t][i] == 2 for t in drawn))]
        teacher.round = round  # (its retries leave room for what the teachers after it may send, and `reserve`)
        images = dict(zip(todo, teacher.generate([prompts[i] for i in todo], [seeds[i] for i in todo],
                                                 reserve=reserve + len(todo) * (len(ids) - n - 1))))
        drawn[tid] = [images.get(i) for i in range(len(prompts))]
        passed = passes_gate(drawn[tid], prompts)  # (a teacher's images at once: a VLM scores them concurrently)
        rank[tid] = [0 if image is None else 1 + ok for image, ok in zip(drawn[tid], passed)]
    best = [ids[0]] * len(prompts)
    for challenger in ids[1:]:
        contested = [i for i in range(len(prompts)) if rank[challenger][i] == rank[best[i]][i] == 2]
        verdicts = dict(zip(contested, compare([(drawn[challenger][i], drawn[best[i]][i], prompts[i])
                                                for i in contested])))
        for i in range(len(prompts)):
            verdict = verdicts.get(i)
            if rank[challenger][i] > rank[best[i]][i] or (verdict is not None and verdict.winner == "a"):
                best[i] = challenger
    return best, [drawn[tid][i] for i, tid in enumerate(best)]
