"""The row function as it is shipped: :class:`ContainerRow` in a Modal container, :class:`WorkerRow` in a worker process.

Part of the row runtime (see :mod:`modal_magic.llm.row`), pickled by value. Each makes one
:class:`~modal_magic.llm.row.session.Session` where it runs, on first use, and answers its rows
through it; neither pickles the key, except a :class:`WorkerRow` on its way to the kernel's own
worker process.
"""

from __future__ import annotations

from typing import Any

from .allotment import allotment_budget, split_allotment
from .ledger import SharedBudget
from .limits import Limits, Meter, Request
from .session import IDLE_CLOSE_S, Session, warm_up

__all__ = ["ContainerRow", "WorkerRow"]


class ContainerRow:
    """The row function as it runs in a Modal container: one :class:`Session` per container.

    The key comes from the container's environment (``OPENAI_API_KEY``, set by a Modal secret);
    so does ``OPENAI_BASE_URL`` when the run didn't name one. ``rpm`` and ``tpm`` are this
    container's share; ``budget_usd`` is not in its limits: with one, each row arrives with its
    batch's allotment after its values (:mod:`~modal_magic.llm.row.allotment`), booked by the
    kernel, and its tries book against that.
    """

    def __init__(self, request: Request, limits: Limits) -> None:
        warm_up()  # as a container unpickles it: start-up, before any row's clock starts
        self.request = request
        self.limits = limits
        self._session: Session | None = None

    def __reduce__(self) -> Any:
        return (ContainerRow, (self.request, self.limits))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model={self.request.model!r} into={self.request.into!r}>"

    def _new_session(self) -> Session:
        import os

        return Session(
            self.request, self.limits, Meter(self.request.price is not None),
            api_key=os.environ.get("OPENAI_API_KEY"),
            base_url=self.request.base_url or os.environ.get("OPENAI_BASE_URL") or None,
            key_hint=": OPENAI_API_KEY is not set in the Modal container; pass a Modal secret that sets it, "
                     "e.g. secrets=['openai-secret']",
            idle_close_s=IDLE_CLOSE_S,
        )

    async def __call__(self, *values: Any) -> dict[str, Any]:
        if self._session is None:
            self._session = self._new_session()
        values, tag = split_allotment(values, len(self.request.fields))
        return await self._session.complete(values, allotment_budget(tag) if tag is not None else None)


class WorkerRow(ContainerRow):
    """The row function in one of the kernel's own worker processes (``processes=``): one session each.

    Like a container's, with this process's share of ``rpm`` and ``tpm``, but the key travels with
    it: over the socket to the kernel's worker process, and nowhere else. It is made by the backend
    just before sending (the cache fingerprints the :class:`~modal_magic.llm.LLMRowFunction`, which
    pickles without the key), and its repr doesn't show the key either. With ``ledger`` (a file
    path) the budget is the whole ``budget_usd``, booked in that ledger by every worker of the run
    (:class:`~modal_magic.llm.row.ledger.SharedBudget`), so a worker that dies can't take its
    spending out of the account.
    """

    def __init__(self, request: Request, limits: Limits, api_key: str | None, base_url: str | None,
                 ledger: str | None = None) -> None:
        super().__init__(request, limits)
        self._api_key = api_key
        self._base_url = base_url
        self._ledger = ledger

    def __reduce__(self) -> Any:
        return (_arrive, (self.request, self.limits, self._api_key, self._base_url, self._ledger))

    def _new_session(self) -> Session:
        session = Session(self.request, self.limits, Meter(self.request.price is not None), api_key=self._api_key,
                          base_url=self._base_url, idle_close_s=IDLE_CLOSE_S)
        if self._ledger is not None:
            session.budget = SharedBudget(self.limits.budget_usd, self._ledger)
        return session


def _arrive(request: Request, limits: Limits, api_key: str | None, base_url: str | None,
            ledger: str | None) -> WorkerRow:
    """A :class:`WorkerRow` as its worker process unpickles it: with its session and client made already.

    The worker unpickles the function when it is sent, before any of its rows starts, so the
    client's start-up (a TLS context: seconds on a loaded machine) never counts against a row's
    ``timeout``, nor delays the first request past its rate-limiter slot.
    """
    row = WorkerRow(request, limits, api_key, base_url, ledger)
    row._session = row._new_session()
    row._session.open()
    return row
