"""The dataset ledger, the call cache and imagefolder export/import."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from t2i_evolve.data import CachedGenerator, CachedJudge, CallBudget, Ledger
from t2i_evolve.data.cache import content_key
from t2i_evolve.data.imagefolder import ImportResult, export_imagefolder, import_imagefolder
from t2i_evolve.errors import BudgetExhausted, CallTimeout, EndpointError, TransientError, UserError
from t2i_evolve.protocols import Answer, Comparison, Generator, ImageScore, Judge, Question


def solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "run") as ledger:
        yield ledger


class ColorGenerator:
    """Renders a colour from (prompt, seed); can fail the first `failures` calls; logs each batch."""

    id = "color-gen"

    def __init__(self, failures: int = 0, error: type[Exception] = TransientError, price_per_call: float = 0):
        self.failures = failures
        self.error = error
        self.price_per_call = price_per_call
        self.batches: list[list[tuple[str, int]]] = []

    def generate(self, prompts, seeds):
        self.batches.append(list(zip(prompts, seeds)))
        if self.failures:
            self.failures -= 1
            raise self.error("server busy")
        return [self.render(p, s) for p, s in zip(prompts, seeds)]

    @staticmethod
    def render(prompt: str, seed: int) -> Image.Image:
        return solid((len(prompt) * 10 % 256, seed % 256, 7))


class CountingJudge:
    id = "counting-judge"
    price_per_call = 0.5

    def __init__(self):
        self.calls = 0

    def answer(self, image, prompt, questions):
        self.calls += 1
        return [i % 2 == 0 for i, _ in enumerate(questions)]

    def score(self, image, prompt):
        self.calls += 1
        circle, big = Question("a red circle?", "color"), Question("is it big?", "size", parents=(0,))
        return ImageScore(0.5, (Answer(circle, True), Answer(big, False)))

    def compare(self, image_a, image_b, prompt):
        self.calls += 1
        return Comparison("b", 0.25, 0.75)


# Records.


def test_records_round_trip(ledger):
    spec = {"objects": [{"shape": "circle", "color": "red"}]}
    rid = ledger.add_record(
        prompt="a red circle", generator="teacher", seed=3, image=solid((255, 0, 0)), spec=spec,
        skills=("color", "shape"), round=1, op="expand", reason="new skill",
    )
    record = ledger.record(rid)
    assert (record.prompt, record.generator, record.seed, record.round, record.op) == (
        "a red circle", "teacher", 3, 1, "expand"
    )
    assert record.spec == spec
    assert record.skills == ("color", "shape")
    assert record.status == "active" and record.reason == "new skill"
    assert (pixels(ledger.load_image(record.image_path)) == [255, 0, 0]).all()
    assert ledger.load_image(record.image_path).size == (8, 6)

    other = ledger.add_record(prompt="two squares", generator="teacher", seed=4, skills=("count",))
    assert ledger.record(other).image_path is None
    assert [r.id for r in ledger.records(skill="color")] == [rid]
    assert [r.id for r in ledger.records(round=0)] == [other]
    assert ledger.count() == 2 and ledger.count(skill="count") == 1
    with pytest.raises(KeyError):
        ledger.record(999)


def test_add_record_is_idempotent(ledger):
    def add(seed: int, round: int = 0) -> int:
        image = solid((255, 0, 0))
        return ledger.add_record(prompt="red", generator="teacher", seed=seed, round=round, image=image)

    first, again, other_seed, next_round = add(1), add(1), add(2), add(1, round=1)
    assert first == again
    assert len({first, other_seed, next_round}) == 3
    assert ledger.count() == 3
    assert len(ledger.ops()) == 3


def test_images_are_content_addressed(ledger):
    path = ledger.put_image(solid((1, 2, 3)))
    assert ledger.put_image(solid((1, 2, 3)).convert("RGBA")) == path
    assert path.startswith("images/") and path.endswith(".png")
    files = [p for p in (ledger.run_dir / "images").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parent.name == files[0].name[:2]


def test_delete_record_logs_ops(ledger):
    parent = ledger.add_record(prompt="a red circle", generator="teacher", seed=1)
    child = ledger.add_record(prompt="blue", generator="teacher", seed=1, round=1, op="mutate", parent=parent)
    assert ledger.delete_record(parent, round=2, op="judge-filter", reason="score 0.2")
    assert not ledger.delete_record(parent, round=3)

    record = ledger.record(parent)
    assert (record.status, record.deleted_round, record.deleted_op, record.deleted_reason) == (
        "deleted", 2, "judge-filter", "score 0.2"
    )
    assert [r.id for r in ledger.records()] == [child]
    assert [r.id for r in ledger.records("deleted")] == [parent]
    assert len(ledger.records(None)) == 2
    assert [(o.round, o.op, o.record_id, o.parent) for o in ledger.ops()] == [
        (0, "seed", parent, None), (1, "mutate", child, parent), (2, "judge-filter", parent, None)
    ]
    assert [o.reason for o in ledger.ops(round=2)] == ["score 0.2"]
    assert ledger.add_record(prompt="a red circle", generator="teacher", seed=1) == parent
    assert ledger.record(parent).status == "deleted"


def test_set_judge(ledger):
    rid = ledger.add_record(prompt="a red circle", generator="teacher", seed=1, round=2)
    ledger.set_judge(rid, CountingJudge().score(None, "a red circle"))
    judge = ledger.record(rid).judge
    assert judge["score"] == 0.5 and judge["answers"][1]["parents"] == [0]
    assert [(o.round, o.op) for o in ledger.ops(record_id=rid)] == [(2, "seed"), (2, "judge")]


def test_stats(ledger):
    gen = CachedGenerator(ColorGenerator(price_per_call=0.25), ledger, backoff_s=0, round=0)
    images = gen.generate(["a", "bb"], [1, 2])
    ids = [
        ledger.add_record(prompt=p, generator=gen.id, seed=s, image=im, skills=sk)
        for p, s, im, sk in zip(["a", "bb"], [1, 2], images, [("color",), ("color", "count")])
    ]
    ledger.add_record(prompt="ccc", generator="other", round=1, op="expand", skills=("count",))
    ledger.delete_record(ids[0], round=1, reason="bad")
    flaky = CachedGenerator(ColorGenerator(failures=99), ledger, retries=1, backoff_s=0, round=1)
    assert flaky.generate(["d"], [4]) == [None]

    stats = ledger.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["records"] == {"total": 3, "active": 2, "deleted": 1}
    assert stats["ops"] == [
        {"round": 0, "op": "seed", "count": 2},
        {"round": 1, "op": "delete", "count": 1},
        {"round": 1, "op": "expand", "count": 1},
    ]
    assert stats["skills"] == {"color": {"active": 1, "deleted": 1}, "count": {"active": 2, "deleted": 0}}
    assert stats["generators"] == {
        "color-gen": {"active": 1, "deleted": 1}, "other": {"active": 1, "deleted": 0}
    }
    assert stats["calls"] == [
        {"caller": "color-gen", "round": 0, "done": 2, "failed": 0, "pending": 0, "attempts": 2,
         "interrupted": 0, "price": 0.5},
        {"caller": "color-gen", "round": 1, "done": 0, "failed": 1, "pending": 0, "attempts": 2,
         "interrupted": 0, "price": 0.0},
    ]


def test_transaction_commits_all_or_nothing(ledger):
    with pytest.raises(RuntimeError, match="boom"), ledger.transaction():
        ledger.add_record(prompt="a", generator="teacher")
        ledger.add_record(prompt="b", generator="teacher")
        raise RuntimeError("boom")
    assert ledger.count(None) == 0 and ledger.ops() == []
    with ledger.transaction():
        ledger.add_record(prompt="a", generator="teacher")
        with pytest.raises(RuntimeError, match="inside Ledger.transaction"):
            ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1})
    assert ledger.count() == 1


def test_a_version_1_ledger_is_brought_up_to_date_and_keeps_what_it_meant(tmp_path):
    """Version 1 said in a failure's error text that a rerun asks it again (a retry the budget did not pay for);
    version 2 says it in `ask_again`. Opened by this version, the old ledger gets the column, and the same
    failures are asked again; the others stay the answer a rerun gets."""
    with Ledger(tmp_path) as ledger:
        ledger.cached_call("api", {"q": 0}, lambda: {"ok": 0})
    as_version_2(tmp_path)
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.execute("ALTER TABLE calls DROP COLUMN ask_again")  # as version 1 wrote it
    for q, error in ((1, "TransientError: busy; not retried: the budget is spent"), (2, "RequestRefused: HTTP 400")):
        db.execute("INSERT INTO calls (key, caller, request, status, error, attempts, created_at, updated_at) "
                   "VALUES (?, 'api', ?, 'failed', ?, 1, '', '')", (content_key(["api", {"q": q}]), f'{{"q": {q}}}', error))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Ledger(tmp_path) as ledger:
        assert [(call.request["q"], call.settled) for call in ledger.calls()] == [(0, True), (1, False), (2, True)]
        assert ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1}, backoff_s=0) == {"ok": 1}
        assert ledger.cached_call("api", {"q": 2}, lambda: {"ok": 2}, backoff_s=0) is None  # refused: final
    assert sqlite3.connect(tmp_path / "ledger.sqlite").execute("PRAGMA user_version").fetchone()[0] == 3


def as_version_2(folder) -> None:
    """Take from a ledger what version 3 added: each caller's totals (a table kept by triggers), an index of ops."""
    with sqlite3.connect(folder / "ledger.sqlite") as db:
        for statement in ("DROP TRIGGER calls_added", "DROP TRIGGER calls_changed", "DROP TRIGGER calls_removed",
                          "DROP TABLE call_totals", "DROP INDEX ops_record", "PRAGMA user_version = 2"):
            db.execute(statement)
    db.close()


