"""The ledger's SQLite schema, and the migrations that bring an older ledger up to date in place."""

SCHEMA_VERSION = 3
OLDEST_READABLE = 2  # (a read-only command reads a version-2 ledger as it is: what 3 adds only speeds up writing)

SCHEMA = """
CREATE TABLE records (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    spec TEXT,
    skills TEXT NOT NULL,
    image_path TEXT,
    generator TEXT NOT NULL,
    seed INTEGER,
    status TEXT NOT NULL CHECK (status IN ('active', 'deleted')),
    round INTEGER NOT NULL,
    op TEXT NOT NULL,
    parent INTEGER REFERENCES records(id),
    reason TEXT,
    judge TEXT,
    deleted_round INTEGER,
    deleted_op TEXT,
    deleted_reason TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX records_round ON records(round);
CREATE TABLE ops (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    op TEXT NOT NULL,
    record_id INTEGER NOT NULL REFERENCES records(id),
    parent INTEGER,
    reason TEXT,
    at TEXT NOT NULL
);
CREATE INDEX ops_round ON ops(round);
CREATE TABLE calls (
    key TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    response TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    price REAL NOT NULL DEFAULT 0,
    round INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    ask_again INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX calls_caller ON calls(caller);
"""

SCHEMA_TABLES_VERSION = 2  # what `SCHEMA` makes; the migrations after it bring a new ledger up to date

_ADD_TO_TOTALS = """INSERT INTO call_totals (caller, attempts, price) VALUES (NEW.caller, NEW.attempts, NEW.price)
    ON CONFLICT (caller) DO UPDATE SET attempts = attempts + excluded.attempts, price = price + excluded.price;"""
_TAKE_FROM_TOTALS = """UPDATE call_totals SET attempts = attempts - OLD.attempts, price = price - OLD.price
    WHERE caller = OLD.caller;"""

MIGRATIONS = {  # version -> the statements that bring a ledger of that version to the next
    1: ["ALTER TABLE calls ADD COLUMN ask_again INTEGER NOT NULL DEFAULT 0",  # (version 1 said it in the error text)
        "UPDATE calls SET ask_again = 1 WHERE status = 'failed' AND error LIKE '%not retried: the budget is spent'"],
    # Each caller's requests sent and price paid, kept by SQLite as calls change: a budget's check before each batch
    # of calls read every call of its caller (0.13 s at 300,000 judge calls, twice a call); and the ops of a record
    # (a verdict's repeat check scanned its round's ops).
    2: ["CREATE INDEX ops_record ON ops(record_id)",
        "CREATE TABLE call_totals (caller TEXT PRIMARY KEY, attempts INTEGER NOT NULL, price REAL NOT NULL)",
        "INSERT INTO call_totals SELECT caller, sum(attempts), sum(price) FROM calls GROUP BY caller",
        f"CREATE TRIGGER calls_added AFTER INSERT ON calls BEGIN {_ADD_TO_TOTALS} END",
        f"CREATE TRIGGER calls_changed AFTER UPDATE OF caller, attempts, price ON calls BEGIN {_TAKE_FROM_TOTALS} "
        f"{_ADD_TO_TOTALS} END",
        f"CREATE TRIGGER calls_removed AFTER DELETE ON calls BEGIN {_TAKE_FROM_TOTALS} END"],
}
