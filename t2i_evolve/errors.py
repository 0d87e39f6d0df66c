"""Exceptions with a meaning the rest of the package relies on.

`UserError` is what the CLI turns into a one-line message and exit code 2: anything a user can fix
(an unknown word, a missing file, a bad config). `TransientError` is what a generator or judge raises
when the same request may succeed if sent again (a 429, a 5xx, a timeout); the call cache retries it.
"""

import errno


class UserError(Exception):
    """Bad input that a user can fix; shown as one line, never as a traceback."""


class GrammarError(UserError, ValueError):
    """Text outside the shapes-world grammar; the message names the word that could not be read."""

    def __init__(self, message: str, word: str | None = None):
        super().__init__(message)
        self.word = word


class ConfigError(UserError, ValueError):
    """A config file that does not validate; the message names the bad field."""


class EndpointError(UserError):
    """The server refused a request in a way that resending will not fix (bad key, unknown model, a
    rejected request); shown as one line, with the API key never in its text."""


class RequestRefused(EndpointError):
    """The server refused this one request (HTTP 400, 413, 422: a content policy, an image it cannot read):
    the request fails alone and the rest of its batch goes on. A bad key, a wrong URL or an unknown model
    (401, 403, 404) refuse every request, and stay an `EndpointError` that stops the run."""


class TransientError(RuntimeError):
    """A failure worth retrying: rate limit, server error, dropped connection."""


class CallTimeout(TransientError, TimeoutError):
    """A request that did not answer in time (retried like any transient error)."""


class BudgetExhausted(RuntimeError):
    """A per-run budget of calls or money is spent; callers stop cleanly."""


class DiskFull(UserError):
    """No room left where the run writes: raised before paying for images that could not be stored."""


DISK_FULL_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")
"""How a full disk reads in the errors of libraries that do not raise `OSError` for it: SQLite
(`sqlite3.OperationalError`), safetensors (`SafetensorError`)."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says the disk (or the user's quota) is full. Text is
    read only from SQLite's and safetensors' errors: a server's quoted message is not our disk."""
    while error is not None:
        if isinstance(error, DiskFull):
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(error).__module__.split(".")[0] in ("sqlite3", "safetensors"):
            if any(text in str(error).lower() for text in DISK_FULL_TEXTS):
                return True
        error = error.__cause__ or error.__context__
    return False
