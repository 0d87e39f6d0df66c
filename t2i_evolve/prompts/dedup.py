"""Near-duplicate removal, as in self-instruct: a new prompt is kept only if its ROUGE-L F-measure
against every prompt already kept (and every prompt of a given pool) is at most a threshold.

An LLM asked for ten prompts often returns the same one reworded, or echoes its examples; training on
those adds nothing but weight. Self-instruct keeps a generated instruction when its ROUGE-L against
every one in the pool is below 0.7, the default here. Exact duplicates (ignoring case and spacing) are
always dropped, whatever the threshold, so `threshold=1.0` means "exact duplicates only".
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

DEFAULT_THRESHOLD = 0.7


def normalize(prompt: str) -> str:
    """The form two prompts share when they are the same prompt: lower case, single spaces."""
    return " ".join(prompt.lower().split())


class Deduper:
    """Keeps prompts that are not near-duplicates of a pool; `add` grows the pool with what it keeps.

    Each prompt is tokenised once (rouge-score's tokenizer, cached), so checking a batch against a
    pool of thousands stays cheap.
    """

    def __init__(self, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a ROUGE-L threshold is between 0 and 1, not {threshold}")
        self.threshold = threshold
        self._scorer = _scorer() if threshold < 1.0 else None
        self._seen: set[str] = set()
        self._pool: list[str] = []
        for prompt in pool:
            self._remember(prompt)

    def is_new(self, prompt: str) -> bool:
        """Whether `prompt` is neither an exact nor a near duplicate of the pool."""
        if not prompt.strip() or normalize(prompt) in self._seen:
            return False
        if self._scorer is None:
            return True
        return all(self._scorer.score(old, prompt)["rougeL"].fmeasure <= self.threshold for old in self._pool)

    def add(self, prompt: str) -> bool:
        """Keep `prompt` (and return True) if it is new; it then counts against later prompts."""
        if not self.is_new(prompt):
            return False
        self._remember(prompt)
        return True

    def _remember(self, prompt: str) -> None:
        self._seen.add(normalize(prompt))
        self._pool.append(prompt)


def dedup(prompts: Iterable[str], *, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """`prompts` in order, without exact or near duplicates of each other or of `pool`."""
    deduper = Deduper(pool, threshold)
    return [prompt for prompt in prompts if deduper.add(prompt)]


@lru_cache(maxsize=1)
def _scorer():
    """One ROUGE-L scorer per process (importing rouge-score costs a second, so it waits until used)."""
    from rouge_score import rouge_scorer, tokenizers

    class CachedTokenizer(tokenizers.Tokenizer):
        def __init__(self):
            self._tokenize = lru_cache(maxsize=65536)(tokenizers.DefaultTokenizer(use_stemmer=False).tokenize)

        def tokenize(self, text):
            return self._tokenize(text)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CachedTokenizer())