def test_schema_version_and_reopen(tmp_path):
    with Ledger(tmp_path / "run") as ledger:
        rid = ledger.add_record(prompt="a red circle", generator="teacher")
    db = sqlite3.connect(tmp_path / "run" / "ledger.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Ledger(tmp_path / "run") as ledger:
        assert ledger.record(rid).prompt == "a red circle"
    db.execute("PRAGMA user_version = 99")
    db.close()
    before = (tmp_path / "run" / "ledger.sqlite").read_bytes()
    for read_only in (False, True):  # (said the same way by a command that reads it and one that writes it)
        with pytest.raises(UserError, match="written by a newer t2i-evolve \\(ledger schema 99; .*upgrade t2i-evolve"):
            Ledger(tmp_path / "run", read_only=read_only)
    assert (tmp_path / "run" / "ledger.sqlite").read_bytes() == before
    with pytest.raises(UserError, match="no ledger"):
        Ledger(tmp_path / "elsewhere", create=False)


# The call cache.


def test_cached_call_never_calls_twice(ledger):
    calls = []

    def call():
        calls.append(1)
        return {"answer": 42}

    assert ledger.cached_call("api", {"q": 1, "opts": {"b": 2, "a": 1}}, call) == {"answer": 42}
    assert ledger.cached_call("api", {"opts": {"a": 1, "b": 2}, "q": 1}, call) == {"answer": 42}
    assert len(calls) == 1
    ledger.cached_call("other-api", {"q": 1, "opts": {"b": 2, "a": 1}}, call)
    assert len(calls) == 2


def test_transient_errors_are_retried_and_counted(ledger):
    failures = [TransientError("429"), CallTimeout("slow")]

    def call():
        if failures:
            raise failures.pop(0)
        return {"ok": True}

    assert ledger.cached_call("api", {"q": 1}, call, retries=2, backoff_s=0, price=0.1) == {"ok": True}
    [row] = ledger.calls()
    assert (row.status, row.attempts, row.price, row.response) == ("done", 3, 0.1, {"ok": True})


def test_an_item_that_timed_out_is_retried_alone_and_one_refused_is_not(ledger):
    """A batch's per-item outcomes: a `CallTimeout` (a `TransientError`) is sent again, a refusal fails for good."""
    from t2i_evolve.errors import RequestRefused

    sent = []

    def batch(requests):
        sent.extend(r["q"] for r in requests)
        first = len(sent) <= 3
        return [CallTimeout("slow") if r["q"] == 1 and first else RequestRefused("HTTP 400") if r["q"] == 2
                else {"ok": r["q"]} for r in requests]

    assert ledger.cached_calls("api", [{"q": 0}, {"q": 1}, {"q": 2}], batch, backoff_s=0) == [{"ok": 0}, {"ok": 1}, None]
    assert sent == [0, 1, 2, 1]


def test_a_failure_is_the_answer_until_it_is_asked_again(ledger):
    """Retries spent, the failure is kept and is what a rerun gets, without sending (a rerun after a crash
    pays nothing twice and ends as the first run did); `ask_failed_calls_again` makes it askable again, and
    the requests it sent still count against a budget."""
    def fail():
        raise TransientError("503 from server")

    assert ledger.cached_call("api", {"q": 1}, fail, retries=2, backoff_s=0) is None
    [row] = ledger.calls()
    assert (row.status, row.attempts) == ("failed", 3)
    assert "503 from server" in row.error
    sent = []
    assert ledger.cached_call("api", {"q": 1}, lambda: sent.append(1) or {"ok": 1}, backoff_s=0) is None and not sent
    assert ledger.ask_failed_calls_again(["other"]) == 0 and ledger.ask_failed_calls_again(["api"], round=3) == 0
    assert ledger.ask_failed_calls_again(["api"]) == 1 and ledger.ask_failed_calls_again(["api"]) == 0
    with pytest.raises(BudgetExhausted):  # its 3 requests were sent: a cap of 3 has no room for a 4th
        ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1}, backoff_s=0, budget=CallBudget(max_calls=3))
    assert ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1}, backoff_s=0) == {"ok": 1}
    [row] = ledger.calls()
    assert (row.status, row.attempts, row.error) == ("done", 4, None)


