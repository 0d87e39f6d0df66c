"""`serve-judge`: an OpenAI-compatible chat server that answers like a VLM judge, through `PixelJudge`.

It reads the requests `OpenAIJudge` sends (the prompt and numbered questions from the message text,
the images from base64 data URLs; see `vlm_format`), answers VQA and pairwise with the exact pixel
judge, and replies in the same text or JSON form a real VLM is asked for. So the whole remote-judge
path (HTTP, concurrency, retries, re-asks, the ledger's cache) is tested and measured offline.

To test the hard parts it can misbehave, all seeded:
- `error_rate`: a wrong answer (each VQA answer flipped, a pairwise verdict replaced), drawn per request
  content, so asking the same thing again gets the same wrong answer, as from a deterministic model;
  a request that samples (temperature > 0) with a `seed` draws per content and seed, so votes asked with
  different seeds err independently;
- `fault_rate`: per request sent, one of `faults`: HTTP 429, HTTP 500, a hang past the client's timeout
  (`hang_s`, then the connection is closed unanswered), or a malformed 200 reply; drawn per (request,
  how many times it was sent), so a retry can succeed;
- `latency_s`: added to every request, to show how concurrency pays off.

`GET /stats` returns {"total", "answered", "faults", "keys"}: requests per request key (the client's
`X-Client-Request-Id`, which `OpenAIJudge` sets to the ledger key, else a hash of the body), so a test
can prove that nothing was sent twice. Headers (and so API keys) are never logged or stored.

It is built on the standard library's `ThreadingHTTPServer` (one thread per connection, keep-alive):
no new dependency, and fast enough to serve hundreds of requests a second on two cores.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import sys
import threading
import time
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, Field

from ..config import Config
from ..data.cache import content_key
from ..protocols import Question
from . import vlm_format as fmt
from .pixel import PixelJudge
from .segment import MIN_IMAGE_SIDE, shape_prototypes

Fault = Literal["429", "500", "hang", "malformed"]


def _named_host(host: str) -> str:
    if not host.strip():  # ("" binds every interface: said in full as 0.0.0.0, never by an empty flag)
        raise ValueError("is empty: name an address (127.0.0.1; 0.0.0.0 for every interface)")
    return host


Host = Annotated[str, AfterValidator(_named_host)]
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 256  # shapes-world scenes are 32-128 px; the segmenter's set-up grows with a side's square (~10 s here)
MALFORMED_REPLY = "Looking at the picture, I would say it mostly matches what was asked for."


class JudgeServerConfig(Config):
    host: Host = Field("127.0.0.1", description="Address to bind (loopback by default; 0.0.0.0 for every interface).")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    error_rate: float = Field(0.0, ge=0, le=1, description="Share of wrong answers (seeded per request content).")
    fault_rate: float = Field(0.0, ge=0, le=1, description="Share of requests that fail with one of `faults`.")
    faults: tuple[Fault, ...] = Field(("429", "500", "hang", "malformed"), min_length=1)
    latency_s: float = Field(0.0, ge=0, description="Seconds added to every request.")
    hang_s: float = Field(30.0, ge=0, description="How long a 'hang' fault holds the request before dropping it.")
    seed: int = 0
    model: str = Field("pixel-judge", description="Model name listed by GET /v1/models.")


class BadRequest(ValueError):
    """A request serve-judge cannot read; answered with HTTP 400 and this message."""


class JudgeServer:
    """The server object: start it in a thread (`start()`, or `with JudgeServer(cfg) as server:`) or
    block on `serve_forever()`; `url` is the base URL to give a client (ends in /v1)."""

    def __init__(self, config: JudgeServerConfig = JudgeServerConfig()):
        self.config = config
        self.judge = PixelJudge()
        self.counts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.answered = 0
        self._lock = threading.Lock()
        self._warming: dict[int, threading.Lock] = {}  # one lock per resolution (under `_lock`)
        self._warm_up(32)
        self._stopping = threading.Event()
        self._serving = threading.Event()
        self._thread: threading.Thread | None = None
        self.httpd = _HTTPServer((config.host, config.port), _Handler)
        self.httpd.judge_server = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> JudgeServer:
        self._thread = threading.Thread(target=self.serve_forever, name="serve-judge", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving.set()
        self.httpd.serve_forever(poll_interval=0.1)

    def stop(self) -> None:
        self._stopping.set()  # wakes hanging and sleeping requests
        if self._serving.is_set():  # (shutdown waits for a loop that a server never started never runs)
            self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        with self._lock:
            return {"total": sum(self.counts.values()), "answered": self.answered, "faults": dict(self.faults),
                    "keys": dict(self.counts)}

    # answering ------------------------------------------------------------------------------------------

    def count(self, key: str) -> int:
        """Count one more request for `key`; returns how many came before it."""
        with self._lock:
            self.counts[key] += 1
            return self.counts[key] - 1

    def draw_fault(self, key: str, seen_before: int) -> str | None:
        rng = random.Random(f"{self.config.seed}:fault:{key}:{seen_before}")
        if rng.random() >= self.config.fault_rate:
            return None
        fault = rng.choice(self.config.faults)
        with self._lock:
            self.faults[fault] += 1
        return fault

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _warm_up(self, resolution: int) -> None:
        """Build the pixel judge's shape prototypes for a resolution once (about a second), before any
        request needs them: computed in several request threads at once, they made every early request
        time out. Asked under the resolution's lock every time (a cache hit is a lookup): the cache keeps a few
        resolutions, so one asked again after others may need building again; a request at another resolution
        does not wait for it."""
        with self._lock:
            lock = self._warming.setdefault(resolution, threading.Lock())
        with lock:
            shape_prototypes(resolution)

    def _image(self, url: str) -> Image.Image:
        image = _decode(url)
        self._warm_up(image.height)  # (the segmenter reads the resolution off the rows)
        return image

    def completion(self, body: dict) -> dict:
        """The chat completion answering `body` (a fault-free request); raises `BadRequest`."""
        text, images = _first_user_message(body)
        prompt = fmt.read_prompt(text)
        if prompt is None:
            raise BadRequest('no line of the form Prompt: "..." in the request')
        response_format = body.get("response_format") or {}
        if not isinstance(response_format, dict):
            raise BadRequest("response_format must be an object")
        structured = response_format.get("type") == "json_schema"
        sampled = body.get("temperature", 1.0) != 0 and body.get("seed") is not None
        drawn_for = [text, images, body["seed"]] if sampled else [text, images]
        rng = random.Random(f"{self.config.seed}:error:{content_key(drawn_for)}")
        wrong = self.config.error_rate
        try:
            if len(images) == 1:
                questions = fmt.read_questions(text)
                if not questions:
                    raise BadRequest("no numbered questions in a one-image (VQA) request")
                answers = self.judge.answer(self._image(images[0]), prompt, [Question(q, "") for q in questions])
                answers = [a != (rng.random() < wrong) for a in answers]
                reply = fmt.format_vqa_reply(answers, structured)
            elif len(images) == 2:
                verdict = self.judge.compare(self._image(images[0]), self._image(images[1]), prompt).winner
                token = {"a": "first", "b": "second", "tie": "tie"}[verdict]
                if rng.random() < wrong:
                    token = rng.choice([t for t in fmt.PAIRWISE_TOKENS if t != token])
                reply = fmt.format_pairwise_reply(token, structured)
            else:
                raise BadRequest(f"expected one image (VQA) or two (pairwise), got {len(images)}")
        except (ValueError, KeyError) as e:  # GrammarError and unknown questions are ValueErrors
            raise BadRequest(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        with self._lock:
            self.answered += 1
        return _completion_json(body.get("model") or self.config.model, reply)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # listen backlog: the default of 5 drops connections a concurrent client opens at once

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (a timed-out request) is routine here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _first_user_message(body: dict) -> tuple[str, list[str]]:
    """Text and image data URLs of the first user message (re-asks append turns after it)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list")
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            break
    else:
        raise BadRequest("no user message")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(str(url.get("url", "") if isinstance(url, dict) else url))
    return "\n".join(texts), images


