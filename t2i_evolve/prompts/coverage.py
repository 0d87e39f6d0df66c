"""Which of several new prompts names what a training set has seen least.

EvolveDirector's mutate step adds prompts unlike the set's so that the set does not collapse onto what the judge
already asked about. A new *structure* alone can still repeat the set's words: a seed set that never names a
long-tail concept (a rare color, an object users seldom ask for) gives the judge no chance to find that the base
misses it, and a mutation drawn at the writer's odds reaches it only by luck. Asked for a few candidates, the
recipe draws the one whose least-seen word the set has seen least: the cheapest way to show the judge a concept it
has not been shown (the writer's text is cheap; the teacher image is what costs). Words are counted, not embedded:
exact for the shapes grammar, and a fair proxy for an LLM writer's prompts, whose rare words are what is new.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from ..protocols import PromptWriter

# Words every prompt shares: never what makes one new (a rare "an" is not a rare concept).
FILLER = frozenset("a an the and of with in on at to is are its their this that".split())


def content_words(prompt: str) -> list[str]:
    """A prompt's words, lower case, filler dropped, plurals folded ("circles" counts as "circle")."""
    words = (w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in FILLER)
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def word_counts(prompts: Iterable[str]) -> Counter:
    """How many of `prompts` name each content word (once per prompt)."""
    return Counter(w for prompt in prompts for w in set(content_words(prompt)))


def least_seen(candidates: Sequence[str], counts: Counter) -> str:
    """The candidate whose least-seen word `counts` holds fewest times; ties go to the lower mean count, then to
    the writer's order (the first candidate is what the writer would have given alone)."""
    if not candidates:
        raise ValueError("no candidate prompts to choose from")

    def key(i: int) -> tuple:  # (a candidate of filler alone names nothing: last)
        seen = [counts[w] for w in set(content_words(candidates[i]))] or [float("inf")]
        return min(seen), sum(seen) / len(seen), i

    return candidates[min(range(len(candidates)), key=key)]


def least_seen_new_structure(writer: PromptWriter, prompt: str, k: int, seeds: Sequence[int], exclude: Collection[str],
                             counts: Counter) -> str | None:
    """A prompt of a structure other than `prompt`'s and not in `exclude` (held out): of up to `k` the writer gives
    (one ask per seed until there are `k`: an excluded answer is asked for again while seeds last), the one naming
    what `counts`, the set's words, has seen least (`least_seen`); its words are then counted. None: none found.
    Each ask is one writer call: for an LLM a chat call, cheap beside the teacher image a better pick spends well."""
    candidates: list[str] = []
    for seed in seeds:
        candidates += [p for p in writer.new_structures([prompt], 1, seed=seed) if p not in exclude]
        if len(candidates) >= k:
            break
    if not candidates:
        return None
    pick = least_seen(candidates[:k], counts)
    counts.update(set(content_words(pick)))
    return pick
