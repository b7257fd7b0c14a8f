"""The kernel's account of an LLM run's ``budget_usd`` on Modal: each batch books its rows' worst cases before it goes.

Containers come and go (a crash, a scale-up), so none of them can hold a share of the budget: a
replacement would start a fresh share, and every crash could add one to what the run spends. The
kernel holds the one account instead, an :class:`LLMAccount` the engine asks before it sends each
batch (the :class:`~modal_magic.backends.base.Account` contract, beside a Modal map's compute
budget). A batch's allotment is one request's worst case per row
(:func:`~modal_magic.llm.row.session.row_worst_case`, the arithmetic the container books each try
with), times Modal's tries of a lost input (``retries=``); the engine sends as many of the next rows
as fit in what is left (limit − spent − what batches in flight booked), holds the batch while only
batches in flight stand in the way, and refuses the rest once even one row can't fit with what is
spent. The allotment travels with the batch (:mod:`~modal_magic.llm.row.allotment`), and the batch
is settled with what its rows report they may have been billed; a batch lost with its container
settles at its whole allotment (it may have been billed that much), one that never started at 0.
The account keeps what was spent from run to run: ``retry_failed()`` spends from what is left.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .row.allotment import BILLED_KEY, allotment_tag, split_allotment
from .row.failures import BudgetExceeded
from .row.session import row_worst_case

if TYPE_CHECKING:
    from ..backends.base import Batch, BatchResult
    from .row.booking import Verdict
    from .row.limits import Budget, Request

__all__ = ["LLMAccount"]


class LLMAccount:
    """What an LLM run on Modal may still send under ``budget_usd``, batch by batch, booked in ``budget``.

    ``budget`` is the run's :class:`~modal_magic.llm.row.limits.Budget`, kept from run to run.

    Examples
    --------
    >>> from modal_magic.backends.base import Batch
    >>> from modal_magic.llm.row.limits import Budget, Request
    >>> request = Request(template="{t}", fields=("t",), model="m", into="a", max_tokens=10, price=(1e4, 1e4))
    >>> account = LLMAccount(request, None, Budget(1.0))
    >>> account.admit(Batch(0, range(3), [("hi",), ("hi",), ("hi",)]))  # $0.40 a row at most
    ('book', 2)
    >>> sent = account.book(Batch(0, range(2), [("hi",), ("hi",)]))
    >>> sent.args[0][1] is sent.args[1][1], account.admit(Batch(1, [2], [("hi",)]))  # one shared allotment
    (True, ('wait', 0))
    """

    def __init__(self, request: Request, max_output_tokens: int | None, budget: Budget) -> None:
        self.request = request
        self.max_output_tokens = max_output_tokens
        self.budget = budget
        self.tries = 1  # Modal's tries of a lost input: each may run the batch's rows, and bill them
        self._booked: dict[int, tuple[float, float]] = {}  # batch id -> (booked, one try's allotment)
        # the worst cases of rows not yet booked, by position: a batch waiting for room is asked again and again
        self._worsts: dict[int, float] = {}

    def start(self, tries: int) -> LLMAccount:
        """A run (or a retry of failed rows) starts: keep what was spent, look again.

        A batch of an earlier run that never came back (the run was stopped with it in flight, its
        call cancelled) counts as spent at its allotment: it may have been billed.
        """
        for whole, _ in self._booked.values():
            self.budget.settle(whole, whole)
        self._booked.clear()
        self._worsts.clear()  # a new run's positions are rows of another frame
        self.tries = tries
        self.budget.restart()
        return self

    def _worst(self, arg: Any) -> tuple[float, str]:
        # a lost row sent again carries its last batch's allotment
        values, _ = split_allotment(tuple(arg), len(self.request.fields))
        return row_worst_case(self.request, values, self.max_output_tokens)

    def _worst_usd(self, position: int, arg: Any) -> float:
        worst = self._worsts.get(position)
        if worst is None:
            worst = self._worsts[position] = self._worst(arg)[0]
        return worst

    def admit(self, batch: Batch) -> tuple[Verdict, int]:
        """How many of the first rows of ``batch`` fit in the room left, each at its worst case."""
        budget = self.budget
        if budget.stopped is not None:
            return "refuse", 0
        limit = budget.limit_usd
        if limit is None:
            return "book", len(batch.args)
        held = budget.spent_usd + budget.in_flight_usd
        allotment, fits = 0.0, 0
        for position, arg in zip(batch.positions, batch.args):  # summed in order, as book() sums them
            more = allotment + self._worst_usd(int(position), arg)
            if held + more * self.tries > limit:
                break
            allotment, fits = more, fits + 1
        if fits:
            return "book", fits
        if budget.spent_usd + self._worst_usd(int(batch.positions[0]), batch.args[0]) * self.tries > limit:
            return "refuse", 0
        return "wait", 0

    def book(self, batch: Batch) -> Batch:
        """Book the batch's allotment, and return the batch with it after each row's values (one shared tag)."""
        fields = len(self.request.fields)
        rows = [split_allotment(tuple(arg), fields)[0] for arg in batch.args]
        allotment = 0.0
        for position, values in zip(batch.positions, rows):
            allotment += self._worst_usd(int(position), values)
            del self._worsts[int(position)]  # booked: kept no longer (a lost row sent again is worked out anew)
        booked = allotment * self.tries
        self.budget.book(booked)
        self._booked[batch.id] = (booked, allotment)
        shared = allotment_tag(allotment, len(rows))
        return dataclasses.replace(batch, args=[(*values, shared) for values in rows])

    def settle(self, result: BatchResult) -> None:
        """The batch came back: settle it with what its rows may have been billed (see the module)."""
        reported, complete = _reports(result)
        booked = self._booked.pop(result.batch.id, None)
        if booked is None:  # adopted from an earlier run, which booked it in its own account
            return
        whole, one_try = booked
        if result.requeue:  # never started
            actual = 0.0
        elif result.lost is not None:  # it may have run, and been billed, on every try it had
            actual = whole
        else:
            # A row that reported nothing (its try was cut off by a row timeout) may have used what the
            # others left of the allotment; and Modal's earlier tries of the input may each have used one.
            actual = (reported if complete else one_try) + one_try * (self.tries - 1)
        self.budget.settle(whole, actual)

    def refusal(self, batch: Batch, rows_left: int) -> BudgetExceeded:
        """The error of the rows not sent: the next one's worst case would take the run past ``budget_usd``."""
        budget = self.budget
        if budget.stopped is None:
            worst, detail = self._worst(batch.args[0])
            if self.tries > 1:
                detail += f", for each of Modal's {self.tries} tries as retries={self.tries - 1}"
            after = rows_left - 1
            budget.stop(worst * self.tries, detail,
                        f"it and the {after} row{'s' if after != 1 else ''} after it were not sent")
        return BudgetExceeded(budget.stopped)


def _reports(result: BatchResult) -> tuple[float, bool]:
    """What the rows of ``result`` say they may have been billed, and whether every row said.

    The report is taken out of each answer (it is no column of the result).
    """
    total, said = 0.0, 0
    for value in result.values:
        if isinstance(value, dict) and BILLED_KEY in value:
            total += float(value.pop(BILLED_KEY) or 0.0)
            said += 1
    for error in result.errors:
        billed = getattr(error[-1], "row_billed_usd", None)  # the RowReport contract, modal_magic.errors
        if billed is not None:
            total += float(billed)
            said += 1
    return total, said == len(result.batch.positions) and not result.lost
