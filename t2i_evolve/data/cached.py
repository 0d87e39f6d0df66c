"""A `Generator` or `Judge` behind the call cache (cache.py): a recipe rerun after a crash, or with more rounds,
pays only for what it has not received yet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from PIL import Image

from ..protocols import Answer, Comparison, Generator, ImageScore, Judge, Question
from .cache import CallBudget, content_key, encode_png

if TYPE_CHECKING:
    from .ledger import Ledger


class CachedGenerator:
    """A `Generator` whose images are cached in the ledger: each (prompt, seed) is paid for once.

    The cache key is (generator id, prompt, seed), so the wrapped generator's `id` must change when a
    setting that changes its images does (model, steps, size). Misses are sent in chunks of
    `batch_size` (GPU models want batches), images are stored with `Ledger.put_image`, and the
    response recorded is `{"image": path}`. `generate` returns None where a call failed after retries;
    `round` (settable) tags new calls for `ledger stats`.
    """

    def __init__(
        self,
        generator: Generator,
        ledger: Ledger,
        *,
        batch_size: int = 16,
        retries: int = 4,
        backoff_s: float = 0.5,
        budget: CallBudget | None = None,
        round: int | None = None,
    ):
        self.generator = generator
        self.ledger = ledger
        self.id = generator.id
        self.batch_size = batch_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.budget = budget
        self.round = round

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, reserve: int = 0) -> list[Image.Image | None]:
        """`reserve`: calls the caller will send next under the same budget (another teacher's draws of these
        prompts), which this batch's retries must leave room for."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        responses = self.ledger.cached_calls(
            self.id, [{"prompt": prompt, "seed": int(seed)} for prompt, seed in zip(prompts, seeds)], self._generate,
            price=getattr(self.generator, "price_per_call", 0.0), round=self.round, retries=self.retries,
            backoff_s=self.backoff_s, batch_size=self.batch_size, budget=self.budget, reserve=reserve,
        )
        return [None if r is None else self.ledger.load_image(r["image"]) for r in responses]

    def draw_states(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str | None]:
        """Per draw: 'settled' (an image, or a failure for good, in the ledger: drawing it again sends nothing and
        costs nothing), 'pending' (in flight when a process died: sent again, it counts no second call against a
        budget; its price, paid on answer, it does), or None (never sent)."""
        states = self.ledger._call_states(keys := self._keys(prompts, seeds))
        return [states.get(key) for key in keys]

    def _keys(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        return [content_key([self.id, {"prompt": prompt, "seed": int(seed)}]) for prompt, seed in zip(prompts, seeds)]

    def _generate(self, requests: list[dict]) -> list[dict | Exception | None]:
        """The stored images; where the generator can say why an item failed (`outcomes`, as the images endpoint
        can), that reason, so a request the server refused is not resent."""
        prompts, seeds = [r["prompt"] for r in requests], [r["seed"] for r in requests]
        outcomes = getattr(self.generator, "outcomes", None)
        images = outcomes(prompts, seeds) if callable(outcomes) else self.generator.generate(prompts, seeds)
        return [image if image is None or isinstance(image, Exception) else {"image": self.ledger.put_image(image)}
                for image in images]


class CachedJudge:
    """A `Judge` whose verdicts are cached in the ledger: the same question about the same image is
    asked once.

    The key is (judge id, method, prompt, sha256 of each image's PNG bytes, the questions' text), so
    the image part is the image's content address in the ledger. Each method returns None where the
    judge failed after retries; callers skip that datum.
    """

    def __init__(
        self,
        judge: Judge,
        ledger: Ledger,
        *,
        retries: int = 4,
        backoff_s: float = 0.5,
        budget: CallBudget | None = None,
        round: int | None = None,
    ):
        self.judge = judge
        self.ledger = ledger
        self.id = judge.id
        self.retries = retries
        self.backoff_s = backoff_s
        self.budget = budget
        self.round = round

    def answer(self, image: Image.Image, prompt: str, questions: Sequence[Question]) -> list[bool] | None:
        response = self._cached(
            "answer", prompt, [image], questions,
            lambda: {"answers": [bool(a) for a in self.judge.answer(image, prompt, questions)]},
        )
        return None if response is None else response["answers"]

    def score(self, image: Image.Image, prompt: str) -> ImageScore | None:
        response = self._cached(
            "score", prompt, [image], (), lambda: self.judge.score(image, prompt).to_json()
        )
        return None if response is None else image_score_from_json(response)

    def compare(self, image_a: Image.Image, image_b: Image.Image, prompt: str) -> Comparison | None:
        response = self._cached(
            "compare", prompt, [image_a, image_b], (),
            lambda: asdict(self.judge.compare(image_a, image_b, prompt)),
        )
        return None if response is None else Comparison(**response)

    def _cached(
        self,
        method: str,
        prompt: str,
        images: list[Image.Image],
        questions: Sequence[Question],
        call: Callable[[], dict],
    ) -> dict | None:
        request = {
            "method": method,
            "prompt": prompt,
            "images": [encode_png(image)[1] for image in images],
            "questions": [q.text for q in questions],
        }
        return self.ledger.cached_call(
            self.id, request, call,
            price=getattr(self.judge, "price_per_call", 0.0), round=self.round,
            retries=self.retries, backoff_s=self.backoff_s, budget=self.budget,
        )


def image_score_from_json(data: dict) -> ImageScore:
    """The inverse of `ImageScore.to_json` (a question's structured `check` is not kept)."""
    answers = tuple(
        Answer(Question(a["question"], a["skill"], tuple(a.get("parents", ()))), a["answer"])
        for a in data["answers"]
    )
    return ImageScore(data["score"], answers)