def test_a_call_in_flight_when_the_run_stops_at_an_error_is_asked_again_by_the_rerun(ledger):
    """An error the run cannot go on after (a bad key, a full GPU) stops it; the requests it was sending are
    not answers, so the rerun after the fix sends them instead of skipping them for good."""
    def bad_key(requests):
        raise EndpointError("HTTP 401: invalid API key")

    with pytest.raises(EndpointError):
        ledger.cached_calls("api", [{"q": 1}, {"q": 2}], bad_key, backoff_s=0)
    assert [row.status for row in ledger.calls()] == ["failed", "failed"]
    assert ledger.cached_calls("api", [{"q": 1}, {"q": 2}], lambda rs: [{"a": r["q"]} for r in rs]) == [{"a": 1}, {"a": 2}]


def test_non_transient_errors_propagate(ledger):
    def broken():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        ledger.cached_call("api", {"q": 1}, broken, backoff_s=0)
    [row] = ledger.calls()
    assert row.status == "failed" and "bug" in row.error and row.attempts == 1


def test_pending_call_counts_as_interrupted(ledger):
    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ledger.cached_call("api", {"q": 1}, killed)
    assert ledger.calls()[0].status == "pending"
    assert ledger.interrupted_calls() == 0
    assert ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1}) == {"ok": 1}
    assert ledger.interrupted_calls() == 1
    assert ledger.stats()["interrupted_calls"] == 1


