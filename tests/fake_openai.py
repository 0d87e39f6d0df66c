"""A small scripted OpenAI-compatible server for tests: chat completions and image generations.

It runs `http.server.ThreadingHTTPServer` on 127.0.0.1, port 0, in a thread, so tests talk to it
through the real `openai` client over loopback. Replies are scripted per endpoint:

- `chat`: a queue of items, each a reply text, an HTTP status (int) to fail with (or a tuple of a
  status and headers to send with it, such as `x-should-retry`), a float number
  of seconds to sleep before answering (to make the client time out), or bytes sent as the whole body
  with status 200 (a proxy's page where a completion should be); when the queue is empty,
  `chat_reply(body)` answers (by default a JSON list of grammar prompts drawn from the request).
- `images`: a queue of HTTP statuses to fail with; when empty, the prompt is drawn by the strong
  `ProceduralTeacher` at the requested size with the seed from the body.

Every request is recorded (path, JSON body, Authorization header) so tests can count what was sent.
With `api_key` set, a request with another key gets a 401 whose body echoes the header it got, the
way a careless server would, to test that the client side never shows the key.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from t2i_evolve.world import GrammarPrompts, ProceduralTeacher, TeacherConfig


def grammar_reply(body: dict, n: int = 5) -> str:
    """A JSON list of `n` grammar prompts, different for each distinct request."""
    seed = int.from_bytes(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()[:4], "little")
    return json.dumps(GrammarPrompts().sample(n, seed=seed))


class FakeOpenAI:
    """Use as a context manager; `base_url` ends in /v1 like a real server's."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        chat_reply: Callable[[dict], str] = grammar_reply,
        image_delay_s: float = 0.0,
    ):
        self.api_key = api_key
        self.chat_reply = chat_reply
        self.image_delay_s = image_delay_s
        self.chat: deque = deque()
        self.images: deque = deque()
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._teachers: dict[int, ProceduralTeacher] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeOpenAI:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def count(self, path_end: str) -> int:
        """How many requests were made to a path ending in `path_end`."""
        with self._lock:
            return sum(r["path"].endswith(path_end) for r in self.requests)

    # -- answering (called from the handler's threads) ------------------------------------------------

    def _next(self, queue: deque):
        with self._lock:
            return queue.popleft() if queue else None

    def answer_chat(self, body: dict) -> tuple[int, dict | bytes] | tuple[int, dict, dict]:
        item = self._next(self.chat)
        if isinstance(item, float):
            time.sleep(item)
            item = None
        if isinstance(item, int):
            return item, _error(item, "scripted failure")
        if isinstance(item, tuple):
            return item[0], _error(item[0], "scripted failure"), item[1]
        if isinstance(item, bytes):
            return 200, item
        content = self.chat_reply(body) if item is None else item
        return 200, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def answer_images(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.image_delay_s)
            item = self._next(self.images)
            if item is not None:
                return item, _error(item, "scripted failure")
            side = int(str(body.get("size", "32x32")).split("x")[0])
            image = self._teacher(side).draw(body["prompt"], int(body.get("seed", 0)))[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            b64 = base64.b64encode(buffer.getvalue()).decode()
            return 200, {"created": int(time.time()), "data": [{"b64_json": b64}]}
        finally:
            with self._lock:
                self.in_flight -= 1

    def _teacher(self, side: int) -> ProceduralTeacher:
        with self._lock:
            if side not in self._teachers:
                self._teachers[side] = ProceduralTeacher(TeacherConfig(resolution=side))
            return self._teachers[side]


def _error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "fake_error", "code": status}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI

    def handle_error(self, request, client_address):
        """Quiet: a client that timed out and hung up is part of the tests."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        auth = self.headers.get("Authorization", "")
        with fake._lock:
            fake.requests.append({"path": self.path, "body": body, "auth": auth})
        headers: list[dict] = []  # extra headers, from a scripted chat item
        if fake.api_key is not None and auth != f"Bearer {fake.api_key}":
            status, reply = 401, _error(401, f"Incorrect API key provided: {auth}")
        elif self.path.endswith("/chat/completions"):
            status, reply, *headers = fake.answer_chat(body)
        elif self.path.endswith("/images/generations"):
            status, reply = fake.answer_images(body)
        else:
            status, reply = 404, _error(404, f"no route {self.path}")
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        """Quiet: tests read `FakeOpenAI.requests` instead."""


# -- fixtures shared by the tests that talk to it (imported by name into those test modules) ----------

KEY_ENV = "T2I_EVOLVE_TEST_KEY"


@pytest.fixture
def api_key(monkeypatch):
    """A unique fake key in the env var the endpoint configs name, so a test can grep for its value."""
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, key)
    return key


@pytest.fixture
def server(api_key):
    with FakeOpenAI(api_key=api_key) as fake:
        yield fake
