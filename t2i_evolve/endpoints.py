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

import os
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .config import Config
from .errors import CallTimeout, ConfigError, TransientError, UserError


class EndpointError(UserError):
    """The server refused a request in a way that resending will not fix (bad key, unknown model, a
    rejected request); shown as one line, with the API key never in its text."""


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


class EndpointConfig(Config):
    """Where a remote model lives and how hard to push it."""

    base_url: str = Field(description="Server root including /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name the server knows, e.g. Qwen/Qwen2-VL-7B-Instruct.")
    api_key_env: str | None = Field(
        None, description="Name of the env var holding the API key (the key itself never goes in a config)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout; a timeout is retried.")
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once (async client).")
    retries: int = Field(4, ge=0, description="Re-sends of a request after a 429/5xx/timeout.")
    backoff_s: float = Field(0.5, ge=0, description="First backoff; doubles per retry, with jitter.")

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
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(f"environment variable {self.api_key_env} (the API key) is not set")
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


def transient(exc: BaseException) -> TransientError | None:
    """The `TransientError` to retry `exc` as (429, 5xx, timeout, dropped connection), else None.

    The message keeps the error's class and status only: a server's error body can echo request
    headers, and so the key.
    """
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return CallTimeout("request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError("connection failed")
    if isinstance(exc, openai.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500):
        return TransientError(f"HTTP {exc.status_code}")
    return None
