"""An LLM prompt writer over chat completions: EvolveDirector's expand and mutate, SELMA's self-instruct.

Each method fills an editable template (`templates/*.txt`, `string.Template` placeholders such as
`$k` and `$prompt`; override any of them by path in the config), sends one chat request, reads the
reply with `parse_prompt_list`, and drops exact and near duplicates (ROUGE-L, see `dedup`) of each
other, of the input, of the seed prompts and of everything the writer accepted before.

Self-instruct: `skill_prompts` shows the model `n_examples` in-context examples drawn (seeded) from
the given examples (or the seed prompts) and up to `n_generated_examples` of the prompts it wrote for
that skill before, so later rounds build on earlier ones while staying anchored to the seeds.

A reply that parses to nothing (prose, a truncated list) is counted in `unparsed_replies` and asked
again, up to `max_reasks` times, with another seed (with the same seed a server that honours seeds
would give the same reply). With a `ledger`, every request goes through `Ledger.cached_call` under the
writer's id: a rerun pays for nothing it already received (re-asks included, since they are requests
of their own), 429/5xx/timeouts are retried with backoff and counted, and a budget applies. The client
is built on the first request the cache cannot answer, so a fully cached rerun needs no API key.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..config import Config
from ..data.cache import CallBudget
from ..endpoints import EndpointConfig, chat_text, make_client
from ..errors import ConfigError, RequestRefused, TransientError
from ..generators.remote import endpoint_errors
from ..protocols import Question
from ..world.grammar import scene_or_none
from ..world.questions import questions_for
from .dedup import DEFAULT_THRESHOLD, Deduper
from .parsing import parse_prompt_list
from .questions import parse_question_list, whole_prompt_question

if TYPE_CHECKING:
    from ..data.ledger import Ledger
    from ..protocols import PromptWriter

log = logging.getLogger(__name__)

TemplateName = Literal["system", "sample", "variations", "new_structures", "skill_prompts", "questions"]
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "system": (),
    "sample": ("k", "examples"),
    "variations": ("k", "prompt"),
    "new_structures": ("k", "prompts"),
    "skill_prompts": ("k", "skill", "skill_description", "examples"),
    "questions": ("k", "prompt"),
}
"""The placeholders each template may use."""

SKILL_DESCRIPTIONS: dict[str, str] = {
    "color": "drawing objects in the colors the prompt names",
    "shape": "drawing objects of the shapes or kinds the prompt names",
    "count": "drawing exactly the number of objects the prompt names (two, three, four, ...)",
    "spatial": "placing objects where the prompt says relative to each other (left of, right of, above, below)",
    "binding": "giving each of several objects its own attributes (a red cube and a blue sphere, not a blue cube)",
    "size": "drawing objects at the relative sizes the prompt names (big, small, larger than)",
}
"""How the skill template describes the package's skills; any other skill name is passed as it is."""


class OpenAIPromptWriterConfig(Config):
    """An LLM prompt writer behind an OpenAI-compatible chat completions endpoint."""

    endpoint: EndpointConfig
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 makes re-asks repeat.")
    max_tokens: int | None = Field(1024, ge=1, description="Reply length limit; None sends none.")
    dedup_threshold: float = Field(
        DEFAULT_THRESHOLD, ge=0, le=1, description="ROUGE-L F-measure above which a prompt is a near-duplicate."
    )
    max_reasks: int = Field(3, ge=0, le=100, description="Requests sent again after a reply with no prompts in it.")
    n_examples: int = Field(8, ge=0, description="In-context examples per request (sample, skill_prompts).")
    n_generated_examples: int = Field(2, ge=0, description="How many of them may be the writer's own earlier outputs.")
    templates: dict[TemplateName, Path] = Field(
        default_factory=dict, description="Template files replacing the packaged ones, by template name."
    )
    max_questions: int = Field(12, ge=1, description="questions(): at most this many questions about one prompt.")
    price_per_call: float = Field(0.0, ge=0, description="Price of one request, for budgets and `ledger stats`.")
    id: str | None = Field(None, description="Caller id in the ledger; by default 'llm-writer:<model>'.")


