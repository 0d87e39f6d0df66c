"""The shared parts every recipe is built from. Read this module first.

Each recipe (evolve, experts, reward-tune, itercomp) is a plain loop over a few kinds of parts. Every
kind is a small `typing.Protocol`, so a procedural shapes-world teacher, a diffusers pipeline and a paid
image API are interchangeable, and so are the pixel judge and a VLM behind an OpenAI-compatible server.

- `PromptSource`: where prompts come from (the shapes grammar, an LLM, a user's file).
- `PromptWriter`: a `PromptSource` that also rewrites prompts (EvolveDirector's expand and mutate,
  SELMA's skill-specific self-instruct sets).
- `Generator`: prompts + seeds -> images. Teachers and the base model alike.
- `Judge`: a VQA-style judge. Answers yes/no questions about an image, scores an image against its
  prompt (TIFA/DSG style), and compares two images for one prompt (EvolveDirector's discrimination).
- `Reward`: a batched score of images for prompts; differentiable ones drive reward-tune and itercomp.
- `Evaluator`: held-out prompts -> a score per skill, for before/after tables.

The data types they exchange (`Question`, `Answer`, `ImageScore`, `Comparison`) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

from PIL import Image

SKILLS: tuple[str, ...] = ("color", "shape", "count", "spatial", "binding", "size")
"""Named skills. Every recipe groups data, questions and scores by them."""


@dataclass(frozen=True)
class Question:
    """A yes/no question about an image, in the style of TIFA / DSG.

    `parents` are indices of questions in the same list that must hold for this one to make sense
    (DSG: "is the circle red?" depends on "is there a circle?"). `check` is an optional structured form
    that an exact judge can evaluate without reading the text (the shapes world fills it in).
    """

    text: str
    skill: str
    parents: tuple[int, ...] = ()
    check: Any = field(default=None, compare=False)

    @property
    def parent(self) -> int | None:
        """The first parent, for output formats that name one parent per question."""
        return self.parents[0] if self.parents else None


@dataclass(frozen=True)
class Answer:
    question: Question
    answer: bool


@dataclass(frozen=True)
class ImageScore:
    """How well one image follows its prompt.

    `score` uses the DSG rule: the share of questions answered yes, where a question counts as no when
    one of its parents is no.
    """

    score: float
    answers: tuple[Answer, ...]

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "answers": [
                {
                    "question": a.question.text,
                    "skill": a.question.skill,
                    "parent": a.question.parent,
                    "parents": list(a.question.parents),
                    "answer": a.answer,
                }
                for a in self.answers
            ],
        }


@dataclass(frozen=True)
class Comparison:
    """A pairwise verdict for one prompt: which image follows it better. `split`: a "tie" of votes split evenly
    (no majority either way), not a majority finding the two alike."""

    winner: Literal["a", "b", "tie"]
    score_a: float | None = None
    score_b: float | None = None
    split: bool = False


@runtime_checkable
class PromptSource(Protocol):
    """Draws prompts. `skill` asks for prompts that exercise one skill (SELMA's skill-specific sets)."""

    def sample(self, n: int, *, seed: int, skill: str | None = None) -> list[str]: ...


@runtime_checkable
class PromptWriter(PromptSource, Protocol):
    """Writes prompts from prompts: an LLM over chat completions, or the shapes grammar offline.

    Every method returns distinct prompts (near-duplicates of each other and of the input dropped), so
    it may return fewer than asked; it never returns unparsed text.
    """

    id: str

    def variations(self, prompt: str, k: int, *, seed: int) -> list[str]:
        """Up to `k` prompts with the same structure as `prompt` and changed details (expand)."""
        ...

    def new_structures(self, prompts: Sequence[str], k: int, *, seed: int) -> list[str]:
        """Up to `k` prompts whose structure differs from every one of `prompts` (mutate)."""
        ...

    def skill_prompts(self, skill: str, k: int, *, seed: int, examples: Sequence[str] = ()) -> list[str]:
        """Up to `k` prompts that exercise `skill`, self-instruct style, in-context `examples` given."""
        ...


@runtime_checkable
class Generator(Protocol):
    """Draws one image per (prompt, seed). Deterministic per (prompt, seed) where the backend allows.

    Raises `errors.TransientError` for failures worth retrying; the ledger's call cache retries them and
    never sends a call twice once it has a reply.
    """

    id: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


@runtime_checkable
class Judge(Protocol):
    """A judge of prompt following."""

    id: str

    def answer(self, image: Image.Image, prompt: str, questions: Sequence[Question]) -> list[bool]:
        """VQA: one yes/no per question, in order (raw answers, before the DSG parent rule)."""
        ...

    def score(self, image: Image.Image, prompt: str) -> ImageScore:
        """Score an image against its prompt with the judge's own question list."""
        ...

    def compare(self, image_a: Image.Image, image_b: Image.Image, prompt: str) -> Comparison:
        """Which of two images follows the prompt better."""
        ...


@runtime_checkable
class Reward(Protocol):
    """A batched reward. `images` are float tensors (B, 3, H, W) in [0, 1]; returns a tensor (B,).

    When `differentiable` is true, gradients flow from the reward back to the pixels (reward-tune and
    itercomp back-propagate through it); otherwise callers treat it as a black box.
    """

    id: str
    differentiable: bool

    def __call__(self, images: Any, prompts: Sequence[str]) -> Any: ...


@runtime_checkable
class Evaluator(Protocol):
    """Scores a generator on held-out prompts: overall and per skill."""

    def evaluate(self, generator: Generator) -> dict: ...
