"""The call cache: never pay twice for the same request, and never lose track of a paid one.

Every call to a generator or judge that may cost money or minutes goes through `Ledger.cached_calls`,
keyed by the sha256 of the canonical JSON of (caller, request). The protocol for one call is:

1. a 'done' row for the key exists: return its response, call nothing;
2. otherwise commit a 'pending' row (the intent) *before* calling;
3. call, retrying `TransientError` with exponential backoff and jitter, counting attempts;
4. commit 'done' with the response and its price, or 'failed' with the error once retries run out.

A 'pending' row found at step 2 means a process died during that call: the request may or may not
have reached the server, and if a reply came back it was lost with the process. The call is sent again
and the row's `interrupted` count goes up, its `attempts` (what budgets count) not: the request was counted
when first sent, so a rerun spends the budget as the uninterrupted run did and ends with its ledger. So
the guarantee is at-least-once, and the number of calls paid twice, and by which a cap may be passed, is
at most `Ledger.interrupted_calls()` (one per crash for sequential calls, one batch per crash for batched
ones). Exactly-once is not possible against an external API that has no idempotency key; this is the
honest bound.

`CachedGenerator` and `CachedJudge` (cached.py) wrap a `Generator` or `Judge` with this cache, so a recipe
that is rerun after a crash, or with more rounds, only pays for what it has not received yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..errors import BudgetExhausted, DiskFull, RequestRefused, TransientError


class CallBudget(BaseModel):
    """Limits on what one caller (a generator or judge id) may spend in a run.

    `max_calls` counts requests sent, retries included, since each one costs quota (one sent again after a
    crash, its reply lost with the process, counts once: module docstring); `max_price` sums the `price` of
    answered calls. Both are read from the run's calls table, so a budget holds across
    restarts, and cached answers never count. A request it cannot pay for is never sent: a first try
    raises `BudgetExhausted`, a retry is not sent and its request fails (so a cap is never passed, and a
    batch that fitted the cap does not stop half-way because some of it needed a second try).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_calls: int | None = Field(default=None, ge=0)
    max_price: float | None = Field(default=None, ge=0)
    callers: tuple[str, ...] = Field(default=(), description="Ids whose calls count together against these caps "
                                     "(a run's teachers share one); empty: the caller's own calls.")

    def allowance(self, calls: int, spent: float, price: float) -> int:
        """How many more calls at `price` each fit, given `calls` sent and `spent` so far."""
        n = sys.maxsize
        if self.max_calls is not None:
            n = min(n, self.max_calls - calls)
        if self.max_price is not None and price > 0:
            n = min(n, math.floor((self.max_price - spent) / price + 1e-9))
        return max(n, 0)


@dataclass(frozen=True)
class Call:
    """One row of the calls table: a request, what became of it, and what it cost."""

    key: str
    caller: str
    request: dict
    status: str
    response: dict | None
    error: str | None
    attempts: int
    interrupted: int
    price: float
    round: int | None
    ask_again: bool

    @property
    def settled(self) -> bool:
        """Answered, or failed for good: a rerun gets this outcome without sending the request again (so it
        pays nothing twice and ends as the first run did). A failure marked `ask_again` is not settled, and a
        rerun asks again: a retry the budget could not pay for (never sent), a request in flight when the run
        stopped at an error it could not go on after (a bad key, a full GPU), and one the run marked to be asked
        again once its cause is fixed (`ask_failed_calls_again`)."""
        return self.status == "done" or (self.status == "failed" and not self.ask_again)

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Call:
        values = dict(row)
        values["request"], values["response"] = json.loads(values["request"]), from_json(values["response"])
        values["ask_again"] = bool(values["ask_again"])
        return cls(**values)


UNPAID = "not retried: the budget is spent"
"""How the error of a request whose retry the budget could not pay for ends."""

BatchCall = Callable[[list[dict]], Sequence[dict | Exception | None]]
"""What `Ledger.cached_calls` calls: requests in, one response (None or an exception for a failed item) per request out."""


@dataclass(frozen=True)
class _Terms:
    """How one batch of calls is sent: who asks, what each call costs, how hard to retry."""

    caller: str
    price: float
    round: int | None
    retries: int
    backoff_s: float
    budget: CallBudget | None


