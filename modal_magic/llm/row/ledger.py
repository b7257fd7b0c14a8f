"""One ``budget_usd`` shared by the kernel's worker processes, through a small locked file, so a crash can't pass it.

With ``processes=N`` each worker process sends its own requests. Were the budget split into N
fixed shares, a worker that died would take its share's bookkeeping with it, and its replacement
would start a fresh share: every crash could add a share to what the run may spend. Instead every
worker books into one :class:`SharedBudget`, a JSON ledger file (``committed`` dollars, and what
each process has booked for requests in flight) read and written under ``fcntl.flock``. A process
that died never settles its bookings, and may have been billed for them: the next worker to look
counts them as spent. So what the run spends never passes ``budget_usd``, whatever dies.

Part of the row runtime (see :mod:`modal_magic.llm.row`): standard library only. POSIX only (the
kernel's worker processes are). On Modal no container holds a share either: the kernel books each
batch's worst case before sending it, and the batch's rows book against that allotment
(:mod:`modal_magic.llm.allotments`, :mod:`~modal_magic.llm.row.allotment`).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from typing import Any, Callable

from .booking import verdict
from .limits import Budget

__all__ = ["SharedBudget", "new_ledger"]

#: how often a request that doesn't fit yet looks again for room (other processes settle meanwhile)
POLL_S = 0.02


def new_ledger() -> str:
    """Create an empty ledger file, readable by this user only; return its path (the caller deletes it)."""
    fd, path = tempfile.mkstemp(prefix="modal_magic-budget-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"committed": 0.0, "in_flight": {}}, f)
    return path


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, doesn't)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class SharedBudget(Budget):
    """A :class:`~modal_magic.llm.row.limits.Budget` whose bookings live in a ledger file several processes share.

    Examples
    --------
    >>> import asyncio, os
    >>> path = new_ledger()
    >>> a, b = SharedBudget(0.10, path), SharedBudget(0.10, path)
    >>> async def run():
    ...     await a.acquire(0.06); a.settle(0.06, 0.05)
    ...     await b.acquire(0.06)
    >>> asyncio.run(run())
    Traceback (most recent call last):
    ...
    modal_magic.llm.row.failures.BudgetExceeded: budget_usd=0.10: $0.05 spent, and the next request could cost up to $0.06, ...
    >>> os.unlink(path)
    """

    def __init__(self, limit_usd: float | None, path: str) -> None:
        super().__init__(limit_usd)
        self.path = path

    def _update(self, change: Callable[[float, dict[str, float]], Any]) -> Any:
        """Apply ``change(committed, in_flight)`` (it may edit both; it returns the new committed and a verdict)."""
        import fcntl  # POSIX, as the worker processes are; imported here so the package imports anywhere

        with open(self.path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            data = json.loads(f.read() or "{}")
            committed = float(data.get("committed", 0.0))
            flights: dict[str, float] = dict(data.get("in_flight", {}))
            for pid in [p for p in flights if not _alive(int(p))]:
                committed += flights.pop(pid)  # it never settles, and may have been billed: spent
            committed, verdict = change(committed, flights)
            f.seek(0)
            f.truncate()
            json.dump({"committed": committed, "in_flight": flights}, f)
        self.spent_usd = committed  # what every process has spent, for the messages
        return verdict

    async def acquire(self, worst_usd: float, detail: str = "") -> None:
        """Book ``worst_usd`` in the ledger, waiting while other requests in flight hold the room it needs."""
        if self.limit_usd is None:
            return
        limit, me = self.limit_usd, str(os.getpid())

        def book(committed: float, flights: dict[str, float]) -> tuple[float, str]:
            answer = "refuse" if self.stopped is not None else verdict(limit, committed, sum(flights.values()),
                                                                      worst_usd)
            if answer == "book":
                flights[me] = flights.get(me, 0.0) + worst_usd
            return committed, answer

        while True:
            answer = self._update(book)
            if answer == "book":
                self.book(worst_usd)
                return
            if answer == "refuse":
                raise self._refuse(worst_usd, detail)
            await asyncio.sleep(POLL_S)

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        """A request booked ``worst_usd`` and was billed ``actual_usd``: move it from in flight to spent."""
        if self.limit_usd is None:
            self.spent_usd += actual_usd
            return
        me = str(os.getpid())

        def unbook(committed: float, flights: dict[str, float]) -> tuple[float, None]:
            left = flights.get(me, 0.0) - worst_usd
            if left > 1e-12:
                flights[me] = left
            else:
                flights.pop(me, None)
            return committed + actual_usd, None

        self._update(unbook)
        self.release(worst_usd, 0.0)  # this process's bookings; spent_usd is the ledger's, set by _update
        if actual_usd > worst_usd * (1 + 1e-9):
            self._note_overrun(worst_usd, actual_usd)