def test_budget_stops_new_calls_but_not_cached_ones(ledger):
    budget = CallBudget(max_calls=2)
    for q in (1, 2):
        ledger.cached_call("api", {"q": q}, lambda: {"ok": 1}, budget=budget)
    with pytest.raises(BudgetExhausted, match="2 calls"):
        ledger.cached_call("api", {"q": 3}, lambda: {"ok": 1}, budget=budget)
    assert ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1}, budget=budget) == {"ok": 1}
    assert ledger.cached_call("other", {"q": 3}, lambda: {"ok": 1}, budget=budget) == {"ok": 1}

    by_price = CallBudget(max_price=1.0)
    for q in (1, 2):
        ledger.cached_call("paid", {"q": q}, lambda: {"ok": 1}, price=0.5, budget=by_price)
    with pytest.raises(BudgetExhausted):
        ledger.cached_call("paid", {"q": 3}, lambda: {"ok": 1}, price=0.5, budget=by_price)


def test_call_totals_sum_what_each_caller_sent_and_paid_by_round(ledger):
    """Summed in SQLite (each planned chunk read every call of a run before): the same sums as the rows give."""
    import itertools

    flaky = itertools.cycle([TransientError("503"), None])

    def answer_after_one_retry(requests):
        return [next(flaky) or {"ok": 1} for _ in requests]

    for round, (caller, price) in itertools.product((1, 2, None), (("a", 0.5), ("b", 0.25), ("judge", 0.0))):
        ledger.cached_calls(caller, [{"q": round, "i": i} for i in range(3)], answer_after_one_retry, price=price,
                            round=round, backoff_s=0)
    for callers, before_round in ((["a"], None), (["a", "b"], None), (["a", "b"], 2), (["judge"], 3), (["none"], None)):
        rows = [c for c in ledger.calls() if c.caller in callers
                and (before_round is None or c.round is not None and c.round < before_round)]
        sent, paid = ledger.call_totals(callers, before_round)
        assert (sent, paid) == (sum(c.attempts for c in rows), pytest.approx(sum(c.price for c in rows)))
    assert ledger.call_totals(["a"]) == (18, pytest.approx(9 * 0.5))  # 3 rounds x 3 calls, each sent twice, paid once


