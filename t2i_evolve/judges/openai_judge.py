"""A VLM judge behind any OpenAI-compatible chat endpoint (vLLM, a hosted API, `serve-judge`).

`ChatJudge` holds what every chat-style judge needs, whatever runs the model:

- requests: VQA asks all of a prompt's questions about one image in one request; pairwise sends both
  images in one request, in an order drawn per request from (request content, `seed`), because VLMs
  favour one position. The order is part of the cached request and response, and the verdict is
  mapped back to images a/b, so callers never see it.
- re-asks: a reply the strict parser cannot read is asked again (the bad reply and a reminder of the
  format appended) up to `reasks` times, then the verdict is "unparseable": a status callers can test,
  counted in `judge.stats` and written in the ledger response. It is never an exception.
- votes: with `votes` > 1 (OpenAIJudge, temperature > 0), each request is asked that many times with its
  own sampling seed and the verdict is the majority: per question for VQA, of the winners for pairwise
  (a split is a tie). Independent errors fall (3 votes at a 20% error rate per answer: about 10%);
  every vote is a request, cached and counted like any other. The first vote is the very request a
  one-vote judge sends, so a verdict asked again with more votes (`votes=` of the batch methods: a
  second opinion before a costly decision) pays only for the new ones.
- the ledger: with a `Ledger`, every request (each re-ask too) goes through `Ledger.cached_calls`,
  keyed by its content (prompt, image hashes, questions, template hash, order, ask number and earlier
  replies), so a rerun pays for nothing it already has, a crash repeats at most one chunk, transient
  errors are retried with backoff and counted as attempts, and `max_calls` is a `CallBudget` that holds
  across restarts. Without a ledger, the same retries run in memory and nothing is cached.

`OpenAIJudge` sends the requests of a chunk concurrently through one `AsyncOpenAI` client (from
`endpoints.make_async_client`) under a semaphore of `endpoint.max_concurrency`. The API key lives only
inside that client: it is not on the config, in a request, a ledger row, a log line or an error.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from PIL import Image
from pydantic import Field, model_validator

from ..config import Config
from ..data.cache import CallBudget, content_key, encode_png
from ..endpoints import EndpointConfig, chat_text, make_async_client, redact, refused, safe_url, transient
from ..errors import BudgetExhausted, RequestRefused, TransientError
from ..protocols import Answer, Comparison, ImageScore, Question
from ..prompts.questions import prompt_questions
from ..world.questions import dsg_answers
from . import vlm_format as fmt

if TYPE_CHECKING:
    from ..data import Ledger

Status = Literal["ok", "unparseable", "failed"]


class ChatJudgeConfig(Config):
    """Settings shared by chat-style judges (remote or local)."""

    judge_id: str | None = Field(None, description="Ledger caller name; defaults to one built from the model.")
    reasks: int = Field(2, ge=0, le=100, description="Re-asks of a request whose reply could not be parsed.")
    vqa_template: str | None = Field(None, description="Path of a VQA template file (default: packaged).")
    pairwise_template: str | None = Field(None, description="Path of a pairwise template file (default: packaged).")
    seed: int = Field(0, description="Seed of the per-request order of the two images in a comparison.")
    max_calls: int | None = Field(None, ge=0, description="Most requests this judge may send, retries included.")
    max_tokens: int = Field(200, ge=1, le=1_000_000, description="Most tokens in a reply.")
    batch_size: int | None = Field(None, ge=1, description="Requests per ledger chunk (default 4 x concurrency); "
                                                           "a crash repeats at most one chunk.")


class OpenAIJudgeConfig(ChatJudgeConfig):
    """An OpenAI-compatible judge: where it is, and how it is asked."""

    endpoint: EndpointConfig
    structured: bool = Field(False, description="Send a JSON-schema response_format (constrained decoding).")
    temperature: float | None = Field(0.0, ge=0, description="Sampling temperature; None leaves the server's default.")
    votes: int = Field(1, ge=1, le=100, description="Asks per verdict, each with its own sampling seed; the majority "
                                            "answer wins. Needs temperature > 0 (at 0 every vote is the same).")

    @model_validator(mode="after")
    def _votes_need_sampling(self) -> "OpenAIJudgeConfig":
        if self.votes > 1 and self.temperature == 0:
            raise ValueError(f"votes={self.votes} needs temperature > 0: at temperature 0 every vote is the "
                             "same answer")
        return self


@dataclass(frozen=True)
class VQAVerdict:
    """The answers to one image's questions, or why there are none (`status`)."""

    answers: tuple[bool, ...] | None
    status: Status
    asks: int
    error: str | None = None


