"""The dataset ledger of a run: every record, image, change and paid call, in one folder.

A run folder looks like this:

    run_dir/ledger.sqlite                 records, ops, calls (SQLite, WAL mode)
    run_dir/images/ab/ab12...ef.png       content-addressed PNGs (sha256 of the PNG bytes)

Why SQLite: a recipe runs for hours, calls paid APIs and may be killed at any moment. One SQLite file
gives atomic, durable commits (one transaction per change, `synchronous=FULL`, so a commit survives a
power cut, not only a killed process), lets `ledger stats` read while a recipe writes (WAL), and needs
no server. Images live next to it as files rather than blobs so that exports can copy them and users can
look at them; they are content-addressed, so the same image is stored once, and a rerun that
regenerates an image writes nothing new.

Nothing is ever removed: deleting a record marks it 'deleted' and logs who deleted it, in which round
and why, so the history of a dataset can be audited round by round (the `ops` table).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from ..errors import UserError, is_disk_full
from ..files import write_atomically
from .cache import CallCacheMixin, content_key, encode_png, from_json, is_text, utc_now, where_clause
from .history import describe_result
from .schema import MIGRATIONS, OLDEST_READABLE, SCHEMA, SCHEMA_TABLES_VERSION, SCHEMA_VERSION

Status = Literal["active", "deleted"]


@dataclass(frozen=True)
class Record:
    """One datum of the dataset: a prompt, usually an image, and where both came from.

    `image_path` is relative to the run folder (`Ledger.load_image` reads it). `round` and `op` say
    which step of which round created the record (`parent` is the record it was derived from, for
    mutations); the `deleted_*` fields say the same for its deletion.
    """

    id: int
    prompt: str
    spec: Any
    skills: tuple[str, ...]
    image_path: str | None
    generator: str
    seed: int | None
    status: Status
    round: int
    op: str
    parent: int | None
    reason: str | None
    judge: dict | None
    deleted_round: int | None
    deleted_op: str | None
    deleted_reason: str | None
    created_at: str

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Record:
        return cls(**{
            **dict(row),
            "spec": from_json(row["spec"]),
            "skills": tuple(json.loads(row["skills"])),
            "judge": from_json(row["judge"]),
        })


_SELECT_RECORDS = f"SELECT {', '.join(f.name for f in fields(Record))} FROM records"


@dataclass(frozen=True)
class Op:
    """One logged change: a record created (`op` is how), deleted, or given a judge result."""

    id: int
    round: int
    op: str
    record_id: int
    parent: int | None
    reason: str | None
    at: str


class Ledger(CallCacheMixin):
    """The dataset ledger of one run folder (created if missing, unless `create=False`).

    A new ledger's folder and file appear at its first read or write, not in the constructor; an
    existing file that is not a ledger of ours (not SQLite, or another program's database) is refused
    with a `UserError` naming it, and left as it was.

    Thread-safe: one SQLite connection behind a lock, so an async judge may record results from
    several worker threads. Use one `Ledger` per process; SQLite serialises writers of several processes
    but the call cache assumes that a 'pending' call of another process is a dead one.
    """

    def __init__(self, run_dir: str | os.PathLike, *, create: bool = True, read_only: bool = False):
        """`read_only`: for commands that only read (stats, export, a training set): opens a ledger in a folder
        this user may not write (a colleague's run), and never changes the file."""
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "ledger.sqlite"
        self.read_only = read_only
        self._lock = threading.RLock()
        self._depth = 0
        self._db: sqlite3.Connection | None = None
        self._closed = False
        if self.path.exists():
            self._connect()  # a file that is not a ledger is refused now, not at its first use
        elif not create or read_only:
            raise UserError(f"no ledger at {self.path}")
        # Otherwise the folder and file of the new ledger are made at its first use, so that a command
        # which fails its own checks first (an import of a folder with a bad row) leaves no empty ledger.

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opening (and creating) the ledger on first use."""
        with self._lock:
            if self._db is None:
                if self._closed:
                    raise sqlite3.ProgrammingError("Cannot operate on a closed ledger.")
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._connect()
            return self._db

    def _connect(self) -> None:
        """Open `self.path`; anything that is not one of our ledgers is refused (UserError), untouched.

        The file is identified with reads only, before anything writes to it: switching another
        program's database to WAL mode, or adding our tables to it, would change a file that is not ours.
        """
        if self.read_only:
            self._db = self._connect_read_only()
            return
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as e:
            raise UserError(f"cannot open {self.path} as a t2i-evolve ledger: {e}") from None
        try:
            self._identify(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            self._db = db
            self._migrate()
        except BaseException as e:
            db.close()
            self._db = None
            if isinstance(e, sqlite3.DatabaseError) and not is_disk_full(e):  # e.g. "file is not a database"
                raise UserError(f"cannot open {self.path} as a t2i-evolve ledger: {e}") from None
            raise

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that cannot write: shared with a run still writing where the folder lets SQLite keep its
        WAL index there; else (a folder we may not write) the file read as it is, which is the whole ledger once
        its run has closed it."""
        uri, error = self.path.resolve().as_uri(), None
        wal = self.path.with_name(self.path.name + "-wal")
        writable = os.access(self.run_dir, os.W_OK) and os.access(self.path, os.W_OK)
        # Where this user may write, a plain connection told to change nothing: it leaves the folder as it found
        # it (one opened `mode=ro` leaves its WAL index files behind in a folder that is not ours).
        for query in ("?mode=rw", "?mode=ro", "?mode=ro&immutable=1")[0 if writable else 1:]:
            if "immutable" in query and wal.is_file() and wal.stat().st_size:  # the file alone is not the whole ledger
                raise UserError(f"cannot open {self.path} to read it ({error}): its last writes are in {wal.name}, "
                                "which only a process that may write the folder can read (its run, still going or "
                                "killed; rerun it, or copy the folder somewhere writable)")
            db = sqlite3.connect(uri + query, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
            try:
                db.execute("PRAGMA query_only = ON")
                self._identify(db)
                version = db.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError as e:  # no WAL index it may make: try the file as it is
                db.close()
                error = e
                continue
            except BaseException as e:
                db.close()
                if isinstance(e, sqlite3.DatabaseError):
                    raise UserError(f"cannot open {self.path} as a t2i-evolve ledger: {e}") from None
                raise
            if not OLDEST_READABLE <= version <= SCHEMA_VERSION:
                db.close()
                raise UserError(f"{self.path} is empty, not a ledger yet" if version == 0 else
                                _newer_schema(self.path, version) if version > SCHEMA_VERSION else
                                f"{self.path} has schema version {version}; this t2i-evolve reads "
                                f"{OLDEST_READABLE} to {SCHEMA_VERSION} "
                                "(a command that writes the ledger, with write access, brings an older one up to date)")
            db.row_factory = sqlite3.Row
            return db
        raise UserError(f"cannot open {self.path} to read it: {error}")

    def _identify(self, db: sqlite3.Connection) -> None:
        """Raise UserError unless `db` is empty (a new ledger) or holds the tables of a ledger.

        A file that is not SQLite at all fails the first read here with `DatabaseError`.
        """
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and version == 0:
            return
        if version == 0 or not {"records", "ops", "calls"} <= tables:
            shown = ", ".join(sorted(tables)[:5]) or "none"
            raise UserError(
                f"{self.path} is an SQLite file of another program, not a t2i-evolve ledger "
                f"(tables: {shown}); move it away or use another run folder"
            )

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(_newer_schema(self.path, version))
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                version = SCHEMA_TABLES_VERSION
            for step in range(version, SCHEMA_VERSION):  # an older ledger, brought up to date in place
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group changes into one atomic commit: all of them survive a crash, or none does.

        Every public method that writes runs in its own transaction; inside this block they join the
        outer one instead (an import adds all its records or none). The call cache refuses to run inside
        one, since its intent must be committed before a call goes out.
        """
        with self._lock:
            db = self._connection()
            if self._depth:
                self._depth += 1
                try:
                    yield db
                finally:
                    self._depth -= 1
                return
            db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    # Images.

    def put_image(self, image: Image.Image) -> str:
        """Store an image as PNG and return its path relative to the run folder.

        Written with `write_atomically`, so a crash never leaves a half-written file under a final name.
        An image that is already stored is not rewritten.
        """
        data, digest = encode_png(image)
        rel_path = f"images/{digest[:2]}/{digest}.png"
        final = self.run_dir / rel_path
        if final.exists():
            return rel_path
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(final, data)
        return rel_path

    def load_image(self, rel_path: str) -> Image.Image:
        """Read a stored image fully into memory, as RGB (the file is closed on return)."""
        with Image.open(self.run_dir / rel_path) as image:
            return image.convert("RGB")

    # Records.

    def add_record(
        self,
        *,
        prompt: str,
        generator: str,
        seed: int | None = None,
        image: Image.Image | None = None,
        image_path: str | None = None,
        spec: Any = None,
        skills: Sequence[str] = (),
        round: int = 0,
        op: str = "seed",
        parent: int | None = None,
        reason: str | None = None,
        judge: Any = None,
    ) -> int:
        """Add a record and return its id; adding the same datum again returns the existing id.

        The same datum means the same generator, prompt, seed, round, op and image, so a round that is
        rerun after a crash finds its records instead of duplicating them (the image is part of the
        identity so that an import keeps two images captioned with the same prompt). `spec` and `judge`
        are stored as JSON (objects with a `to_json()` method are converted with it).
        """
        if image is not None and image_path is not None:
            raise ValueError("pass image or image_path, not both")
        if not is_text(prompt):
            raise UserError(f"the prompt {prompt!r} holds half a UTF-16 pair, which is not text")
        if image is not None:
            image_path = self.put_image(image)
        elif image_path is not None and not (self.run_dir / image_path).is_file():
            raise FileNotFoundError(f"no image at {self.run_dir / image_path}")
        seed = None if seed is None else int(seed)
        key = content_key([generator, prompt, seed, round, op, image_path])
        with self.transaction() as db:
            row = db.execute("SELECT id FROM records WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return row[0]
            record_id = db.execute(
                "INSERT INTO records (key, prompt, spec, skills, image_path, generator, seed, status, round, "
                "op, parent, reason, judge, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?)",
                (key, prompt, _dumps(spec), json.dumps(list(skills)), image_path, generator, seed,
                 round, op, parent, reason, _dumps(judge), utc_now()),
            ).lastrowid
            self._log(db, round, op, record_id, parent, reason)
            return record_id

    def delete_record(
        self, record_id: int, *, round: int, op: str = "delete", reason: str | None = None
    ) -> bool:
        """Mark a record deleted (it stays in the ledger). Returns False if it already was, so that a
        rerun of a round does not log the deletion twice."""
        with self.transaction() as db:
            if _column(db, record_id, "status") == "deleted":
                return False
            db.execute(
                "UPDATE records SET status = 'deleted', deleted_round = ?, deleted_op = ?, "
                "deleted_reason = ? WHERE id = ?",
                (round, op, reason, record_id),
            )
            self._log(db, round, op, record_id, None, reason)
            return True

    def set_judge(self, record_id: int, judge: Any, *, round: int | None = None) -> None:
        """Attach a judge result (a dict, or an `ImageScore`) to a record, replacing any earlier one.

        Logged as op 'judge' in `round` (by default the record's own round), the result's plain fields as its
        reason, so each round's verdict stays in the log (`ledger history`) after a later one replaces it on the
        record. Setting the same result again in the same round (a step rerun after a crash) changes nothing and
        logs nothing.
        """
        with self.transaction() as db:
            round = _column(db, record_id, "round") if round is None else round
            value = _dumps(judge)
            if _column(db, record_id, "judge") == value and db.execute(
                    "SELECT 1 FROM ops WHERE record_id = ? AND op = 'judge' AND round = ?", (record_id, round)).fetchone():
                return
            db.execute("UPDATE records SET judge = ? WHERE id = ?", (value, record_id))
            self._log(db, round, "judge", record_id, None, describe_result(judge))

    def record(self, record_id: int) -> Record:
        with self._read() as db:
            row = db.execute(f"{_SELECT_RECORDS} WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise KeyError(f"no record {record_id}")
        return Record._from_row(row)

    def has_record(self, record_id: int) -> bool:
        with self._read() as db:
            return db.execute("SELECT 1 FROM records WHERE id = ?", (record_id,)).fetchone() is not None

    def record_prompts(self) -> list[tuple[int, str]]:
        """(id, prompt) of every record, in id order: what finding a prompt needs, without decoding the rest."""
        with self._read() as db:
            return [tuple(row) for row in db.execute("SELECT id, prompt FROM records ORDER BY id")]

    def records(
        self, status: Status | None = "active", *, round: int | None = None, skill: str | None = None,
        parent: int | None = None,
    ) -> list[Record]:
        """Records in id order; `None` for a filter means any. `round` is the round that created them; `parent`
        the record they were derived from (its expansions and mutations)."""
        where, args = _record_filter(status, round, skill, parent)
        with self._read() as db:
            rows = db.execute(f"{_SELECT_RECORDS} {where} ORDER BY id", args).fetchall()
        return [Record._from_row(row) for row in rows]

    def prompts(self, *, since_round: int | None = None, before_round: int | None = None,
                ops: Sequence[str] | None = None) -> list[str]:
        """The prompts of the records (any status) of rounds `since_round` to `before_round` (excluded) made by `ops`,
        in id order: what a round reads of every record, without decoding each one (`records` at 100,000: 5 s)."""
        where, args = where_clause(("round >= ?", since_round), ("round < ?", before_round))
        if ops is not None:
            where = f"{where or 'WHERE 1'} AND op IN ({', '.join('?' * len(ops))})"
            args = [*args, *ops]
        with self._read() as db:
            return [row[0] for row in db.execute(f"SELECT prompt FROM records {where} ORDER BY id", args)]

    def count(
        self, status: Status | None = "active", *, round: int | None = None, skill: str | None = None
    ) -> int:
        where, args = _record_filter(status, round, skill)
        with self._read() as db:
            return db.execute(f"SELECT count(*) FROM records {where}", args).fetchone()[0]

    def ops(self, *, round: int | None = None, record_id: int | None = None) -> list[Op]:
        """The change log, oldest first: what each round did to which record, and why."""
        where, args = where_clause(("round = ?", round), ("record_id = ?", record_id))
        with self._read() as db:
            rows = db.execute(
                f"SELECT id, round, op, record_id, parent, reason, at FROM ops {where} ORDER BY id", args
            ).fetchall()
        return [Op(**dict(row)) for row in rows]

    def stats(self) -> dict:
        """A JSON-serialisable summary, for `t2i-evolve ledger stats RUN --json`.

        `ops` and `calls` are lists of rows rather than dicts keyed by round, so that rounds stay
        integers through a JSON round trip.
        """
        with self._read() as db:
            total, active = db.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'active') FROM records"
            ).fetchone()
            ops = db.execute(
                "SELECT round, op, count(*) FROM ops GROUP BY round, op ORDER BY round, op"
            ).fetchall()
            skills = db.execute(
                "SELECT s.value, r.status, count(*) FROM records r, json_each(r.skills) s "
                "GROUP BY s.value, r.status ORDER BY s.value"
            ).fetchall()
            generators = db.execute(
                "SELECT generator, status, count(*) FROM records "
                "GROUP BY generator, status ORDER BY generator"
            ).fetchall()
            calls = self._call_stats(db)
        return {
            "records": {"total": total, "active": active, "deleted": total - active},
            "ops": [{"round": r, "op": op, "count": n} for r, op, n in ops],
            "skills": _by_status(skills),
            "generators": _by_status(generators),
            "calls": calls,
            "interrupted_calls": sum(row["interrupted"] for row in calls),
        }

    @staticmethod
    def _log(
        db: sqlite3.Connection, round: int, op: str, record_id: int, parent: int | None, reason: str | None
    ) -> None:
        db.execute(
            "INSERT INTO ops (round, op, record_id, parent, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
            (round, op, record_id, parent, reason, utc_now()),
        )


def _column(db: sqlite3.Connection, record_id: int, column: str) -> Any:
    row = db.execute(f"SELECT {column} FROM records WHERE id = ?", (record_id,)).fetchone()
    if row is None:
        raise KeyError(f"no record {record_id}")
    return row[0]


def _record_filter(status: str | None, round: int | None, skill: str | None, parent: int | None = None
                   ) -> tuple[str, list]:
    return where_clause(
        ("status = ?", status),
        ("round = ?", round),
        ("EXISTS (SELECT 1 FROM json_each(records.skills) WHERE value = ?)", skill),
        ("parent = ?", parent),
    )


def _by_status(rows: list[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, status, n in rows:
        counts.setdefault(name, {"active": 0, "deleted": 0})[status] = n
    return counts


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "to_json"):
        value = value.to_json()
    return json.dumps(value, ensure_ascii=False)


def _newer_schema(path: Path, version: int) -> str:
    return (f"{path} was written by a newer t2i-evolve (ledger schema {version}; this one reads up to "
            f"{SCHEMA_VERSION}): upgrade t2i-evolve to open it (git pull in its checkout, or pip install -U "
            "t2i-evolve); the file is left as it is")


def damaged_ledger(error: BaseException) -> Path | None:
    """The ledger file that `error` says is damaged, or None for any other error: SQLite's "database disk image is
    malformed" past the header that opening checks, a row whose JSON does not parse. The file is named by the
    `Ledger` whose method was reading it (found in the traceback); `ledger.sqlite` where none was."""
    malformed_json = isinstance(error, sqlite3.OperationalError) and "malformed JSON" in str(error)  # (SQL json_*)
    damaged = isinstance(error, json.JSONDecodeError) or malformed_json or isinstance(error, sqlite3.DatabaseError) \
        and not isinstance(error, (sqlite3.OperationalError, sqlite3.IntegrityError, sqlite3.ProgrammingError))
    if not damaged or is_disk_full(error):
        return None
    path, sending, tb = None, False, error.__traceback__
    while tb is not None:  # (the innermost Ledger method: one reading its file, or `_send`, calling a teacher or judge)
        if isinstance(owner := tb.tb_frame.f_locals.get("self"), Ledger):
            path, sending = owner.path, tb.tb_frame.f_code.co_name == "_send"
        tb = tb.tb_next
    if sending or path is None and isinstance(error, json.JSONDecodeError):  # not a ledger's row: a reply, a bug
        return None
    return path or Path("ledger.sqlite")