class OpenAIPromptWriter:
    """`PromptWriter` over chat completions (see the module doc for the protocol it follows).

    `accept`, when given, filters prompts before deduplication (for example, only prompts that parse
    in the shapes grammar); `seed_prompts` are the human-written examples and dedup pool.
    """

    def __init__(
        self,
        config: OpenAIPromptWriterConfig,
        *,
        seed_prompts: Sequence[str] = (),
        ledger: Ledger | None = None,
        budget: CallBudget | None = None,
        round: int | None = None,
        accept: Callable[[str], bool] | None = None,
    ):
        self.config = config
        self.id = config.id or f"llm-writer:{config.endpoint.model}"
        self.seed_prompts = list(seed_prompts)
        self.ledger = ledger
        self.budget = budget
        self.round = round
        self.accept = accept
        self.templates = load_templates(config.templates)
        self.accepted: list[str] = []
        self.by_skill: dict[str, list[str]] = {}
        self.written_questions: dict[str, list[Question]] = {}
        self.unparsed_replies = 0
        self.failed_requests = 0
        self.rejected = 0
        self._client = None
        self._known: tuple[list[str], Deduper] | None = None  # (`_known_prompts`)

    # -- the PromptWriter protocol -------------------------------------------------------------------

    def sample(self, n: int, *, seed: int, skill: str | None = None) -> list[str]:
        if skill is not None:
            return self.skill_prompts(skill, n, seed=seed)
        examples = self._examples(self.seed_prompts, self.accepted, seed, "sample")
        return self._write("sample", n, seed, pool=(), examples=bullets(examples))

    def variations(self, prompt: str, k: int, *, seed: int) -> list[str]:
        return self._write("variations", k, seed, pool=[prompt], prompt=prompt)

    def new_structures(self, prompts: Sequence[str], k: int, *, seed: int) -> list[str]:
        return self._write("new_structures", k, seed, pool=prompts, prompts=bullets(prompts))

    def skill_prompts(self, skill: str, k: int, *, seed: int, examples: Sequence[str] = ()) -> list[str]:
        human = list(examples) or self.seed_prompts
        shown = self._examples(human, self.by_skill.get(skill, []), seed, f"skill:{skill}")
        written = self._write(
            "skill_prompts", k, seed, pool=human, skill=skill,
            skill_description=SKILL_DESCRIPTIONS.get(skill, skill), examples=bullets(shown),
        )
        self.by_skill.setdefault(skill, []).extend(written)
        return written

    def questions(self, prompt: str) -> list[Question]:
        """DSG questions about an image of `prompt`, for a VQA judge (`prompts.questions`): the grammar's exact
        list for a shapes-world prompt; for any other, the LLM's (asked at temperature 0, re-asked at the writer's
        when a reply holds no valid list), or one question about the whole prompt when no reply does (counted in
        `unparsed_replies`, or `failed_requests` for no reply). Kept per prompt, and each request cached in the
        ledger like every other: a rerun asks nothing again."""
        if (scene := scene_or_none(prompt)) is not None:
            return questions_for(scene)  # the grammar's exact list
        if prompt not in self.written_questions:
            content = self.templates["questions"].substitute(k=self.config.max_questions, prompt=prompt).strip()
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") >> 1
            for attempt in range(self.config.max_reasks + 1):
                request = self._request([{"role": "user", "content": content}], reask_seed(seed, attempt))
                reply = self._ask(request | ({"temperature": 0.0} if attempt == 0 else {}))
                if reply is None:
                    return whole_prompt_question(prompt)  # failed after retries: in a run folder a failed call is
                    # final (its ledger says so), so a rerun asks the judge the same question; not kept in memory
                if parsed := parse_question_list(reply, self.config.max_questions):
                    self.written_questions[prompt] = parsed
                    break
                self.unparsed_replies += 1
                log.warning("%s: a questions reply held no valid JSON list of questions (attempt %d)", self.id, attempt + 1)
            else:
                self.written_questions[prompt] = whole_prompt_question(prompt)
        return self.written_questions[prompt]

    # -- one request, its re-asks and what is kept ---------------------------------------------------

    def _write(self, kind: str, k: int, seed: int, pool: Sequence[str], **fields: str) -> list[str]:
        """Ask for `k` prompts with template `kind`; keep the new ones (up to `k`): those that are not
        near-duplicates of `pool`, the seed prompts, earlier outputs or each other."""
        if k <= 0:
            return []
        messages = [
            {"role": "system", "content": self.templates["system"].substitute().strip()},
            {"role": "user", "content": self.templates[kind].substitute(k=k, **fields).strip()},
        ]
        known, fresh = self._known_prompts(), Deduper(pool, self.config.dedup_threshold)
        for attempt in range(self.config.max_reasks + 1):
            reply = self._ask(self._request(messages, reask_seed(seed, attempt)))
            if reply is None:
                return []  # failed after retries; the ledger (or the log) says why
            prompts = parse_prompt_list(reply)
            if not prompts:
                self.unparsed_replies += 1
                log.warning("%s: a %s reply held no JSON list of prompts (attempt %d)", self.id, kind, attempt + 1)
                continue
            kept = [p for p in prompts if self._acceptable(p) and known.is_new(p) and fresh.add(p)][:k]
            for prompt in kept:
                known.add(prompt)
            self.accepted += kept
            return kept
        return []

    def _known_prompts(self) -> Deduper:
        """The seed prompts and every earlier output, indexed once and grown as outputs are kept (built anew each
        request, a pool of 91,000 cost seconds a request); made again when `accepted` is replaced (`prime_writer`)."""
        if self._known is None or self._known[0] is not self.accepted:
            self._known = (self.accepted, Deduper([*self.seed_prompts, *self.accepted], self.config.dedup_threshold))
        return self._known[1]

    def _request(self, messages: list[dict], seed: int) -> dict:
        """The chat completion arguments: also the cache key, so everything that shapes a reply is in it."""
        request = {
            "model": self.config.endpoint.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "seed": seed,
        }
        if self.config.max_tokens is not None:
            request["max_tokens"] = self.config.max_tokens
        return request

    def _ask(self, request: dict) -> str | None:
        """The reply text to `request`, through the ledger's cache when there is one; None if it failed."""
        endpoint = self.config.endpoint

        def call() -> dict:
            if self._client is None:
                self._client = make_client(endpoint)
            with endpoint_errors(endpoint):
                completion = self._client.chat.completions.create(**request)
            return {"content": chat_text(completion)}

        if self.ledger is not None:
            response = self.ledger.cached_call(
                self.id, request, call, price=self.config.price_per_call, round=self.round,
                retries=endpoint.retries, backoff_s=endpoint.backoff_s, budget=self.budget,
            )
        else:
            response = _with_retries(call, endpoint.retries, endpoint.backoff_s)
        if response is None:
            self.failed_requests += 1
            log.warning("%s: a request failed after %d retries", self.id, endpoint.retries)
            return None
        return response["content"]

    def _acceptable(self, prompt: str) -> bool:
        if self.accept is None or self.accept(prompt):
            return True
        self.rejected += 1
        return False

    def _examples(self, human: Sequence[str], generated: Sequence[str], seed: int, tag: str) -> list[str]:
        """In-context examples, seeded: mostly `human`, up to `n_generated_examples` from `generated`
        (more when there are too few human ones), shuffled."""
        rng = random.Random(f"{self.id}:{tag}:{seed}")
        n = self.config.n_examples
        n_human = min(len(human), n - min(len(generated), self.config.n_generated_examples, n))
        n_generated = min(len(generated), n - n_human)
        shown = rng.sample(list(human), n_human) + rng.sample(list(generated), n_generated)
        rng.shuffle(shown)
        return shown