@dataclass(frozen=True)
class PairVerdict:
    """Which of images a and b follows the prompt better; `order` is how they were shown ('ba': b first)."""

    winner: Literal["a", "b", "tie"] | None
    status: Status
    order: Literal["ab", "ba"]
    asks: int
    error: str | None = None
    split: bool = False  # "tie" as the votes split evenly, no majority (`Comparison.split`)

    def comparison(self) -> Comparison | None:
        return None if self.winner is None else Comparison(self.winner, split=self.split)


@dataclass
class _Job:
    """One verdict being worked out over successive asks."""

    request: dict
    replies: list[str] = field(default_factory=list)
    response: dict | None = None
    status: Status | None = None
    error: str | None = None
    asks: int = 0


class ChatJudge:
    """The `Judge` protocol over chat messages; subclasses say how a batch of conversations is answered.

    `stats` counts, for this object: `sent` (requests sent, retries included), `cached` (asks answered by
    the ledger), `transient` (429/5xx/timeouts met), `reasks`, and verdicts `ok`, `unparseable`, `failed`.
    """

    structured = False

    def __init__(self, config: ChatJudgeConfig, ledger: Ledger | None = None, *, round: int | None = None,
                 questions: Callable[[str], list[Question]] | None = None):
        self.config = config
        self.ledger = ledger
        self.round = round
        self.questions = questions or prompt_questions
        self.templates = {kind: fmt.load_template(kind, getattr(config, f"{kind}_template"))
                          for kind in ("vqa", "pairwise")}
        self.stats: Counter[str] = Counter()
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    # subclasses ---------------------------------------------------------------------------------------

    id: str
    retries = 0
    backoff_s = 0.0
    batch_size = 8
    votes = 1  # asks per verdict (`OpenAIJudgeConfig.votes`); greedy local models answer every vote alike
    samples = False  # can asking again give another answer (so that votes are worth asking)?

    def _complete(self, requests: list[dict], conversations: list[list[dict]], keys: list[str]
                  ) -> list[str | TransientError]:
        """One reply text per conversation, or the `TransientError` to retry it with; other errors raise."""
        raise NotImplementedError

    def _params(self) -> dict:
        """Settings that change replies, so they belong in the cache key."""
        return {"max_tokens": self.config.max_tokens}

    # the Judge protocol ---------------------------------------------------------------------------------

    def answer(self, image: Image.Image, prompt: str, questions: Sequence[Question | str]) -> list[bool] | None:
        """Raw yes/no answers, or None when the judge's reply was unparseable or never came."""
        verdict = self.answer_many([(image, prompt, questions)])[0]
        return None if verdict.answers is None else list(verdict.answers)

    def score(self, image: Image.Image, prompt: str) -> ImageScore | None:
        return self.score_many([(image, prompt)])[0]

    def compare(self, image_a: Image.Image, image_b: Image.Image, prompt: str) -> Comparison | None:
        return self.compare_many([(image_a, image_b, prompt)])[0].comparison()

    # batches ----------------------------------------------------------------------------------------------

    def answer_many(self, items: Sequence[tuple[Image.Image, str, Sequence[Question | str]]],
                    votes: int | None = None) -> list[VQAVerdict]:
        """VQA for many (image, prompt, questions), sent concurrently; one verdict per item, in order.
        `votes`: asks per verdict for this batch (default: the judge's own `votes`)."""
        pngs: dict[str, bytes] = {}
        ballots = []
        for image, prompt, questions in items:
            texts = [q.text if isinstance(q, Question) else str(q) for q in questions]
            request = {"kind": "vqa", "prompt": prompt, "images": [_add_png(pngs, image)], "questions": texts}
            ballot = [_Job(voted) for voted in self._ballot(self._stamp(request), votes)]
            if not texts:  # nothing to ask
                for job in ballot:
                    job.status, job.response = "ok", {"answers": []}
            ballots.append(ballot)
        self._run([job for ballot in ballots for job in ballot], pngs)
        verdicts = []
        for ballot in ballots:
            ok, status, asks, error = _count_votes(ballot)
            answers = None if not ok else tuple(2 * sum(votes) > len(votes)  # a split vote is "no"
                                                for votes in zip(*(job.response["answers"] for job in ok)))
            verdicts.append(VQAVerdict(answers, status, asks, error))
        return verdicts

    def score_many(self, items: Sequence[tuple[Image.Image, str]], votes: int | None = None) -> list[ImageScore | None]:
        """DSG scores with the judge's question lists (`questions(prompt)`); None where there is no verdict."""
        prompts = list(dict.fromkeys(prompt for _, prompt in items))  # (an LLM writes each list: asked at once)
        with ThreadPoolExecutor(max(1, min(8, len(prompts)))) as pool:
            written = dict(zip(prompts, pool.map(self.questions, prompts)))
        question_lists = [written[prompt] for _, prompt in items]
        verdicts = self.answer_many([(image, prompt, qs) for (image, prompt), qs in zip(items, question_lists)], votes)
        return [None if verdict.answers is None else image_score(questions, verdict.answers)
                for questions, verdict in zip(question_lists, verdicts)]

    def compare_many(self, items: Sequence[tuple[Image.Image, Image.Image, str]],
                     votes: int | None = None) -> list[PairVerdict]:
        """Pairwise verdicts for many (image_a, image_b, prompt), sent concurrently, in order (`votes`: as
        `answer_many`)."""
        pngs: dict[str, bytes] = {}
        ballots = []
        for image_a, image_b, prompt in items:
            images = [_add_png(pngs, image_a), _add_png(pngs, image_b)]
            ballot = []
            for request in self._ballot(self._stamp({"kind": "pairwise", "prompt": prompt, "images": images}), votes):
                request["order"] = "ab" if int(content_key([self.config.seed, request])[:8], 16) % 2 == 0 else "ba"
                ballot.append(_Job(request))
            ballots.append(ballot)
        self._run([job for ballot in ballots for job in ballot], pngs)
        verdicts = []
        for ballot in ballots:
            ok, status, asks, error = _count_votes(ballot)
            tally = Counter(job.response["winner"] for job in ok).most_common()
            split = len(tally) > 1 and tally[0][1] == tally[1][1]
            winner = None if not ok else "tie" if split else tally[0][0]
            verdicts.append(PairVerdict(winner, status, ballot[0].request["order"], asks, error, split))
        return verdicts

    # asking -------------------------------------------------------------------------------------------------

    def _ballot(self, request: dict, votes: int | None = None) -> list[dict]:
        """The request once per vote: the first as a one-vote judge asks it, each other marked with its vote
        (another request, another sampling seed)."""
        return [request] + [{**request, "vote": vote} for vote in range(1, votes or self.votes)]

    def _stamp(self, request: dict) -> dict:
        """Add what else decides the reply: template, structured output, decoding settings."""
        kind = request["kind"]
        return {**request, "template": fmt.template_hash(self.templates[kind]), "structured": self.structured,
                "params": self._params()}

    def _run(self, jobs: list[_Job], pngs: dict[str, bytes]) -> None:
        """Ask every job, then re-ask those whose reply was unreadable, up to `reasks` times."""
        for ask in range(self.config.reasks + 1):
            todo = [job for job in jobs if job.status is None]
            if not todo:
                return
            if ask:
                self._count("reasks", len(todo))
            requests = [{**job.request, "ask": ask, "previous": list(job.replies)} for job in todo]
            for job, request, response in zip(todo, requests, self._calls(requests, pngs)):
                job.asks += 1
                if response is None:
                    with self._lock:
                        job.status, job.error = "failed", self._errors.pop(self._key(request), "no reply")
                elif response["status"] == "ok":
                    job.status, job.response = "ok", response
                else:
                    job.replies.append(response["reply"])
                    if ask == self.config.reasks:
                        job.status = "unparseable"
            self._count("ok", sum(job.status == "ok" for job in todo))
        self._count("unparseable", sum(job.status == "unparseable" for job in jobs))
        self._count("failed", sum(job.status == "failed" for job in jobs))

    def _key(self, request: dict) -> str:
        """The ledger's key of a request (also sent as X-Client-Request-Id, to match server logs)."""
        return content_key([self.id, request])

    def _calls(self, requests: list[dict], pngs: dict[str, bytes]) -> list[dict | None]:
        """Responses to `requests`: through the ledger's cache when there is one, else straight."""
        sent: set[str] = set()

        def call(batch: list[dict]) -> list[dict | None]:
            sent.update(self._key(r) for r in batch)
            return self._call_batch(batch, pngs)

        if self.ledger is None:
            return self._uncached(requests, call)
        budget = None if self.config.max_calls is None else CallBudget(max_calls=self.config.max_calls)
        responses = self.ledger.cached_calls(
            self.id, requests, call, round=self.round, retries=self.retries, backoff_s=self.backoff_s,
            batch_size=self.batch_size, budget=budget,
        )
        self._count("cached", len({self._key(r) for r in requests} - sent))
        return responses

    def _uncached(self, requests: list[dict], call: Callable[[list[dict]], list]) -> list[dict | None]:
        """The ledger's retry loop without a ledger: backoff with jitter, an in-memory call budget that a first
        try past it raises at and a retry past it is not sent at (as the ledger's, `CallBudget`)."""
        results: list[dict | None] = [None] * len(requests)
        remaining = list(range(len(requests)))
        for attempt in range(self.retries + 1):
            if attempt and self.backoff_s:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            refused = set()
            for start in range(0, len(remaining), self.batch_size):
                chunk = remaining[start:start + self.batch_size]
                room = math.inf if self.config.max_calls is None else self.config.max_calls - self.stats["sent"]
                if attempt and len(chunk) > room:
                    chunk = chunk[:max(0, int(room))]
                elif len(chunk) > room:
                    raise BudgetExhausted(f"budget of {self.id} spent: {self.stats['sent']} calls sent "
                                          f"(max_calls={self.config.max_calls})")
                try:
                    responses = call([requests[i] for i in chunk]) if chunk else []
                except TransientError:
                    continue
                for i, response in zip(chunk, responses):
                    if isinstance(response, dict):
                        results[i] = response
                    elif isinstance(response, Exception) and not isinstance(response, TransientError):
                        refused.add(i)
            remaining = [i for i in remaining if results[i] is None and i not in refused]
            if not remaining:
                break
        return results

    def _call_batch(self, batch: list[dict], pngs: dict[str, bytes]) -> list[dict | Exception | None]:
        """Send a batch; parse each reply into the response the ledger keeps. A transient failure of one
        item is None (the ledger retries it alone); of every item, the error itself (kept in the row). A
        request the server refused alone is its `RequestRefused` (failed, not resent)."""
        keys = [self._key(r) for r in batch]
        self._count("sent", len(batch))  # counted before: a batch that raises was sent all the same
        replies = self._complete(batch, [self._conversation(r, pngs) for r in batch], keys)
        failures = [reply for reply in replies if isinstance(reply, TransientError)]
        self._count("transient", len(failures))
        with self._lock:
            for key, reply in zip(keys, replies):
                if isinstance(reply, Exception):
                    self._errors[key] = str(reply)
                else:
                    self._errors.pop(key, None)
        if failures and len(failures) == len(batch):
            raise failures[0]
        return [None if isinstance(reply, TransientError) else reply if isinstance(reply, Exception)
                else self._read(request, reply) for request, reply in zip(batch, replies)]

    def _conversation(self, request: dict, pngs: dict[str, bytes]) -> list[dict]:
        previous, structured = request["previous"], request["structured"]
        template = self.templates[request["kind"]]
        if request["kind"] == "vqa":
            return fmt.vqa_messages(template, request["prompt"], request["questions"], pngs[request["images"][0]],
                                    structured=structured, previous=previous)
        first, second = request["images"] if request["order"] == "ab" else request["images"][::-1]
        return fmt.pairwise_messages(template, request["prompt"], pngs[first], pngs[second],
                                     structured=structured, previous=previous)

    @staticmethod
    def _read(request: dict, reply: str) -> dict:
        """The response kept in the ledger: the raw reply, what it parsed to, and the verdict."""
        if request["kind"] == "vqa":
            answers = fmt.parse_vqa(reply, len(request["questions"]))
            return {"reply": reply, "status": "unparseable" if answers is None else "ok", "answers": answers}
        token = fmt.parse_pairwise(reply)
        shown = {"first": request["order"][0], "second": request["order"][1], "tie": "tie"}
        return {"reply": reply, "status": "unparseable" if token is None else "ok", "token": token,
                "order": request["order"], "winner": None if token is None else shown[token]}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def close(self) -> None:
        """Release what the judge holds (clients, event loop threads)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _count_votes(ballot: list[_Job]) -> tuple[list[_Job], Status, int, str | None]:
    """The votes that came back readable, the verdict's status (ok if any did; else unparseable if any
    reply was unreadable, else failed), the asks spent, and the first error when no vote came back."""
    ok = [job for job in ballot if job.status == "ok"]
    status: Status = "ok" if ok else "unparseable" if any(job.status == "unparseable" for job in ballot) else "failed"
    error = None if ok else next((job.error for job in ballot if job.error), None)
    return ok, status, sum(job.asks for job in ballot), error


def image_score(questions: Sequence[Question], answers: Sequence[bool]) -> ImageScore:
    """The DSG score of raw answers (as `PixelJudge.score` computes it)."""
    effective = dsg_answers(questions, answers)
    return ImageScore(sum(effective) / len(effective) if effective else 0.0,
                      tuple(Answer(q, a) for q, a in zip(questions, answers)))


def _add_png(pngs: dict[str, bytes], image: Image.Image) -> str:
    data, digest = encode_png(image)
    pngs[digest] = data
    return digest


class OpenAIJudge(ChatJudge):
    """`Judge` over an OpenAI-compatible chat endpoint; see the module doc. Use as a context manager (or
    call `close()`) to close its HTTP connections; `ledger` is optional."""

    def __init__(self, config: OpenAIJudgeConfig, ledger: Ledger | None = None, **kwargs: Any):
        super().__init__(config, ledger, **kwargs)
        self.config: OpenAIJudgeConfig = config
        self.id = config.judge_id or f"openai:{config.endpoint.model}"
        self.structured = config.structured
        self.retries = config.endpoint.retries
        self.backoff_s = config.endpoint.backoff_s
        self.batch_size = config.batch_size or 4 * config.endpoint.max_concurrency
        self.votes = config.votes
        self.samples = config.temperature != 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"OpenAIJudge(id={self.id!r}, base_url={safe_url(self.config.endpoint.base_url)!r})"

    def _params(self) -> dict:
        return {"max_tokens": self.config.max_tokens, "temperature": self.config.temperature}

    def _complete(self, requests, conversations, keys):
        """Run the batch on the judge's event loop thread (one client, kept-alive connections)."""
        loop = self._ensure_client()
        jobs = [self._ask(request, messages, key) for request, messages, key in zip(requests, conversations, keys)]
        results = asyncio.run_coroutine_threadsafe(_gather(jobs), loop).result()
        for result in results:  # what every request meets (a bad key) stops the batch; a refusal fails its item
            if isinstance(result, BaseException) and not isinstance(result, (TransientError, RequestRefused)):
                raise result
        return results

    async def _ask(self, request: dict, messages: list[dict], key: str) -> str | TransientError | RequestRefused:
        import openai

        endpoint = self.config.endpoint
        options: dict[str, Any] = {"max_completion_tokens": self.config.max_tokens,
                                   "extra_headers": {"X-Client-Request-Id": key}}
        if self.config.temperature is not None:
            options["temperature"] = self.config.temperature
        if "vote" in request:  # each later vote its own sample (vLLM and serve-judge honour per-request seeds)
            options["seed"] = self.config.seed + request["vote"]
        if self.structured:
            options["response_format"] = (fmt.vqa_response_format(len(request["questions"]))
                                          if request["kind"] == "vqa" else fmt.pairwise_response_format())
        async with self._semaphore:
            try:
                completion = await self._client.chat.completions.create(
                    model=endpoint.model, messages=messages, **options)
                return chat_text(completion)
            except TransientError as e:  # a reply that is not a chat completion
                return e
            except (openai.APIError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                retry = transient(e)
                if retry is not None:
                    return retry
                error = refused(getattr(e, "status_code", None), _describe(e, endpoint))
                if isinstance(error, RequestRefused):
                    return error
                raise error from None

    def _ensure_client(self) -> asyncio.AbstractEventLoop:
        """Start the client and its event loop thread on first use: a rerun answered wholly from the
        ledger needs neither, nor the API key (a missing key is a one-line `ConfigError` here)."""
        with self._lock:
            if self._loop is None:
                self._client = make_async_client(self.config.endpoint)
                self._semaphore = asyncio.Semaphore(self.config.endpoint.max_concurrency)
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name=f"{self.id} client", daemon=True)
                self._thread.start()
            return self._loop

    def close(self) -> None:
        """Close the HTTP client and stop the event loop thread (a later call starts new ones)."""
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
        if loop is None:
            return
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    def __del__(self) -> None:
        # Garbage collection must not block: stop the loop thread, skip closing connections politely.
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)


