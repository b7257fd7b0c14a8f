"""The arithmetic of a hard dollar cap, shared by every ``budget_usd=``: book the worst case first, settle after.

One rule serves an LLM run's requests (:class:`~modal_magic.llm.row.limits.Budget`, and
:class:`~modal_magic.llm.row.ledger.SharedBudget` across worker processes) and a map's Modal
batches (:class:`modal_magic.spend.MapBudget`): a piece of work is sent only when what is spent,
plus the worst cases booked for work in flight, plus its own worst case fits in the limit
(:func:`verdict` says ``"book"``); when only the work in flight stands in the way it waits
(``"wait"``); when even what is spent plus its worst case passes the limit, it and all later work
is refused (``"refuse"``). Each piece is then settled with what it actually cost, so what is spent
never passes the limit however much is in flight. Part of the LLM row runtime, which is shipped by
value into Modal containers: standard library only.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Bookings", "Verdict", "verdict"]

Verdict = Literal["book", "wait", "refuse"]


def verdict(limit_usd: float, spent_usd: float, in_flight_usd: float, worst_usd: float) -> Verdict:
    """Whether work whose worst case is ``worst_usd`` may be sent now, must wait, or must not be sent.

    Examples
    --------
    >>> verdict(1.0, spent_usd=0.5, in_flight_usd=0.0, worst_usd=0.4)
    'book'
    >>> verdict(1.0, spent_usd=0.5, in_flight_usd=0.3, worst_usd=0.4)
    'wait'
    >>> verdict(1.0, spent_usd=0.7, in_flight_usd=0.0, worst_usd=0.4)
    'refuse'
    """
    if spent_usd + worst_usd > limit_usd:
        return "refuse"
    if spent_usd + in_flight_usd + worst_usd <= limit_usd:
        return "book"
    return "wait"


class Bookings:
    """What one process has spent and booked against ``limit_usd`` (``None``: no cap, only counting).

    Examples
    --------
    >>> bookings = Bookings(1.0)
    >>> bookings.check(0.6)
    'book'
    >>> bookings.book(0.6); bookings.check(0.6)
    'wait'
    >>> bookings.release(0.6, 0.5); bookings.check(0.6)
    'refuse'
    >>> bookings.spent_usd
    0.5
    """

    def __init__(self, limit_usd: float | None) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = 0.0
        self.in_flight_usd = 0.0
        self._in_flight = 0  # pieces booked and not yet settled: at 0, nothing is booked (no float residue)

    def check(self, worst_usd: float) -> Verdict:
        """:func:`verdict` for this process's account (always ``"book"`` without a limit)."""
        if self.limit_usd is None:
            return "book"
        return verdict(self.limit_usd, self.spent_usd, self.in_flight_usd, worst_usd)

    def book(self, worst_usd: float) -> None:
        """Hold ``worst_usd`` for a piece of work about to be sent."""
        self.in_flight_usd += worst_usd
        self._in_flight += 1

    def release(self, worst_usd: float, actual_usd: float) -> None:
        """A piece that booked ``worst_usd`` cost ``actual_usd``: move it from in flight to spent."""
        self.spent_usd += actual_usd
        self._in_flight = max(0, self._in_flight - 1)
        self.in_flight_usd = max(0.0, self.in_flight_usd - worst_usd) if self._in_flight else 0.0
