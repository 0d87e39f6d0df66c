"""What planning one chunk of teacher draws costs as a run's ledger grows (`CallBudgets`, t2i_evolve/data/budgets.py).

Before each chunk of draws (256 prompts in the seed set; every expansion) the evolve loop asks what the caps still
allow (`draws_that_fit`), how many first tries the chunk sends (`first_tries`), and what a round started with
(`teacher_budget_left`). At EvolveDirector's scale (about 100,000 teacher images) a ledger holds that many calls;
this times the three questions against ledgers of several sizes, built directly in SQLite (no images drawn).

    python benchmarks/budget_planning.py [--calls 1000,10000,100000] [--chunk 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from t2i_evolve.data import CachedGenerator, CallBudgets, Ledger
from t2i_evolve.data.cache import content_key, utc_now


class _Teacher:
    """A stand-in generator: only its id and price are read while planning."""

    id = "strong"
    price_per_call = 0.0


def ledger_with_calls(folder: Path, n: int) -> Ledger:
    """A ledger holding `n` answered teacher calls, 1,000 a round."""
    ledger, now = Ledger(folder), utc_now()
    rows = [(content_key([_Teacher.id, {"prompt": f"p{i}", "seed": i}]), _Teacher.id,
             json.dumps({"prompt": f"p{i}", "seed": i}), "done", json.dumps({"image": "x"}), 1, 0.0, i // 1000, now, now)
            for i in range(n)]
    with ledger.transaction() as db:
        db.executemany("INSERT INTO calls (key, caller, request, status, response, attempts, price, round, created_at, "
                       "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return ledger


def timed(question) -> float:
    started = time.perf_counter()
    question()
    return time.perf_counter() - started


def measure(n: int, chunk: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, ledger_with_calls(Path(tmp), n) as ledger:
        budgets = CallBudgets(ledger, {_Teacher.id: CachedGenerator(_Teacher(), ledger)}, "pixel",
                              max_teacher_calls=10**9)
        # half the chunk drawn before (a rerun after a crash), half new
        prompts = [f"p{i}" for i in range(chunk // 2)] + [f"new{i}" for i in range(chunk - chunk // 2)]
        seeds, ids = list(range(chunk)), [_Teacher.id] * chunk
        return {"calls": n,
                "draws_that_fit_s": timed(lambda: budgets.draws_that_fit(prompts, seeds, ids)),
                "first_tries_s": timed(lambda: budgets.first_tries(prompts, seeds, ids)),
                "teacher_budget_left_s": timed(lambda: budgets.teacher_budget_left(before_round=n // 2000))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="1000,10000,100000", help="Ledger sizes (calls), comma-separated.")
    parser.add_argument("--chunk", type=int, default=256, help="Draws planned at once.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line.")
    args = parser.parse_args()
    rows = [measure(int(n), args.chunk) for n in args.calls.split(",")]
    if args.json:
        print(json.dumps({"chunk": args.chunk, "rows": rows}))
        return
    columns = ["calls in the ledger", f"draws_that_fit ({args.chunk})", "first_tries", "teacher_budget_left"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        timings = [f"{row[key]:.3f} s" for key in ("draws_that_fit_s", "first_tries_s", "teacher_budget_left_s")]
        print("| " + " | ".join([f"{row['calls']:,}", *timings]) + " |")


if __name__ == "__main__":
    main()