def test_a_version_2_ledger_is_read_as_it_is_and_brought_up_to_date_by_a_writer(tmp_path):
    """Version 3 keeps each caller's totals in a table (triggers on `calls`): a run's budget check read every call of
    its caller before each batch. A version-2 ledger is read by `ledger stats` untouched, and gets the table, with
    the totals of the calls it holds, when a command that writes opens it."""
    with Ledger(tmp_path) as ledger:
        for q in range(3):
            ledger.cached_call("api", {"q": q}, lambda: {"ok": 1}, price=0.25)
    as_version_2(tmp_path)
    before = (tmp_path / "ledger.sqlite").read_bytes()
    with Ledger(tmp_path, read_only=True) as ledger:
        assert ledger.call_totals(["api"]) == (3, 0.75) and ledger.stats()["records"]["total"] == 0
    assert (tmp_path / "ledger.sqlite").read_bytes() == before
    with Ledger(tmp_path) as ledger:
        assert ledger.call_totals(["api"]) == (3, 0.75)
        ledger.cached_call("api", {"q": 3}, lambda: {"ok": 1}, price=0.25)
        with pytest.raises(BudgetExhausted, match="4 calls sent, price 1"):
            ledger.cached_call("api", {"q": 4}, lambda: {"ok": 1}, budget=CallBudget(max_price=1.0), price=0.25)
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert db.execute("SELECT attempts, price FROM call_totals").fetchall() == [(4, 1.0)]
    db.close()


def test_budget_survives_a_restart(tmp_path):
    with Ledger(tmp_path) as ledger:
        ledger.cached_call("api", {"q": 1}, lambda: {"ok": 1})
    with Ledger(tmp_path) as ledger, pytest.raises(BudgetExhausted):
        ledger.cached_call("api", {"q": 2}, lambda: {"ok": 1}, budget=CallBudget(max_calls=1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_calls_sent_again_after_a_crash_count_once_against_the_budget(tmp_path, batch_size):
    """Four calls in flight when the process died (`KeyboardInterrupt` leaves them as SIGKILL does), under a cap
    of six: the rerun sends the four again counted once, as the uninterrupted run did, and still buys two more;
    a price cap pays for each on its answer, so it holds them all."""
    def interrupted(requests):
        raise KeyboardInterrupt

    def answer(requests):
        return [{"ok": r["q"]} for r in requests]

    with Ledger(tmp_path / "calls") as ledger:
        with pytest.raises(KeyboardInterrupt):
            ledger.cached_calls("api", [{"q": q} for q in range(4)], interrupted, batch_size=4)
        assert ledger.call_totals(["api"])[0] == 4
        budget = CallBudget(max_calls=6)
        assert ledger.cached_calls("api", [{"q": q} for q in range(6)], answer, batch_size=batch_size,
                                   budget=budget) == [{"ok": q} for q in range(6)]
        assert ledger.call_totals(["api"])[0] == 6 and ledger.interrupted_calls() == 4
        with pytest.raises(BudgetExhausted, match="6 calls sent"):
            ledger.cached_call("api", {"q": 6}, lambda: {"ok": 6}, budget=budget)
    with Ledger(tmp_path / "priced") as ledger:
        with pytest.raises(KeyboardInterrupt):
            ledger.cached_calls("api", [{"q": q} for q in range(4)], interrupted, batch_size=4, price=0.5)
        budget = CallBudget(max_price=1.0)  # (nothing answered yet: nothing paid)
        with pytest.raises(BudgetExhausted, match="price 1 "):
            ledger.cached_calls("api", [{"q": q} for q in range(4)], answer, price=0.5, budget=budget,
                                batch_size=batch_size)
        assert [c.status for c in ledger.calls()] == ["done", "done", "pending", "pending"]


def test_concurrent_identical_calls_are_sent_once(ledger):
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)
        return {"ok": 1}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ledger.cached_call("api", {"q": 1}, slow), range(4)))
    assert results == [{"ok": 1}] * 4
    assert len(calls) == 1 and ledger.interrupted_calls() == 0


