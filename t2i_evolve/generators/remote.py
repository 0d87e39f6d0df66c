"""Errors from an OpenAI-compatible endpoint, turned into the package's own without leaking the key.

`endpoints.transient` says which client errors are worth retrying. The rest (a bad key, an unknown
model, a rejected request) become `EndpointError`, a `UserError` the CLI shows as one line. Its text
keeps the error's class, status and the server's message with the API key cut out, because a server's
error body can echo the request's headers; and it is raised `from None`, so a traceback does not print
the client's original exception underneath.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..endpoints import EndpointConfig, redact, refused, safe_url, transient


def endpoint_error(exc: BaseException, config: EndpointConfig) -> Exception | None:
    """What to raise for a client error `exc`: a `TransientError`, a `RequestRefused` (this request only), an
    `EndpointError` (every request: a bad key, a wrong URL or model), or None when `exc` did not come from the
    client (it then propagates as it is). The URL in its text never carries a user:password part."""
    import openai

    retry = transient(exc)
    if retry is not None:
        return retry
    if not isinstance(exc, openai.OpenAIError):
        return None
    status = getattr(exc, "status_code", None)
    detail = getattr(exc, "message", None) or str(exc)
    where = f"{safe_url(config.base_url)} (model {config.model})"
    code = f"HTTP {status} " if status is not None else ""
    return refused(status, f"{where}: {code}{type(exc).__name__}: {redact(detail, config)}")


@contextmanager
def endpoint_errors(config: EndpointConfig) -> Iterator[None]:
    """Run a block of client calls, raising `endpoint_error`'s translation of what the client raises."""
    try:
        yield
    except Exception as exc:
        error = endpoint_error(exc, config)
        if error is None:
            raise
        raise error from None