async def _gather(jobs):
    return await asyncio.gather(*jobs, return_exceptions=True)


def _describe(error: Exception, endpoint: EndpointConfig) -> str:
    """A one-line reason that never quotes the server's body (it may echo the key)."""
    where = f"judge endpoint {safe_url(endpoint.base_url)} (model {endpoint.model!r})"
    status = getattr(error, "status_code", None)
    if status in (401, 403):
        hint = f"; check the key in ${endpoint.api_key_env}" if endpoint.api_key_env else "; it wants an API key"
        return f"{where} refused the request: HTTP {status}{hint}"
    if status == 404:
        return f"{where} answered HTTP 404: wrong base URL (it should end in /v1) or unknown model"
    if status is not None:
        return f"{where} answered HTTP {status}{_server_message(error, endpoint)}"
    return f"{where}: {type(error).__name__}"


def _server_message(error: Exception, endpoint: EndpointConfig) -> str:
    """The server's own reason for a 4xx (e.g. "image input is not supported"), on one line, at most 200
    characters, with the key blanked out should the server have echoed it."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):  # {"message": ...}, or the whole {"error": {"message": ...}}
        inner = body.get("error")
        body = inner.get("message") if isinstance(inner, dict) else body.get("message")
    if not isinstance(body, str) or not body.strip():
        return ""
    return f": {redact(' '.join(body.split()), endpoint, limit=200)}"