def test_a_price_cap_holds_for_threads_sending_at_once(ledger):
    """A price is known once a call is answered: four threads each sending one call of price 1 under a cap of 2
    send two, not four (each checked the cap while the others were still in flight)."""
    sent = []

    def paid(q):
        def call():
            sent.append(q)
            time.sleep(0.05)
            return {"ok": q}
        try:
            return ledger.cached_call("api", {"q": q}, call, price=1.0, budget=CallBudget(max_price=2.0))
        except BudgetExhausted:
            return None

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(paid, range(4)))
    assert len(sent) == 2 and sum(r is not None for r in results) == 2
    assert sum(call.price for call in ledger.calls()) == 2.0


def test_cached_generator_batches_and_caches(ledger):
    teacher = ColorGenerator()
    gen = CachedGenerator(teacher, ledger, batch_size=2, backoff_s=0)
    assert isinstance(gen, Generator) and gen.id == teacher.id
    prompts, seeds = ["a", "bb", "ccc", "a"], [1, 2, 3, 1]
    images = gen.generate(prompts, seeds)
    assert [len(b) for b in teacher.batches] == [2, 1]
    for image, prompt, seed in zip(images, prompts, seeds):
        assert (pixels(image) == pixels(teacher.render(prompt, seed))).all()

    again = gen.generate(["ccc", "dddd"], [3, 4])
    assert teacher.batches[-1] == [("dddd", 4)]
    assert (pixels(again[0]) == pixels(images[2])).all()
    assert {c.response["image"] for c in ledger.calls()} == {ledger.put_image(im) for im in images + again}


def test_cached_generator_retries_and_gives_none(ledger):
    teacher = ColorGenerator(failures=1, error=CallTimeout)
    images = CachedGenerator(teacher, ledger, backoff_s=0).generate(["a"], [1])
    assert images[0] is not None and len(teacher.batches) == 2

    dead = ColorGenerator(failures=10)
    gen = CachedGenerator(dead, ledger, retries=2, backoff_s=0)
    assert gen.generate(["zz", "a"], [9, 1])[0] is None
    assert len(dead.batches) == 3


