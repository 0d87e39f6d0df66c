"""OpenAI-compatible endpoints: one config and one place that builds clients.

Every remote part (VLM judges, LLM prompt writers, image teachers) talks to a server through the
`openai` client, so a vLLM server, a hosted API and our own `serve-judge` are interchangeable. The API
key is read from the environment variable *named* in the config, at the moment a client is built; it is
never stored on a config, printed, logged or written to the ledger.

Retries: the client is built with `max_retries=0`. Retrying (with exponential backoff and jitter) is
done by the ledger's call cache, which counts every attempt per request, so `ledger stats` shows what
was paid. `transient(exc)` says which client errors are worth retrying.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .config import Config
from .errors import CallTimeout, ConfigError, EndpointError, RequestRefused, TransientError, UserError


ENDPOINT_WIDE = (401, 403, 404)  # statuses that no other request of the run would escape


def refused(status: int | None, message: str) -> EndpointError:
    """The error for a non-transient HTTP `status`: `RequestRefused` unless it refuses every request."""
    return EndpointError(message) if status is None or status in ENDPOINT_WIDE else RequestRefused(message)


def safe_url(url: str) -> str:
    """scheme://host:port/path of a URL, without any user:password part (for messages, logs and the ledger)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def base_url_problem(url: str) -> str | None:
    """Why `url` cannot be an endpoint's base URL (http or https, a host, a port in 1..65535), else None.

    The reason never quotes the URL: it may carry a user:password part.
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number in 0..65535 (its text, never the rest)
    except ValueError as e:  # and "Invalid IPv6 URL" for http://[::1/v1
        return f"cannot be parsed ({e})"
    if parts.scheme not in ("http", "https"):
        return "needs an http:// or https:// scheme"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has port 0, not one in 1..65535"
    return None


HOW_TO_REACH = frozenset({"base_url", "api_key_env", "timeout_s", "max_concurrency", "retries", "backoff_s",
                          "check_model"})
"""The `EndpointConfig` fields that say how to reach a model, not which one: a resumed run may change them (another
port, key or patience). Not `model`: it names what answers, and calls are cached and counted under it."""


class EndpointConfig(Config):
    """Where a remote model lives and how hard to push it."""

    base_url: str = Field(description="Server root including /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name the server knows, e.g. Qwen/Qwen2-VL-7B-Instruct.")
    api_key_env: str | None = Field(
        None, description="Name of the env var holding the API key (the key itself never goes in a config)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout; a timeout is retried.")
    max_concurrency: int = Field(8, ge=1, le=4096, description="Requests in flight at once (async client).")
    retries: int = Field(4, ge=0, le=100, description="Re-sends of a request after a 429/5xx/timeout.")
    backoff_s: float = Field(0.5, ge=0, description="First backoff; doubles per retry, with jitter.")
    check_model: bool = Field(True, description="Before a run pays for anything, check that the server's model list "
                              "(GET /models) names `model`; false for a server that serves it under another name.")

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, url: str) -> str:
        problem = base_url_problem(url)
        if problem:
            raise ValueError(f"base_url {problem}; expected a URL like http://127.0.0.1:8000/v1")
        return url

    def api_key(self) -> str:
        """The key from the environment ('EMPTY' when no variable is named: local vLLM needs none)."""
        if self.api_key_env is None:
            return "EMPTY"
        value = (os.environ.get(self.api_key_env) or "").strip()  # a secret file's trailing newline is not the key
        if not value:
            raise ConfigError(f"environment variable {self.api_key_env} (the API key) is not set")
        if not (value.isascii() and value.isprintable() and " " not in value):  # (never quoted: it is a secret)
            raise ConfigError(f"environment variable {self.api_key_env} (the API key) holds a space, a control or "
                              "a non-ASCII character, which no HTTP header can carry: check what was pasted into it")
        return value


def make_client(config: EndpointConfig):
    """A synchronous `openai.OpenAI` client for `config` (no client-side retries: see module doc)."""
    import openai

    return openai.OpenAI(base_url=config.base_url, api_key=config.api_key(), timeout=config.timeout_s,
                         max_retries=0)


def make_async_client(config: EndpointConfig):
    """An `openai.AsyncOpenAI` client for `config`, for bounded-concurrency batches."""
    import openai

    return openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key(), timeout=config.timeout_s,
                              max_retries=0)


def check_serves(config: EndpointConfig, part: str) -> None:
    """Before a run pays for anything: that the server at `config.base_url` answers, takes the key, and serves
    `config.model` where it lists its models (`GET /models`, as vLLM, TGI and OpenAI do; free). A misspelled model
    of the judge would otherwise be found only once the teachers had drawn the whole seed set. A server that lists
    none (404, a page that is not a list) is not held to it. `part` names the endpoint in the one-line error."""
    import openai

    client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key(), timeout=min(config.timeout_s, 10.0),
                           max_retries=1)
    where = safe_url(config.base_url)
    try:
        served = [model.id for model in client.models.list()]
    except openai.APIConnectionError:  # (a timeout too)
        raise UserError(f"{part}: no answer from {where}: is the server running there? (then rerun)") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise UserError(f"{part}: {where} refused the API key (HTTP {e.status_code}; "
                        f"{config.api_key_env or 'no api_key_env'})") from None
    except Exception:  # (no list of models here: the first request will say whether it serves this one)
        return
    if served and config.model not in served and config.check_model:
        shown = ", ".join(repr(name) for name in served[:5]) + (f" and {len(served) - 5} more" if len(served) > 5 else "")
        raise UserError(f"{part}: {where} does not serve model {config.model!r} (it serves {shown}; one it serves "
                        f"under another name: {part}.endpoint.check_model=false)")


RETRIED_STATUSES = (408, 409, 429)  # and every 5xx: what the openai client itself would retry


def transient(exc: BaseException) -> TransientError | None:
    """The `TransientError` to retry `exc` as, else None: a timeout, a dropped connection, HTTP 408, 409,
    429 or 5xx (a server's `x-should-retry` header overrides the status, as the openai client honours it),
    or a reply that is not JSON (a proxy's error page sent with status 200, as JSON or not UTF-8).

    The message keeps the error's class and status only: a server's error body can echo request
    headers, and so the key.
    """
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return CallTimeout("request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError("connection failed")
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError, RecursionError)):  # (too deeply nested)
        return TransientError("malformed reply: not JSON")
    if isinstance(exc, openai.APIStatusError):
        hint = exc.response.headers.get("x-should-retry", "").lower() if exc.response is not None else ""
        if hint == "true" or (hint != "false" and (exc.status_code in RETRIED_STATUSES or exc.status_code >= 500)):
            return TransientError(f"HTTP {exc.status_code}")
    return None


def chat_text(completion: object) -> str:
    """The text of a chat completion's first choice ('' for a reply with no text). A reply that is not a chat
    completion at all (a proxy's page sent as text, a `null` message) is a `TransientError`: retried, and
    the call's error once retries run out."""
    choices = getattr(completion, "choices", None)
    if isinstance(choices, list) and not choices:
        return ""
    message = getattr(choices[0], "message", None) if isinstance(choices, list) else None
    if message is None:
        raise TransientError(f"malformed reply: not a chat completion ({type(completion).__name__})")
    content = getattr(message, "content", None)
    # JSON may hold half a UTF-16 pair ("\\ud83d", an emoji cut off): not text the ledger can store or hash
    return content.encode("utf-8", "replace").decode("utf-8") if isinstance(content, str) else ""


def redact(text: object, config: EndpointConfig, limit: int = 300) -> str:
    """`text` with the API key (if one is set) replaced by '***', then cut to `limit` characters (in that
    order: a cut first could leave a prefix of the key that no longer matches it)."""
    text = str(text)
    try:
        key = config.api_key()
    except ConfigError:
        key = None
    if key and key != "EMPTY":
        text = text.replace(key, "***")
    return text[:limit]