def reask_seed(seed: int, attempt: int) -> int:
    """The seed sent on `attempt`: `seed` first, then one derived from both, so a re-ask of one call
    does not send the same request as the first ask of a call with a neighbouring seed."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"reask:{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def bullets(prompts: Sequence[str]) -> str:
    """Prompts as a bulleted list for a template; '(none)' when there are none."""
    return "\n".join(f"- {p}" for p in prompts) or "(none)"


def load_templates(overrides: Mapping[str, Path] = {}) -> dict[str, Template]:
    """Every template, packaged or from `overrides`; a file that is missing or uses a placeholder
    its template does not have is a `ConfigError` now, not a failed request later."""
    templates = {}
    for name, allowed in TEMPLATE_FIELDS.items():
        path = overrides.get(name)
        if path is None:
            text = (files(__package__) / "templates" / f"{name}.txt").read_text(encoding="utf-8")
        elif not Path(path).is_file():
            raise ConfigError(f"template file not found: {path}")
        else:
            text = Path(path).read_text(encoding="utf-8")
        template = Template(text)
        try:
            template.substitute(dict.fromkeys(allowed, "x"))
        except (KeyError, ValueError) as e:
            where = path or f"packaged {name}.txt"
            allowed_text = ", ".join(allowed) or "none"
            raise ConfigError(f"template {where}: bad placeholder {e} (allowed: {allowed_text})") from None
        templates[name] = template
    return templates


def _with_retries(call: Callable[[], dict], retries: int, backoff_s: float) -> dict | None:
    """`call()`, sent again after a `TransientError` (exponential backoff with jitter); None when every
    try failed. Used without a ledger; with one, the call cache does this and counts the attempts."""
    for attempt in range(retries + 1):
        if attempt and backoff_s:
            time.sleep(backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        try:
            return call()
        except TransientError as e:
            log.warning("transient error (attempt %d of %d): %s", attempt + 1, retries + 1, e)
        except RequestRefused as e:  # this request only: not worth resending
            log.warning("request refused: %s", e)
            return None
    return None


def prime_writer(writer: PromptWriter, ledger: Ledger, round: int) -> None:
    """An LLM writer drops near-copies of what it wrote before. What it wrote before is read from the ledger
    (expansions and mutations of rounds before `round`), not kept in memory, so a rerun after a crash writes
    what the first run did."""
    if hasattr(writer, "accepted"):
        writer.accepted = ledger.prompts(since_round=1, before_round=round, ops=["expand", "mutate"])
    if hasattr(writer, "round"):
        writer.round = round
