"""What a run has spent on its teachers and judge, and how much of the next batch its caps still allow.

Read from the ledger's call cache, so a rerun after a crash counts what the first run paid. A recipe asks
before it sends a batch (`draws_that_fit`, `comparisons_that_fit`), so it stops cleanly at a cap instead
of failing half-way through a round; an endpoint that failed every request of a step stops it in one line
(`every_request_failed`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

from ..errors import BudgetExhausted, UserError

if TYPE_CHECKING:
    from .cached import CachedGenerator
    from .ledger import Ledger


class CallBudgets:
    """A run's caps over all its teachers (`max_teacher_calls`, `max_teacher_price`) and its judge."""

    def __init__(self, ledger: Ledger, teachers: dict[str, CachedGenerator], judge_id: str, *,
                 max_teacher_calls: int | None = None, max_teacher_price: float | None = None,
                 max_judge_calls: int | None = None, train_past_teacher_budget: bool = False):
        self.ledger, self.teachers, self.judge_id = ledger, teachers, judge_id
        self.max_teacher_calls, self.max_teacher_price = max_teacher_calls, max_teacher_price
        self.max_judge_calls, self.train_past_teacher_budget = max_judge_calls, train_past_teacher_budget

    def teacher_calls(self) -> int:
        return self.ledger.call_totals(self.teachers)[0]

    def teacher_price(self) -> float:
        return self.ledger.call_totals(self.teachers)[1]

    def judge_calls(self) -> int:
        return self.ledger.call_totals([self.judge_id])[0]

    def teacher_budget_left(self, before_round: int | None = None) -> tuple[float, float]:
        """Calls and price left; `before_round`: as they stood when that round began (a rerun of the round
        after a crash sees what the first run saw, not what the round itself then spent)."""
        sent, price = self.ledger.call_totals(self.teachers, before_round)
        return (math.inf if self.max_teacher_calls is None else self.max_teacher_calls - sent,
                math.inf if self.max_teacher_price is None else self.max_teacher_price - price)

    def teacher_budget_spent(self, before_round: int | None = None) -> bool:
        """Whether not one more teacher call fits (a price left below every teacher's price buys nothing)."""
        calls_left, price_left = self.teacher_budget_left(before_round)
        cheapest = min(getattr(t.generator, "price_per_call", 0.0) for t in self.teachers.values())
        return calls_left < 1 or price_left <= 1e-9 or price_left < cheapest - 1e-9

    def draws_that_fit(self, prompts: Sequence[str], seeds: Sequence[int], teacher_ids: Sequence[str] | None) -> list[int]:
        """Which of these draws (indices) the teacher caps still allow: new ones in order until the first that
        does not fit (a tournament, `teacher_ids` None, costs one call per teacher), and every one drawn before,
        wherever it stands: it costs nothing, so a rerun after a crash keeps all that the first run paid for, even
        past a draw that failed at the cap. Raises `BudgetExhausted` once nothing fits, so the run stops cleanly
        (with `train_past_teacher_budget` it goes on buying nothing)."""
        if (self.max_teacher_calls is None and self.max_teacher_price is None) or not prompts:
            return list(range(len(prompts)))
        calls_left, price_left = self.teacher_budget_left()
        fit, buying = [], True
        for i, (new, resent) in enumerate(self._new_draws(prompts, seeds, teacher_ids)):
            price = sum(getattr(self.teachers[tid].generator, "price_per_call", 0.0) for tid in new)
            calls = len(new) - len(resent)  # (in flight at a crash: counted when first sent)
            buying = buying and not (new and (calls > calls_left or price > price_left + 1e-9))
            if buying or not new:
                calls_left, price_left = calls_left - calls, price_left - price
                fit.append(i)
        if not fit and not self.train_past_teacher_budget:
            calls, price = self.teacher_calls(), self.teacher_price()
            raise BudgetExhausted("teacher budget spent: " + ", ".join(
                [f"{calls} calls" + (f" of {self.max_teacher_calls}" if self.max_teacher_calls is not None else "")]
                + ([f"price {price:g} of {self.max_teacher_price:g}"] if self.max_teacher_price is not None else [])))
        return fit

    def first_tries(self, prompts: Sequence[str], seeds: Sequence[int], teacher_ids: Sequence[str] | None) -> list[int]:
        """The teacher calls each draw will send first (as `draws_that_fit` counts them): the room a teacher's
        retries must leave for the draws after its own (`CachedGenerator.generate`'s `reserve`). All 0 without a
        teacher cap, where no retry waits for room."""
        if self.max_teacher_calls is None and self.max_teacher_price is None:
            return [0] * len(prompts)
        return [len(new) - len(resent) for new, resent in self._new_draws(prompts, seeds, teacher_ids)]

    def _new_draws(self, prompts: Sequence[str], seeds: Sequence[int],
                   teacher_ids: Sequence[str] | None) -> list[tuple[list, list]]:
        """Per draw, the teachers that have not drawn it yet (nor failed it for good), and of those the ones
        whose draw a process that died left in flight (sent again, counted once): a tournament (`teacher_ids`
        None) asks every teacher, otherwise the one named."""
        states = {}  # (teacher, index) -> 'settled' or 'pending' (`CachedGenerator.draw_states`)
        for tid, teacher in self.teachers.items():
            asked = [i for i in range(len(prompts)) if teacher_ids is None or teacher_ids[i] == tid]
            drawn = teacher.draw_states([prompts[i] for i in asked], [seeds[i] for i in asked])
            states.update(((tid, i), state) for i, state in zip(asked, drawn))
        new = [[tid for tid in (self.teachers if teacher_ids is None else [teacher_ids[i]])
                if states.get((tid, i)) != "settled"] for i in range(len(prompts))]
        return [(tids, [tid for tid in tids if states.get((tid, i)) == "pending"]) for i, tids in enumerate(new)]

    def comparisons_that_fit(self, n: int, round: int, calls_each: int = 1, reserve: int = 0) -> int:
        """How many of round `round`'s n comparisons `max_judge_calls` allows, when each judged record may
        cost up to `calls_each` judge calls in all (its comparison, and the quality gate's scores and the
        tournament's comparisons of what it leads to), so the round cannot overshoot the cap; `reserve`: calls the
        round spends besides (its held-out score). Counts the calls of earlier rounds only, so a rerun of the
        round after a crash judges the same records."""
        if self.max_judge_calls is None or n == 0:  # (nothing to judge: a spent budget does not stop the round)
            return n
        left = self.max_judge_calls - reserve - self.ledger.call_totals([self.judge_id], before_round=round)[0]
        if left < calls_each:
            raise BudgetExhausted(f"judge budget spent: {self.judge_calls()} of {self.max_judge_calls} calls"
                                  + (f" (a judged record may need {calls_each})" if calls_each > 1 else ""))
        return min(n, left // calls_each)

    def check_judge_room(self, needed: int, what: str) -> None:
        """Stop before `what` (which may need `needed` judge calls) if `max_judge_calls` cannot pay for it."""
        if self.max_judge_calls is not None and needed > self.max_judge_calls:
            raise BudgetExhausted(f"judge budget too small: {what} may need {needed} judge calls, "
                                  f"max_judge_calls is {self.max_judge_calls}")


def last_failure(ledger: Ledger, callers: Iterable[str]) -> str | None:
    """The error of the latest failed call of `callers` (teacher or judge ids), shortened; None if none failed."""
    callers = set(callers)
    failed = [call.error or "" for call in ledger.calls(status="failed") if call.caller in callers]
    return failed[-1][:200] if failed else None


def every_request_failed(ledger: Ledger, callers: Iterable[str], round: int, what: str) -> UserError:
    """The one-line error for an endpoint that failed every request of `what` (a server down, or refusing them
    all). Failed calls are final answers in a run folder (`Call.settled`), but these are marked to be asked
    again, so the rerun after the fix does; what they were sent still counts against the call budgets."""
    callers = list(callers)
    error = last_failure(ledger, callers) or "unreadable replies"
    ledger.ask_failed_calls_again(callers, round)
    return UserError(f"{what} (last error: {error}): fix it, then rerun")