def _decode(url: str) -> Image.Image:
    header, _, data = url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise BadRequest("images must be base64 data URLs (data:image/...;base64,...)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            if max(image.size) > MAX_IMAGE_SIDE or min(image.size) < MIN_IMAGE_SIDE:
                raise BadRequest(f"a {image.width}x{image.height} image: serve-judge reads shapes-world scenes of "
                                 f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} px a side")
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadRequest(f"cannot read an image: {type(e).__name__}") from None


def _completion_json(model: str, reply: str) -> dict:
    return {
        "id": f"chatcmpl-{random.getrandbits(64):016x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connections
    # Headers and body leave in one segment, with no Nagle delay: otherwise each reply on a kept-alive
    # connection waits for the client's delayed ACK (about 40 ms on Linux).
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True

    @property
    def owner(self) -> JudgeServer:
        return self.server.judge_server  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:
        """Quiet: request lines say nothing useful here, and nothing from a request is ever logged."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.owner.config.model, "object": "model", "created": 0, "owned_by": "t2i-evolve"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif self.path.rstrip("/") in ("/stats", "/v1/stats"):
            self._send_json(HTTPStatus.OK, self.owner.stats())
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self) -> None:
        try:
            self._answer_post()
        except Exception as e:  # a request we did not foresee: an answer (500), never a dropped connection
            self.close_connection = True
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the judge server failed: {type(e).__name__}")

    def _answer_post(self) -> None:
        length_header = self.headers.get("Content-Length") or "0"
        if not (length_header.isascii() and length_header.isdigit()):  # ("²" is a digit to isdigit)
            self.close_connection = True
            return self._send_error(HTTPStatus.BAD_REQUEST, "Content-Length is not a whole number")
        length = int(length_header)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
        raw = self.rfile.read(length)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._send_error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return self._send_error(HTTPStatus.BAD_REQUEST, "the body is not a JSON object")
        try:
            content_key(body)  # hashed below: JSON may hold half a UTF-16 pair ("\\ud83d"), which is not text
        except UnicodeEncodeError:
            return self._send_error(HTTPStatus.BAD_REQUEST, "the body holds a lone UTF-16 surrogate, not text")
        server = self.owner
        key = self.headers.get("X-Client-Request-Id") or content_key(body)
        fault = server.draw_fault(key, server.count(key))
        server.wait(server.config.latency_s)
        if fault == "hang":
            server.wait(server.config.hang_s)
            self.close_connection = True  # drop it unanswered, like a stuck upstream
            return None
        if fault in ("429", "500"):
            status = HTTPStatus.TOO_MANY_REQUESTS if fault == "429" else HTTPStatus.INTERNAL_SERVER_ERROR
            return self._send_error(status, "injected fault")
        try:
            completion = server.completion(body)
        except BadRequest as e:
            return self._send_error(HTTPStatus.BAD_REQUEST, str(e))
        if fault == "malformed":
            completion["choices"][0]["message"]["content"] = MALFORMED_REPLY
        self._send_json(HTTPStatus.OK, completion)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": status.phrase, "code": int(status)}})

    def _send_json(self, status: HTTPStatus, data: dict) -> None:
        payload = json.dumps(data).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timed out) first
            self.close_connection = True
