"""A batch's allotment of an LLM run's ``budget_usd`` on Modal: what its rows may book in their container.

On Modal the kernel keeps the run's one account (:class:`modal_magic.llm.allotments.LLMAccount`).
Before it sends a batch of rows it books the batch's allotment there (one request's worst case per
row, :func:`~modal_magic.llm.row.limits.worst_case`), and each row's arguments travel with one
shared tag after the template's values (:func:`allotment_tag`, a plain dict: pickle keeps one
object for the whole batch, so all its rows share one after unpickling in the container). In the
container each try of each row books its worst case against the batch's :class:`AllotmentBudget`, as a
local run books against its process's budget: the first try of every row fits (the kernel booked
it), and a retry fits while the rows before it left enough unused. Each row reports what it may
have been billed (:data:`BILLED_KEY` in its result, ``row_billed_usd`` on its exception), and the
kernel settles the batch's booking with their sum; a batch lost with its container settles at its
whole allotment. So whatever crashes, what the run spends never passes ``budget_usd``.

Part of the row runtime (see :mod:`modal_magic.llm.row`): standard library only.
"""

from __future__ import annotations

from typing import Any

from .failures import BudgetExceeded
from .limits import Budget, usd

__all__ = ["ALLOTMENT_KEY", "BILLED_KEY", "AllotmentBudget", "allotment_budget", "allotment_tag", "split_allotment"]

#: the key a row's result carries what its requests may have been billed under, taken out by the
#: kernel's account before the result becomes columns
BILLED_KEY = "modal_magic_billed_usd"
#: the key of a batch's allotment, in dollars, in the tag that travels after each row's values
ALLOTMENT_KEY = "modal_magic_allotment_usd"


class AllotmentBudget(Budget):
    """A :class:`~modal_magic.llm.row.limits.Budget` of one batch's allotment, in its container.

    Unlike a run's budget it doesn't stop at its first refusal: a retry that doesn't fit fails
    its own row only, and the next row's first try still fits (the kernel booked it).

    Examples
    --------
    >>> import asyncio
    >>> budget = AllotmentBudget(0.02, rows=2)
    >>> async def run():
    ...     await budget.acquire(0.01); budget.settle(0.01, 0.01)  # a try that timed out: billed, perhaps
    ...     await budget.acquire(0.015, "a retry")
    >>> asyncio.run(run())
    Traceback (most recent call last):
    ...
    modal_magic.llm.row.failures.BudgetExceeded: this batch's allotment of budget_usd was used: ...
    """

    def __init__(self, limit_usd: float, rows: int) -> None:
        super().__init__(limit_usd)
        self.rows = rows

    def _refuse(self, worst_usd: float, detail: str) -> BudgetExceeded:
        why = f" ({detail})" if detail else ""
        used = self.spent_usd + self.in_flight_usd
        return BudgetExceeded(
            f"this batch's allotment of budget_usd was used: the kernel booked ${usd(self.limit_usd or 0.0)} for "
            f"its {self.rows} row{'s' if self.rows != 1 else ''} (one request's worst case each), its tries have "
            f"taken ${usd(used)}, and this try could cost up to ${usd(worst_usd)}{why}, so it was not sent. "
            "out.modal.retry_failed() sends the row again from what is left of budget_usd"
        )


def allotment_tag(usd_: float, rows: int) -> dict[str, Any]:
    """What travels after the values of each row of a batch: one dict, shared by the batch's rows.

    A plain dict, so that it unpickles where modal_magic isn't installed (a container) whatever
    pickles it; pickle keeps one object for every row of the batch that holds it, so the rows share
    it there too, and the budget their tries book against (:func:`allotment_budget`).
    """
    return {ALLOTMENT_KEY: usd_, "rows": rows}


def split_allotment(values: tuple[Any, ...], fields: int) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """A row's ``fields`` template values, and the allotment tag that came after them (``None`` if none did).

    Examples
    --------
    >>> tag = allotment_tag(0.01, 1)
    >>> split_allotment(("a", tag), 1) == (("a",), tag), split_allotment(("a",), 1)
    (True, (('a',), None))
    """
    if len(values) == fields + 1 and isinstance(values[-1], dict) and ALLOTMENT_KEY in values[-1]:
        return tuple(values[:-1]), values[-1]
    return tuple(values), None


def allotment_budget(tag: dict[str, Any]) -> AllotmentBudget:
    """The budget the tries of the rows that share ``tag`` book against, made by the first of them.

    Examples
    --------
    >>> import pickle
    >>> tag = allotment_tag(0.03, rows=2)
    >>> rows = pickle.loads(pickle.dumps([("a", tag), ("b", tag)]))
    >>> allotment_budget(rows[0][1]) is allotment_budget(rows[1][1]), allotment_budget(rows[0][1]).limit_usd
    (True, 0.03)
    """
    budget = tag.get("budget")
    if budget is None:
        budget = tag["budget"] = AllotmentBudget(float(tag[ALLOTMENT_KEY]), int(tag.get("rows", 1)))
    return budget