class CallCacheMixin:
    """The call cache part of `Ledger` (kept here to keep the ledger module readable).

    Relies on the ledger's `transaction()` and `_read()`. A key is claimed in memory while its call is
    in flight, so two threads asking for the same thing wait for one call instead of paying for two
    (and a 'pending' row seen by this process really was left by a dead process, or an interrupt).
    """

    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _read: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _depth: int

    def __init__(self) -> None:
        self._in_flight: set[str] = set()
        self._in_flight_changed = threading.Condition()
        self._paying = threading.Lock()  # a price cap is checked and paid in one step (price is written on answer)

    def cached_call(
        self,
        caller: str,
        request: dict,
        call: Callable[[], dict],
        *,
        price: float = 0.0,
        round: int | None = None,
        retries: int = 4,
        backoff_s: float = 0.5,
        budget: CallBudget | None = None,
    ) -> dict | None:
        """The response to `request`, from the cache or from `call()`; None if it failed after retries.

        `request` must be JSON-serialisable and hold everything that determines the answer; `call`
        must return a JSON-serialisable dict. A `RequestRefused` fails the request (None, the reason kept in
        its row); other non-transient exceptions propagate (the row is marked 'failed' with the error);
        `BudgetExhausted` is raised before a call the budget cannot pay for.
        """

        def one(requests: list[dict]) -> list[dict | Exception]:
            try:
                return [call()]
            except RequestRefused as e:  # this request fails alone; other errors (a bad key) propagate
                return [e]

        return self.cached_calls(
            caller, [request], one, price=price, round=round,
            retries=retries, backoff_s=backoff_s, batch_size=1, budget=budget,
        )[0]

    def cached_calls(
        self,
        caller: str,
        requests: Sequence[dict],
        call: BatchCall,
        *,
        price: float = 0.0,
        round: int | None = None,
        retries: int = 4,
        backoff_s: float = 0.5,
        batch_size: int = 16,
        budget: CallBudget | None = None,
        reserve: int = 0,
    ) -> list[dict | None]:
        """`cached_call` for many requests: the misses go to `call` in chunks of `batch_size`.

        `call` gets a list of requests and returns one response per request: a dict, None for an item that
        failed (retried alone, as is a `TransientError` in its place), or another exception for an item the
        server refused (it fails alone, with that reason, and is not retried). A chunk that raises
        `TransientError` is retried whole; any other exception fails the chunk and propagates. `price` is per
        request. Each request keeps its own row, so a crash mid-chunk repeats at most that chunk. Retries leave
        the budget room for the first tries still to come: this call's later chunks, and `reserve` more that
        the caller will send next under the same budget. Under a price cap, threads send one chunk at a time
        (a price is known once a call is answered, so two chunks in flight could together pass the cap).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        terms = _Terms(caller, price, round, retries, backoff_s, budget)
        keys = [content_key([caller, request]) for request in requests]
        by_key = dict(zip(keys, requests))
        with self._claim(by_key):
            results = self._settled_responses(by_key)
            misses = [key for key in by_key if key not in results]
            states = self._call_states(misses)  # (one left in flight by a dead process: counted when first sent)
            resent = {key for key, state in states.items() if state == "pending"}
            priced = budget is not None and budget.max_price is not None
            while misses:
                check_room(self.run_dir)
                with self._paying if priced else nullcontext():
                    with self._read() as db:
                        n = _fitting(db, terms, misses[:batch_size], resent)
                    chunk, misses = misses[:n], misses[n:]
                    results |= self._send(terms, chunk, by_key, call, reserve=len(misses) + reserve)
        return [results[key] for key in keys]

    def _call_states(self, keys: Iterable[str]) -> dict[str, str]:
        """Of `keys`, those with an outcome ('settled': `Call.settled`) and those a process that died left in
        flight ('pending': in flight now in this one they cannot be, `_claim`); the rest are left out."""
        with self._read() as db:
            return _call_states(db, keys)

    def interrupted_calls(self) -> int:
        """How many times a call was found 'pending': left in flight by a process that died (or by an
        interrupt, such as Ctrl-C). This bounds the number of requests that may have been paid twice.
        """
        with self._read() as db:
            return db.execute("SELECT coalesce(sum(interrupted), 0) FROM calls").fetchone()[0]

    def call_count(self) -> int:
        """How many calls the cache holds (answered, failed or in flight): 0 for a run that has spent nothing."""
        with self._read() as db:
            return db.execute("SELECT count(*) FROM calls").fetchone()[0]

    def call_totals(self, callers: Iterable[str], before_round: int | None = None) -> tuple[int, float]:
        """Requests sent (`attempts`) and price paid by `callers`, in all rounds or those before `before_round`
        (`_totals`: what a budget checks before each batch of calls, from the totals SQLite keeps)."""
        with self._read() as db:  # (a ledger opened read-only may be of schema 2, without the totals: summed)
            return _totals(db, list(callers), before_round, kept=not getattr(self, "read_only", False))

    def calls(self, *, caller: str | None = None, status: str | None = None) -> list[Call]:
        """Rows of the calls table, oldest first."""
        where, args = where_clause(("caller = ?", caller), ("status = ?", status))
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls {where} ORDER BY rowid", args
            ).fetchall()
        return [Call._from_row(row) for row in rows]

    def _send(
        self, terms: _Terms, keys: list[str], by_key: dict[str, dict], call: BatchCall, reserve: int = 0
    ) -> dict[str, dict | None]:
        """Call for `keys` with retries; returns key -> response, None for those that failed. A retry is sent
        only where the budget can still pay for it and for the `reserve` first tries still to come."""
        remaining, results, error = list(keys), {}, ""
        for attempt in range(terms.retries + 1):
            if attempt and terms.backoff_s:
                time.sleep(terms.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            try:
                remaining = self._start_attempt(terms, remaining, by_key, first=attempt == 0, error=error,
                                                reserve=reserve)
                if not remaining:
                    break
                responses = list(call([by_key[key] for key in remaining]))
                if len(responses) != len(remaining):
                    raise ValueError(f"{terms.caller}: {len(responses)} answers to {len(remaining)} requests")
                done = {key: r for key, r in zip(remaining, responses) if isinstance(r, dict)}
                failed = {key: r for key, r in zip(remaining, responses) if isinstance(r, Exception)}
                errors = {key: f"{type(r).__name__}: {r}" for key, r in failed.items()}
                refused = {key: errors[key] for key, r in failed.items() if not isinstance(r, TransientError)}
                self._finish(done, terms.price, refused)
            except TransientError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            except Exception as e:  # the run stops here: its fix is the user's, and then these are asked again
                self._fail(remaining, f"{type(e).__name__}: {e}", ask_again=True)
                raise
            results |= done
            remaining = [key for key in remaining if key not in done and key not in refused]
            if not remaining:
                break
            error = next((errors[key] for key in remaining if key in errors), "no result")
        self._fail(remaining, error)
        return {key: results.get(key) for key in keys}

    def _start_attempt(self, terms: _Terms, keys: list[str], by_key: dict[str, dict], *, first: bool,
                       error: str = "", reserve: int = 0) -> list[str]:
        """Commit the intent to send `keys` (status 'pending', one more attempt) before sending; returns the
        keys to send. A first try the budget cannot pay for raises `BudgetExhausted`; a retry it cannot pay
        for (keeping `reserve` calls for first tries still to come) is not sent, and its request fails.

        On the first attempt of this process, a row that is already 'pending' counts as interrupted, and its
        attempt as none more: it was counted when the process that died sent it.
        """
        now = utc_now()
        with self.transaction() as db:
            if self._depth > 1:
                raise RuntimeError("the call cache cannot run inside Ledger.transaction()")
            if first:
                resent = {key for key, state in _call_states(db, keys).items() if state == "pending"}
                if _fitting(db, terms, keys, resent) < len(keys):
                    raise _spent(db, terms)
            else:
                room = max(0, _allowance(db, terms, need=0) - reserve)
                keys, unpaid = keys[:room], keys[room:]
                _mark_failed(db, dict.fromkeys(unpaid, f"{error}; {UNPAID}"), ask_again=True)
            db.executemany(
                "INSERT INTO calls (key, caller, request, status, attempts, round, created_at, updated_at) "
                "VALUES (?, ?, ?, 'pending', 1, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET status = 'pending', ask_again = 0, "
                "attempts = calls.attempts + NOT (? AND calls.status = 'pending'), "
                "interrupted = calls.interrupted + (? AND calls.status = 'pending'), "
                "round = coalesce(calls.round, excluded.round), updated_at = excluded.updated_at",
                [(k, terms.caller, canonical_json(by_key[k]), terms.round, now, now, first, first) for k in keys],
            )
        return keys

    def _finish(self, responses: dict[str, dict], price: float, refused: dict[str, str] | None = None) -> None:
        """Commit the answers, and the requests refused alone (with their reasons), at once."""
        now = utc_now()
        with self.transaction() as db:
            _mark_failed(db, refused or {})
            db.executemany(
                "UPDATE calls SET status = 'done', response = ?, error = NULL, price = ?, updated_at = ? "
                "WHERE key = ?",
                [(canonical_json(response), price, now, key) for key, response in responses.items()],
            )

    def _fail(self, keys: list[str], error: str, ask_again: bool = False) -> None:
        with self.transaction() as db:
            _mark_failed(db, dict.fromkeys(keys, error), ask_again)

    def _settled_responses(self, keys: Iterable[str]) -> dict[str, dict | None]:
        """The outcome of each of `keys` already settled (`Call.settled`): its response, None for a failure."""
        results: dict[str, dict | None] = {}
        with self._read() as db:
            for key in keys:
                row = db.execute(f"SELECT {_CALL_COLUMNS} FROM calls WHERE key = ?", (key,)).fetchone()
                call = Call._from_row(row) if row is not None else None
                if call is not None and call.settled:
                    results[key] = call.response if call.status == "done" else None
        return results

    def ask_failed_calls_again(self, callers: Iterable[str], round: int | None = None) -> int:
        """Unsettle the failed calls of `callers` (of `round` only, if given), and the answered ones whose reply
        could not be read (a judge's `"status": "unparseable"`), so that a rerun asks them again: for a run stopped
        because an endpoint failed every request, or answered none readably (the wrong model behind it, a broken
        chat template), once it is fixed. Their attempts still count against budgets (each was a request sent).
        Returns how many."""
        callers = list(callers)
        where, args = f"caller IN ({', '.join('?' * len(callers))})", callers
        if round is not None:
            where, args = where + " AND round = ?", [*callers, round]
        with self.transaction() as db:
            unread = db.execute(f"UPDATE calls SET status = 'failed', ask_again = 1, error = 'an unreadable reply' "
                                f"WHERE {where} AND status = 'done' "
                                "AND json_extract(response, '$.status') = 'unparseable'", args).rowcount
            return unread + db.execute(f"UPDATE calls SET ask_again = 1 WHERE {where} AND status = 'failed' "
                                       "AND NOT ask_again", args).rowcount

    @staticmethod
    def _call_stats(db: sqlite3.Connection) -> list[dict]:
        rows = db.execute(
            "SELECT caller, round, count(*) FILTER (WHERE status = 'done') AS done, "
            "count(*) FILTER (WHERE status = 'failed') AS failed, "
            "count(*) FILTER (WHERE status = 'pending') AS pending, "
            "sum(attempts) AS attempts, sum(interrupted) AS interrupted, sum(price) AS price "
            "FROM calls GROUP BY caller, round ORDER BY caller, round"
        ).fetchall()
        return [dict(row) | {"price": round(row["price"] or 0.0, 9)} for row in rows]  # (sums of 0.04s: 8.000000000000005)

    @contextmanager
    def _claim(self, keys: Iterable[str]) -> Iterator[None]:
        """Hold `keys` for this thread; all at once, so two threads never wait on each other in a cycle."""
        keys = set(keys)
        with self._in_flight_changed:
            self._in_flight_changed.wait_for(lambda: self._in_flight.isdisjoint(keys))
            self._in_flight |= keys
        try:
            yield
        finally:
            with self._in_flight_changed:
                self._in_flight -= keys
                self._in_flight_changed.notify_all()


_CALL_COLUMNS = ", ".join(f.name for f in fields(Call))


MIN_FREE_BYTES = 64 * 2**20
"""Room a run folder's disk must keep to spare: a call's answer (an image paid for), a metrics line, SQLite's journal."""


def check_room(folder: Path, need: int = 0, needed_for: str = "the answers of the calls it would send next") -> None:
    """Refuse work whose results could not be kept, before it is paid for or done: `need` bytes, and
    `MIN_FREE_BYTES` to spare, on the disk of `folder` (or of its nearest existing parent)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need + MIN_FREE_BYTES:
        raise DiskFull(f"the disk is full ({free / 2**20:,.0f} MB left for {folder}, too little for {needed_for} and "
                       f"the {MIN_FREE_BYTES / 2**20:,.0f} MB kept free): free some space and rerun the same command")


def _mark_failed(db: sqlite3.Connection, errors: dict[str, str], ask_again: bool = False) -> None:
    """Mark the calls in flight among `errors`' keys failed, each with its reason (an answered one stays); with
    `ask_again`, a failure a rerun asks again (`Call.settled`)."""
    db.executemany("UPDATE calls SET status = 'failed', error = ?, ask_again = ?, updated_at = ? "
                   "WHERE key = ? AND status = 'pending'",
                   [(error, ask_again, utc_now(), key) for key, error in errors.items()])


def _totals(db: sqlite3.Connection, callers: Sequence[str], before_round: int | None = None,
            kept: bool = True) -> tuple[int, float]:
    """Requests sent and price paid by `callers`: all rounds' from the table a ledger of schema 3 keeps (triggers on
    `calls`; summing the calls took 132 ms at 300,000, before each batch), a round's (or where `kept` is False)
    summed over the calls."""
    marks = ", ".join("?" * len(callers))
    if kept and before_round is None:
        query, args = f"SELECT sum(attempts), sum(price) FROM call_totals WHERE caller IN ({marks})", [*callers]
    else:
        query, args = f"SELECT sum(attempts), sum(price) FROM calls WHERE caller IN ({marks})", [*callers]
        if before_round is not None:
            query, args = query + " AND round < ?", [*args, before_round]
    sent, price = db.execute(query, args).fetchone()
    return int(sent or 0), float(price or 0.0)


def _allowance(db: sqlite3.Connection, terms: _Terms, need: int) -> int:
    """How many calls `terms.caller` may still send; raises `BudgetExhausted` if fewer than `need`."""
    budget = terms.budget
    if budget is None or budget.max_calls is None and budget.max_price is None:
        return sys.maxsize
    callers = budget.callers or (terms.caller,)
    calls, spent = _totals(db, callers)
    n = budget.allowance(calls, spent, terms.price)
    if n < need:
        raise _spent(db, terms)
    return n


def _spent(db: sqlite3.Connection, terms: _Terms) -> BudgetExhausted:
    callers = terms.budget.callers or (terms.caller,)
    calls, spent = _totals(db, callers)
    caps = ", ".join(f"{name}={value:g}" for name, value in (("max_calls", terms.budget.max_calls),
                                                              ("max_price", terms.budget.max_price)) if value is not None)
    return BudgetExhausted(f"budget of {' + '.join(callers)} spent: {calls} calls sent, price {spent:g} ({caps})")


def _fitting(db: sqlite3.Connection, terms: _Terms, keys: Sequence[str], resent: set[str]) -> int:
    """How many of `keys`, from the first, the budget can pay for: each one against `max_price` (a price is paid
    on answer), those not in `resent` (sent again after a crash: counted once, when first sent) against
    `max_calls`. Raises `BudgetExhausted` where not even the first fits."""
    budget = terms.budget
    if budget is None or budget.max_calls is None and budget.max_price is None:
        return len(keys)
    calls, spent = _totals(db, budget.callers or (terms.caller,))
    fit, new = 0, 0
    for key in keys:
        new += key not in resent
        if budget.allowance(calls + new - (fit + 1), spent, terms.price) < fit + 1:
            break
        fit += 1
    if keys and not fit:
        raise _spent(db, terms)
    return fit


def _call_states(db: sqlite3.Connection, keys: Iterable[str]) -> dict[str, str]:
    """`CallCacheMixin._call_states`, in `db` (a read, or the transaction that starts an attempt)."""
    states = {}
    for key in keys:
        row = db.execute("SELECT status, ask_again FROM calls WHERE key = ?", (key,)).fetchone()
        if row is not None and (row[0] == "done" or row[0] == "failed" and not row[1]):
            states[key] = "settled"
        elif row is not None and row[0] == "pending":
            states[key] = "pending"
    return states


def encode_png(image: Image.Image) -> tuple[bytes, str]:
    """PNG bytes of an image (as RGB) and their sha256, the image's content address.

    Converting to RGB first means the same pixels always get the same address, whatever mode the
    generator returned, and every image the ledger hands back is RGB.
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """One text per value (sorted keys, no spaces), so equal requests hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_key(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def is_text(value: Any) -> bool:
    """Whether `value`'s strings are all text UTF-8 can encode: JSON's "\\ud83d" (half a UTF-16 pair, an emoji
    cut off) decodes to a str that is not, and that no key can hash nor the ledger store."""
    try:
        canonical_json(value).encode()
    except UnicodeEncodeError:
        return False
    return True


def where_clause(*pairs: tuple[str, Any]) -> tuple[str, list]:
    """A WHERE clause from (condition, value) pairs, skipping those whose value is None."""
    used = [(condition, value) for condition, value in pairs if value is not None]
    if not used:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in used), [v for _, v in used]


def from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
