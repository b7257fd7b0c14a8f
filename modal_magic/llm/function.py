"""The row function an LLM run hands the engine, and the :class:`~modal_magic.backends.base.Runtime` it needs.

:class:`LLMRowFunction` is what the cache fingerprints and what a Modal container receives (as a
:class:`~modal_magic.llm.row.session.ContainerRow`, without the key); its session (API key, client,
limiter, budget) is kept off it, in a side table. :meth:`LLMRowFunction.runtime` says what the
backend needs beyond the function: the meter the progress bar reads, the worker processes, what
those processes run, and how the run closes its HTTP client.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..backends.base import Runtime
from .row.limits import Limits, Meter
from .row.session import ContainerRow

if TYPE_CHECKING:
    from .row.limits import Request
    from .row.session import Session, WorkerRow

__all__ = ["LLMRowFunction"]


@dataclass
class _RowState:
    session: Session
    container_limits: Limits
    on_modal: bool  # only then is the function really shipped, with the containers' share of the limits
    meter: Meter  # what the bar shows: fed by the session here, or added up from the rows that come back
    processes: int = 1  # local worker processes sending the requests (1: the kernel's own event loop)
    worker_limits: Limits | None = None  # each worker process's share of the limits


# Each row function's session (API key, client, limiter, budget) lives here, off the function: the
# cache fingerprints a function by its attributes, and what decides an answer is the Request alone;
# the key must never be part of a fingerprint, and raising budget_usd or rpm must not make finished
# rows look new. A weak table so a session goes away with its function.
_RUNTIMES: weakref.WeakKeyDictionary[LLMRowFunction, _RowState] = weakref.WeakKeyDictionary()


class LLMRowFunction:
    """The ``async`` function :func:`~modal_magic.llm.llm_frame` maps: one chat completion per row.

    It returns a dict (answer or schema fields, tokens in and out, cost), which the engine spreads
    into columns. Pickled for Modal it becomes a :class:`~modal_magic.llm.row.session.ContainerRow` that
    carries the request and the container's share of the limits, and never the key.

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
        _RUNTIMES[self] = _RowState(session, container_limits, on_modal, meter, processes, worker_limits)

    def runtime(self) -> Runtime:
        """What the backend needs for this function: its meter, worker processes, their row, the close hook."""
        state = _RUNTIMES[self]
        return Runtime(meter=state.meter, worker_processes=state.processes, for_workers=self.for_workers,
                       aclose=self.aclose)

    def for_workers(self) -> WorkerRow:
        """What the worker processes run: the request, each one's share of the limits, and the key."""
        state = _RUNTIMES[self]
        return state.session.worker_row(state.worker_limits or state.session.limits)

    async def aclose(self) -> None:
        """The run is over: close the client, on the loop that used it (the asyncio backend calls this)."""
        await _RUNTIMES[self].session.aclose()

    async def __call__(self, *values: Any) -> dict[str, Any]:
        return await _RUNTIMES[self].session.complete(values)

    def __reduce__(self) -> Any:
        # A local run is never shipped: only the cache pickles it, to fingerprint it, and what a row
        # computes doesn't depend on the limits, so they stay out of its pickle.
        state = _RUNTIMES[self]
        return (ContainerRow, (self.request, state.container_limits if state.on_modal else Limits()))

    def __repr__(self) -> str:
        return f"<LLMRowFunction model={self.request.model!r} into={self.request.into!r}>"