def test_cached_generator_budget_fills_up_to_the_limit(ledger):
    teacher = ColorGenerator(price_per_call=1.0)
    gen = CachedGenerator(teacher, ledger, batch_size=4, backoff_s=0, budget=CallBudget(max_price=3.0))
    with pytest.raises(BudgetExhausted):
        gen.generate(["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5])
    assert [len(b) for b in teacher.batches] == [3]
    assert len(gen.generate(["a", "b", "c"], [1, 2, 3])) == 3


def test_retries_stay_within_a_shared_cap_and_leave_room_for_first_tries(ledger):
    """Two teachers under one cap of 6 calls: the first's batch of 4 fails once (4 calls); its retries keep
    room for the 2 first tries that the second teacher will send (`reserve`), so none is retried and
    the second teacher's batch is sent; nothing raises, no call passes the cap, the failure says why."""
    budget = CallBudget(max_calls=6, callers=("color-gen", "other-gen"))
    first = CachedGenerator(ColorGenerator(failures=1), ledger, backoff_s=0, budget=budget)
    other_teacher = ColorGenerator()
    other_teacher.id = "other-gen"
    other = CachedGenerator(other_teacher, ledger, backoff_s=0, budget=budget)
    assert first.generate(["a", "b", "c", "d"], [1, 2, 3, 4], reserve=2) == [None] * 4
    assert all(image is not None for image in other.generate(["a", "b"], [1, 2]))
    assert sum(call.attempts for call in ledger.calls()) == 6
    assert {call.error for call in ledger.calls(status="failed")} == {
        "TransientError: server busy; not retried: the budget is spent"}
    with pytest.raises(BudgetExhausted, match="color-gen \\+ other-gen"):  # a first try past the cap is refused
        first.generate(["e"], [5])

    alone = ColorGenerator(failures=1)
    alone.id = "alone"  # its own cap of 8: the batch of 4 and its 4 retries fit, and it is all drawn
    images = CachedGenerator(alone, ledger, backoff_s=0, budget=CallBudget(max_calls=8)).generate(["a", "b", "c", "d"],
                                                                                            [1, 2, 3, 4])
    assert all(image is not None for image in images) and sum(c.attempts for c in ledger.calls(caller="alone")) == 8


def test_draws_drawn_before_fit_past_a_draw_that_does_not(ledger):
    """A rerun after a crash at the cap: the draw that failed there is new and does not fit, but the draws after
    it were paid for and still fit (counting them out would lose what the first run bought)."""
    from t2i_evolve.data import CallBudgets

    teacher = CachedGenerator(ColorGenerator(), ledger, backoff_s=0)
    teacher.generate(["a", "c", "d"], [1, 3, 4])
    spent = CallBudgets(ledger, {teacher.id: teacher}, "judge", max_teacher_calls=4)
    assert spent.draws_that_fit(["a", "b", "x", "c", "d"], [1, 2, 9, 3, 4], None) == [0, 1, 3, 4]
    assert spent.draws_that_fit(["x", "c"], [9, 3], [teacher.id] * 2) == [0, 1]
    full = CallBudgets(ledger, {teacher.id: teacher}, "judge", max_teacher_calls=3)
    assert full.draws_that_fit(["b", "d"], [2, 4], None) == [1]
    with pytest.raises(BudgetExhausted, match="teacher budget spent: 3 calls"):
        full.draws_that_fit(["b"], [2], None)


def test_cached_judge_serves_repeats_from_cache(ledger):
    judge = CountingJudge()
    cached = CachedJudge(judge, ledger, backoff_s=0)
    assert isinstance(cached, Judge)
    image, other = solid((255, 0, 0)), solid((0, 0, 255))
    questions = [Question("is there a circle?", "shape"), Question("is it red?", "color", parents=(0,))]

    def ask(image):
        return (
            cached.answer(image, "a red circle", questions),
            cached.score(image, "a red circle"),
            cached.compare(image, other, "a red circle"),
        )

    first, second = ask(image), ask(image.copy())
    assert judge.calls == 3
    assert first == second
    assert first[0] == [True, False]
    assert first[1] == CountingJudge().score(image, "a red circle")
    assert first[2] == Comparison("b", 0.25, 0.75)
    cached.compare(other, image, "a red circle")
    cached.answer(image, "a red circle", questions[:1])
    assert judge.calls == 5
    assert sum(c.price for c in ledger.calls()) == 2.5


# Imagefolder export and import.


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-cache"


def test_export_loads_with_datasets_and_imports_back(ledger, tmp_path, offline):
    import datasets

    sizes = [(8, 6), (5, 9), (16, 16)]
    for i, size in enumerate(sizes):
        ledger.add_record(
            prompt=f"prompt {i}", generator="teacher", seed=i, image=solid((i * 50, 0, 0), size),
            skills=("color",), spec={"i": i}, judge={"score": i / 2},
        )
    dropped = ledger.add_record(prompt="dropped", generator="teacher", seed=9, image=solid((0, 9, 0)))
    ledger.delete_record(dropped, round=1)
    ledger.add_record(prompt="no image yet", generator="teacher")

    out = tmp_path / "export"
    assert export_imagefolder(ledger, out) == 3
    dataset = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(offline))["train"]
    rows = sorted(dataset, key=lambda row: row["record_id"])
    assert [row["prompt"] for row in rows] == ["prompt 0", "prompt 1", "prompt 2"]
    assert [row["image"].size for row in rows] == sizes
    assert [row["score"] for row in rows] == [0.0, 0.5, 1.0]
    assert json.loads(rows[1]["spec"]) == {"i": 1} and rows[1]["skills"] == ["color"]

    with Ledger(tmp_path / "fresh") as fresh:
        assert import_imagefolder(fresh, out).added == 3
        assert import_imagefolder(fresh, out) == ImportResult(added=0, existing=3)
        imported = fresh.records()
        assert len(imported) == 3 and {r.op for r in imported} == {"import"}
        assert {r.seed for r in imported} == {None}
        originals = {r.prompt: r for r in ledger.records()}
        for record in imported:
            original = originals[record.prompt]
            imported_pixels = pixels(fresh.load_image(record.image_path))
            assert (imported_pixels == pixels(ledger.load_image(original.image_path))).all()
            assert record.skills == original.skills and record.spec == original.spec

    assert export_imagefolder(ledger, out, status=None) == 4
    assert len(list((out / "train").glob("*.png"))) == 4


def test_export_refuses_a_folder_it_did_not_write(ledger, tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        export_imagefolder(ledger, tmp_path / "out")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root, rows, files=None, metadata="metadata.jsonl"):
    """An imagefolder with `a.png` and `files` (name -> bytes) next to its metadata."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in {"a.png": png_bytes(solid((1, 2, 3))), **(files or {})}.items():
        (root / name).write_bytes(content)
    with open(root / metadata, "w", newline="") as f:
        if metadata.endswith(".csv"):
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def test_import_csv_under_a_split_folder(ledger, tmp_path):
    rows = [{"file_name": "a.png", "caption": "a red circle"}]
    write_folder(tmp_path / "src" / "train", rows, metadata="metadata.csv")
    assert import_imagefolder(ledger, tmp_path / "src", generator="user", round=2).added == 1
    [record] = ledger.records()
    assert (record.prompt, record.generator, record.round, record.op) == ("a red circle", "user", 2, "import")
    assert (pixels(ledger.load_image(record.image_path)) == [1, 2, 3]).all()


GOOD_ROW = {"file_name": "a.png", "prompt": "a red circle"}
NOT_A_PNG = b"\x89PNG\r\n\x1a\nnot really"
TRUNCATED_PNG = png_bytes(solid((9, 9, 9), (64, 64)))[:60]


@pytest.mark.parametrize(
    "row, files, message",
    [
        ({"file_name": "a.png", "prompt": ""}, {}, "metadata.jsonl:2: no prompt"),
        ({"file_name": "gone.png", "prompt": "y"}, {}, "missing image .*gone.png"),
        ({"file_name": "bad.png", "prompt": "y"}, {"bad.png": NOT_A_PNG}, "corrupt image .*bad.png"),
        ({"file_name": "cut.png", "prompt": "y"}, {"cut.png": TRUNCATED_PNG}, "corrupt image .*cut.png"),
        ({"file_name": "a.png", "prompt": "a red circle \ud83d"}, {}, "metadata.jsonl:2: holds half a UTF-16 pair"),
        ({"file_name": "../a.png", "prompt": "y"}, {}, "file_name '../a.png' points outside .*src; give a path inside"),
        ({"file_name": "/etc/hostname", "prompt": "y"}, {}, "file_name '/etc/hostname' points outside"),
    ],
    ids=["empty-prompt", "missing-image", "corrupt-png", "truncated-png", "half-an-emoji", "up-and-out", "absolute"],
)
def test_import_rejects_a_bad_row_without_adding_anything(ledger, tmp_path, row, files, message):
    write_folder(tmp_path / "src", [GOOD_ROW, row], files)
    with pytest.raises(UserError, match=message):
        import_imagefolder(ledger, tmp_path / "src")
    assert ledger.count(None) == 0


@pytest.mark.parametrize(
    "row, column, message",
    [({"file_name": "a.png", "label": "x"}, None, "no prompt column"), (GOOD_ROW, "alt", "no column 'alt'")],
)
def test_import_names_a_missing_prompt_column(ledger, tmp_path, row, column, message):
    write_folder(tmp_path / "src", [row])
    with pytest.raises(UserError, match=message):
        import_imagefolder(ledger, tmp_path / "src", prompt_column=column)


def test_prompts_are_those_of_the_records_by_round_and_op(ledger):
    """What a round reads of every record (the prompts drawn before, the writer's earlier outputs), without
    decoding each record: the same prompts, in the same order, as filtering `records`."""
    for round, op in [(0, "seed"), (0, "seed"), (1, "expand"), (1, "mutate"), (2, "expand"), (2, "seed"), (3, "mutate")]:
        rid = ledger.add_record(prompt=f"a red circle {round} {op} {ledger.count(None)}", generator="t", round=round, op=op)
        if round == 1:
            ledger.delete_record(rid, round=2)
    everything = ledger.records(None)
    for since, before, ops in [(None, None, None), (None, 2, None), (2, None, ["expand"]), (1, 3, ["expand", "mutate"])]:
        expected = [r.prompt for r in everything if (since is None or r.round >= since)
                    and (before is None or r.round < before) and (ops is None or r.op in ops)]
        assert ledger.prompts(since_round=since, before_round=before, ops=ops) == expected and expected
