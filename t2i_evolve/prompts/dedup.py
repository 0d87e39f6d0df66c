"""Near-duplicate removal, as in self-instruct: a new prompt is kept only if its ROUGE-L F-measure
against every prompt already kept (and every prompt of a given pool) is at most a threshold.

An LLM asked for ten prompts often returns the same one reworded, or echoes its examples; training on
those adds nothing but weight. Self-instruct keeps a generated instruction when its ROUGE-L against
every one in the pool is below 0.7, the default here. Exact duplicates (ignoring case and spacing) are
always dropped, whatever the threshold, so `threshold=1.0` means "exact duplicates only".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

DEFAULT_THRESHOLD = 0.7


def normalize(prompt: str) -> str:
    """The form two prompts share when they are the same prompt: lower case, single spaces."""
    return " ".join(prompt.lower().split())


class Deduper:
    """Keeps prompts that are not near-duplicates of a pool; `add` grows the pool with what it keeps.

    ROUGE-L's F-measure is 2 LCS / (|a| + |b|) in tokens, and a longest common subsequence has at most the tokens
    the two prompts share. So a new prompt is scored (rouge-score, exactly) only against the pool prompts that
    share enough tokens to pass the threshold, found through an index of which prompts hold each token: against a
    pool of 91,000 prompts a check took 2.6 s scoring every one (benchmarks/RESULTS.md, 48th session).
    """

    def __init__(self, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"a ROUGE-L threshold is between 0 and 1, not {threshold}")
        self.threshold = threshold
        self._scorer = _scorer() if threshold < 1.0 else None
        self._seen: set[str] = set()
        self._pool: list[str] = []
        self._lengths = _Column()  # tokens in each pool prompt
        self._holding: dict[str, tuple[_Column, _Column]] = {}  # token -> (pool indices holding it, count in each)
        for prompt in pool:
            self._remember(prompt)

    def is_new(self, prompt: str) -> bool:
        """Whether `prompt` is neither an exact nor a near duplicate of the pool."""
        if not prompt.strip() or normalize(prompt) in self._seen:
            return False
        if self._scorer is None:
            return True
        tokens = _tokenize(prompt)
        shared = np.zeros(len(self._pool), dtype=np.int64)  # tokens each pool prompt shares with this one
        for token, count in Counter(tokens).items():
            if token in self._holding:
                indices, counts = (column.values() for column in self._holding[token])
                shared[indices] += np.minimum(counts, count)
        bound = 2 * shared / np.maximum(self._lengths.values() + len(tokens), 1)  # (rounding kept on the safe side)
        return not any(self._scorer.score(self._pool[i], prompt)["rougeL"].fmeasure > self.threshold
                       for i in np.flatnonzero((shared > 0) & (bound > self.threshold - 1e-9)).tolist())

    def add(self, prompt: str) -> bool:
        """Keep `prompt` (and return True) if it is new; it then counts against later prompts."""
        if not self.is_new(prompt):
            return False
        self._remember(prompt)
        return True

    def _remember(self, prompt: str) -> None:
        self._seen.add(normalize(prompt))
        if self._scorer is not None:
            tokens = _tokenize(prompt)
            for token, count in Counter(tokens).items():
                indices, counts = self._holding.setdefault(token, (_Column(), _Column()))
                indices.append(len(self._pool))
                counts.append(count)
            self._lengths.append(len(tokens))
        self._pool.append(prompt)


class _Column:
    """A growing array of ints (appended one at a time, read whole as numpy): capacity doubles as it fills."""

    def __init__(self):
        self._data, self._n = np.empty(16, dtype=np.int64), 0

    def append(self, value: int) -> None:
        if self._n == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self._n] = value
        self._n += 1

    def values(self) -> np.ndarray:
        return self._data[: self._n]


def dedup(prompts: Iterable[str], *, pool: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """`prompts` in order, without exact or near duplicates of each other or of `pool`."""
    deduper = Deduper(pool, threshold)
    return [prompt for prompt in prompts if deduper.add(prompt)]


@lru_cache(maxsize=1)
def _tokenizer():
    """rouge-score's tokenizer (importing rouge-score costs a second, so it waits until used), its answers cached."""
    from rouge_score import tokenizers

    class CachedTokenizer(tokenizers.Tokenizer):
        def __init__(self):
            self._tokenize = lru_cache(maxsize=65536)(tokenizers.DefaultTokenizer(use_stemmer=False).tokenize)

        def tokenize(self, text):
            return self._tokenize(text)

    return CachedTokenizer()


def _tokenize(text: str) -> list[str]:
    return _tokenizer().tokenize(text)


@lru_cache(maxsize=1)
def _scorer():
    """One ROUGE-L scorer per process, over the same tokens as `_tokenize`."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_tokenizer())
