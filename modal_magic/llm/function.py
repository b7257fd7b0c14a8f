"""The row function an LLM run hands the engine, and the :class:`~modal_magic.backends.base.Runtime` it needs.

:class:`LLMRowFunction` is what the cache fingerprints and what a Modal container receives (as a
:class:`~modal_magic.llm.row.shipped.ContainerRow`, without the key); its session (API key, client,
limiter, budget) is kept off it, in a side table. :meth:`LLMRowFunction.runtime` says what the
backend needs beyond the function: the meter the progress bar reads, the worker processes, what
those processes run, how the run closes its HTTP client, that the row runtime travels to Modal
by value, and on Modal the account in which the engine books each batch's share of
``budget_usd`` (:mod:`~modal_magic.llm.allotments`).

A session lives for one run: the run's end (:meth:`LLMRowFunction.aclose`, or
:meth:`LLMRowFunction.release` where the rows ran in other processes) drops it with its client.
What the function keeps for ``out.modal.retry_failed()`` (which the engine's run record makes
possible by holding the function) is the recipe for a new one: the request, the limits, the key,
and the budget with what was spent so far.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.base import Runtime
from ..fingerprint import register_identity
from . import row as row_runtime
from .allotments import LLMAccount
from .row.ledger import new_ledger
from .row.limits import Budget, Limits, Meter
from .row.session import Session
from .row.shipped import ContainerRow, WorkerRow

if TYPE_CHECKING:
    from ..options import MapOptions
    from .row.limits import Request

__all__ = ["ANSWER_FORMAT", "LLMRowFunction"]

#: bump when how an answer is asked for or read changes (the request body built from a Request,
#: the columns taken from the response): cached answers of another format are then asked again
ANSWER_FORMAT = 1


@dataclass
class _SessionRecipe:
    """What a new :class:`Session` for the same function needs (a retry of its failed rows)."""

    request: Request
    limits: Limits
    meter: Meter
    api_key: str | None
    base_url: str | None
    budget: Budget  # shared from run to run: a retry spends from what is left

    @classmethod
    def of(cls, session: Session) -> _SessionRecipe:
        return cls(session.request, session.limits, session.meter, session._api_key, session._base_url,
                   session.budget)

    def session(self) -> Session:
        session = Session(self.request, self.limits, self.meter, api_key=self.api_key, base_url=self.base_url)
        self.budget.restart()  # a retried row may fit where the last run's didn't
        session.budget = self.budget
        return session

    def __repr__(self) -> str:  # never the key
        return f"<_SessionRecipe model={self.request.model!r}>"


@dataclass
class _RowState:
    recipe: _SessionRecipe
    container_limits: Limits  # each container's share of rpm and tpm (budget_usd is booked by the kernel)
    on_modal: bool  # only then is the function really shipped, with the containers' share of the limits
    meter: Meter  # what the bar shows: fed by the session here, or added up from the rows that come back
    processes: int = 1  # local worker processes sending the requests (1: the kernel's own event loop)
    worker_limits: Limits | None = None  # each worker process's share of the limits
    session: Session | None = None  # the run's session, from its first row to its end; then dropped
    ledger: str | None = None  # the worker processes' shared budget file (row.ledger), once made
    account: LLMAccount | None = None  # on Modal with budget_usd: the kernel's account, once made


# Each row function's session (API key, client, limiter, budget) lives here, off the function: the
# cache fingerprints a function by its attributes, and what decides an answer is the Request alone;
# the key must never be part of a fingerprint, and raising budget_usd or rpm must not make finished
# rows look new. A weak table so a session goes away with its function.
_RUNTIMES: weakref.WeakKeyDictionary[LLMRowFunction, _RowState] = weakref.WeakKeyDictionary()


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LLMRowFunction:
    """The ``async`` function :func:`~modal_magic.llm.llm_frame` maps: one chat completion per row.

    It returns a dict (answer or schema fields, tokens in and out, cost), which the engine spreads
    into columns. Pickled for Modal it becomes a :class:`~modal_magic.llm.row.shipped.ContainerRow` that
    carries the request and the container's share of ``rpm`` and ``tpm``, and never the key.

    Examples
    --------
    >>> from modal_magic.llm.row.limits import Limits, Meter, Request
    >>> from modal_magic.llm.row.session import Session
    >>> request = Request(template="Say {text}", fields=("text",), model="m", into="answer")
    >>> row = LLMRowFunction(request, Session(request, Limits(), Meter(False), api_key="k", base_url=None),
    ...                      Limits(), on_modal=False)
    >>> row.__name__, row.runtime().worker_processes
    ('llm_answer', 1)
    """

    def __init__(self, request: Request, session: Session, container_limits: Limits, *, on_modal: bool,
                 processes: int = 1, worker_limits: Limits | None = None) -> None:
        self.request = request
        self.__name__ = f"llm_{request.into}"
        columns = request.columns
        elsewhere = on_modal or processes > 1  # the rows run in other processes: count what comes back
        meter = (Meter(request.price is not None, (columns["tokens_in"], columns["tokens_out"], columns["cost_usd"]))
                 if elsewhere else session.meter)
        _RUNTIMES[self] = _RowState(_SessionRecipe.of(session), container_limits, on_modal, meter, processes,
                                    worker_limits, session)

    def runtime(self) -> Runtime:
        """What the backend needs for this function: its meter, worker processes, their row, the close hook."""
        state = _RUNTIMES[self]
        return Runtime(meter=state.meter, worker_processes=state.processes, for_workers=self.for_workers,
                       aopen=self.aopen, aclose=self.aclose, account=self.account,
                       by_value=(row_runtime.__name__,))  # a container has no modal_magic

    def account(self, options: MapOptions) -> LLMAccount | None:
        """On Modal with ``budget_usd=``: the kernel's account of it, where the engine books each batch.

        One account for this function's life, so ``retry_failed()`` spends from what is left; each
        run starts it again with ``retries=`` (Modal's tries of a lost input, each of which may bill
        the batch's rows). Elsewhere the rows' own process keeps the budget: ``None``.
        """
        state = _RUNTIMES[self]
        recipe = state.recipe
        if not state.on_modal or recipe.limits.budget_usd is None:
            return None
        if state.account is None:
            state.account = LLMAccount(recipe.request, recipe.limits.max_output_tokens, recipe.budget)
        return state.account.start(tries=1 + options.retries)

    def for_workers(self) -> WorkerRow:
        """What the worker processes run: the request, each one's share of ``rpm``/``tpm``, and the key.

        With ``budget_usd=`` they share the whole budget through one ledger file
        (:class:`~modal_magic.llm.row.ledger.SharedBudget`), made on first use and kept for this
        function's life: a worker that dies, and its replacement, can't together pass it, and
        neither can ``retry_failed()`` runs.
        """
        state = _RUNTIMES[self]
        recipe = state.recipe
        limits = state.worker_limits or recipe.limits
        if recipe.limits.budget_usd is not None:
            if state.ledger is None:
                state.ledger = new_ledger()
                weakref.finalize(self, _remove_file, state.ledger)
            limits = dataclasses.replace(limits, budget_usd=recipe.limits.budget_usd)
        return WorkerRow(recipe.request, limits, recipe.api_key, recipe.base_url, state.ledger)

    def session(self) -> Session:
        """The session rows of this process use: the run's, or a new one (after :meth:`release`)."""
        state = _RUNTIMES[self]
        if state.session is None:
            state.session = state.recipe.session()
        return state.session

    async def aopen(self) -> None:
        """The run is starting: make its client now, before any row's clock (the asyncio backend calls this)."""
        self.session().open()

    async def aclose(self) -> None:
        """The run is over: close the client, on the loop that used it, and let the session go.

        The asyncio backend calls this at the end of every run, a retry's included.
        """
        state = _RUNTIMES[self]
        session, state.session = state.session, None
        if session is not None:
            await session.aclose()

    def release(self) -> None:
        """The run is over: let the session go (its client, if any, was closed by :meth:`aclose`)."""
        _RUNTIMES[self].session = None

    async def __call__(self, *values: Any) -> dict[str, Any]:
        return await self.session().complete(values)

    def __reduce__(self) -> Any:
        # A local run is never shipped: only the cache pickles it, to fingerprint it, and what a row
        # computes doesn't depend on the limits, so they stay out of its pickle.
        state = _RUNTIMES[self]
        return (ContainerRow, (self.request, state.container_limits if state.on_modal else Limits()))

    def __repr__(self) -> str:
        return f"<LLMRowFunction model={self.request.model!r} into={self.request.into!r}>"


def _answer_identity(row: LLMRowFunction) -> tuple[Any, ...]:
    """What decides a row's answer, for the cache: the request's fields and the answer format.

    Not modal_magic's code or version (upgrading keeps the answers paid for), nor the API key, the
    limits or where the rows run (a new key, ``rpm`` or ``budget_usd`` reuses them).
    """
    request = row.request
    return ("llm-answer", ANSWER_FORMAT, tuple((f.name, getattr(request, f.name)) for f in dataclasses.fields(request)))


register_identity(LLMRowFunction, _answer_identity)
