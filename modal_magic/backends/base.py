"""The small interface every backend implements, and the values that cross it.

A backend runs the user's function on batches of rows and hands back one :class:`BatchResult` per
batch, in completion order. It never raises for a row: a row's exception is part of its batch's
result, and a batch that was lost as a whole (its worker or container died, it blew its time
budget) comes back with ``lost`` set so the engine can retry its rows in isolation. The model is
``concurrent.futures.Executor`` with joblib's backend registry: ``submit`` while ``capacity``
allows, then ``results`` to collect whatever has finished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Sequence, TypeVar

if TYPE_CHECKING:
    from ..cache.rows import RunCache
    from ..llm.row.booking import Verdict
    from ..options import MapOptions


class Meter(Protocol):
    """Running totals a run shows on its progress bar beside the row counts (an LLM run's tokens and cost).

    ``observe`` sees every batch that comes back, as ``BatchResult.values`` and ``.errors``.
    """

    tokens: int
    cost_usd: float | None

    def observe(self, values: list[Any], errors: list[tuple[Any, ...]]) -> None: ...


class Account(Protocol):
    """A cap on what a run may spend, kept in the kernel batch by batch (a ``budget_usd``).

    Before the engine sends a batch it asks every account of the run (:meth:`admit`); it sends the
    batch only when each says ``"book"``, cut to the rows that all of them have room for, and
    books it with each (:meth:`book`). When the batch comes back, however it ends (answered, lost
    with its container, never started), each account settles it (:meth:`settle`). A Modal map's
    compute budget is one (:class:`modal_magic.spend.MapBudget`); an LLM run on Modal adds the
    account of its requests' dollars through :attr:`Runtime.account`. The rule is the same for
    all: what is spent, plus the worst cases of what is in flight, never passes the limit.
    """

    def admit(self, batch: Batch) -> tuple[Verdict, int]:
        """``("book", rows)``: the first ``rows`` (at least one) of ``batch`` fit in the room left now;
        ``("wait", 0)``: not even one does until batches in flight settle; ``("refuse", 0)``: not even
        one ever will, so it and every row not yet sent is refused (:meth:`refusal`)."""
        ...

    def book(self, batch: Batch) -> Batch:
        """Hold the worst case of ``batch`` (admitted, and cut to what fits); return the batch to send,
        whose rows may carry what must travel with them (an LLM batch's allotment)."""
        ...

    def settle(self, result: BatchResult) -> None:
        """``result`` came back: what it may have cost replaces its booking. It may take out of
        ``result.values`` what the rows reported for this account alone."""
        ...

    def refusal(self, batch: Batch, rows_left: int) -> Exception:
        """The error of every row not sent once ``batch`` was refused (``rows_left`` of them, its own included)."""
        ...


@dataclass(frozen=True)
class Runtime:
    """What a run needs beyond the user's function, said by the layer that made the function.

    A plain map leaves it at its defaults. The LLM layer fills it in (see
    :func:`modal_magic.llm.llm_frame`): its row function's meter, how many worker processes send
    the requests, what those processes run instead of the function itself (the row with its API
    key, which the cached, fingerprinted function never carries), and how to open the HTTP client
    before the first row and close it at the end of the run.

    Examples
    --------
    >>> Runtime().worker_processes, Runtime().meter is None
    (1, True)
    """

    #: tokens and cost for the progress bar, fed as batches come back
    meter: Meter | None = None
    #: local worker processes for an ``async`` function (more than 1 picks the async process backend)
    worker_processes: int = 1
    #: makes what each worker process runs, when it isn't the function itself
    for_workers: Callable[[], Callable[..., Any]] | None = None
    #: called (and awaited) once at the start of a run on the event loop that will run the rows,
    #: before any row: start-up (an HTTP client) that no row's ``timeout`` should count
    aopen: Callable[[], Awaitable[None]] | None = None
    #: called (and awaited) once at the end of a run on the event loop that ran the rows
    aclose: Callable[[], Awaitable[None]] | None = None
    #: makes the backend that runs the rows, when the layer that made the function picks it (an LLM
    #: run through OpenAI's Batch API); ``None``: the backend named by the options
    backend: Callable[[], Backend] | None = None
    #: the account of what the rows spend, when the layer that made the function caps it in the
    #: kernel batch by batch (an LLM run's ``budget_usd`` on Modal), given the run's options at the
    #: start of each run (a retry of failed rows spends from the same account); ``None``: no such cap
    account: Callable[[MapOptions], Account | None] | None = None
    #: modules the function's code needs that aren't installed where the rows run (a Modal
    #: container): pickled by value with it, on every run of it (``retry_failed()``'s too)
    by_value: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """What to run: the user's function, how to call it, the options of the run and its runtime needs."""

    fn: Callable[..., Any]
    star: bool  # call fn(*args) (starmap) rather than fn(value)
    is_async: bool
    options: MapOptions
    runtime: Runtime = Runtime()


@dataclass
class Batch:
    """Rows to run together: their positions in the frame and their arguments, in the same order."""

    id: int
    positions: Sequence[int]
    args: list[Any]
    attempt: int = 1  # how many times these rows have been sent (lost batches come back with more)
    max_attempts: int | None = None  # for a lost row: how many sends it gets in all (None: 1 + retries)


@dataclass
class BatchResult:
    """What came back for a batch.

    ``values[i]`` is row ``batch.positions[i]``'s result (``None`` where it failed); ``errors`` lists
    the failed rows as ``(index in batch, type, message, traceback, attempts, exception)``.
    ``lost`` is set, with ``values`` empty, when the batch as a whole never came back.
    """

    batch: Batch
    values: list[Any] = field(default_factory=list)
    errors: list[tuple[int, str, str, str, int, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0  # compute time where the rows ran, for sizing the next batches
    lost: BaseException | None = None
    # lost along with other batches that were running beside it (so maybe not because of its rows)
    lost_with_others: bool = False
    requeue: bool = False  # the batch never started (its worker went away first): send it again as is
    #: each row's wall time where it ran, in batch order (``timings=True`` only; else ``None``)
    row_seconds: list[float] | None = None

    @classmethod
    def from_packed(cls, batch: Batch, data: Any) -> BatchResult:
        """The result of ``batch`` from the bytes a worker or container sent (see ``row_runner.pack_results``)."""
        from .row_runner import unpack_results

        values, errors, elapsed, seconds = unpack_results(data)
        return cls(batch, values, errors, elapsed, row_seconds=seconds)


class BackendFailed(RuntimeError):
    """The backend itself broke mid-run (e.g. the Modal app stopped): the rows not yet back fail with it."""


class Backend(ABC):
    """Runs batches of rows somewhere and reports what finished.

    Capability flags tell the engine what it may ask for. ``capacity`` is how many batches may be in
    flight at once; the engine submits up to that many and then waits in :meth:`results`.
    """

    name: str = ""
    #: per-row timeouts need single-row batches (the backend can only time a whole call)
    timeout_needs_single_rows: bool = False
    #: how long one batch should compute: long enough to amortise the backend's per-batch overhead
    target_batch_s: float = 0.05
    #: the engine may run the last rows in the caller's process when they're too cheap to ship
    inline_when_tiny: bool = False

    @property
    def parallelism(self) -> int:
        """How many batches actually compute at once (``capacity`` may queue more to hide latency)."""
        return self.capacity

    def initial_batch_rows(self, n: int) -> int:
        """Rows in the first batches, before any time per row has been measured."""
        return 1

    def max_batch_rows(self, args: list[Any]) -> int | None:
        """The most rows one batch may hold (e.g. to bound its payload), or ``None`` for no limit."""
        return None

    @abstractmethod
    def start(self, task: Task) -> None:
        """Prepare to run ``task`` (start workers, ship the function)."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many batches may be in flight at once."""

    @abstractmethod
    def submit(self, batch: Batch) -> None:
        """Start running ``batch``; return without waiting for it."""

    def submit_many(self, batches: list[Batch]) -> None:
        """Start several batches; backends with a per-call hand-off cost override it."""
        for batch in batches:
            self.submit(batch)

    @abstractmethod
    def results(self, timeout: float | None) -> list[BatchResult]:
        """Wait up to ``timeout`` seconds for at least one batch to finish; return all finished ones."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop everything in flight now (Stop pressed, or ``on_error="raise"``); results are dropped."""

    def finish(self) -> None:
        """Release what this run held; the backend may keep warm resources for the next run."""

    def containers(self) -> int | None:
        """How many containers/workers are running now, where that's worth showing; else ``None``."""
        return None

    def container_seconds(self) -> float | None:
        """Container-seconds this run has been billed for so far, start to scale-down, where known;
        once the run has ended, the idle time its containers still have before scaling down is
        included, projected (the engine reads it again then, and ``last_run()`` whenever it is asked).

        ``None`` (the default) means the backend doesn't track its containers' lifetimes; a Modal
        run's compute dollars are then estimated from the time its batches measured.
        """
        return None

    def drain_logs(self) -> list[str]:
        """Output lines from where the rows run that arrived since the last call (Modal's logs)."""
        return []

    def status(self) -> str | None:
        """One line on what the rows are waiting for (an OpenAI batch's state), shown on the bar; else ``None``."""
        return None

    def reattach(self, todo: Sequence[int], rows: RunCache) -> list[Batch]:
        """Batches already running for some of the rows in ``todo``, submitted by an earlier run.

        Called once after :meth:`start`, before any batch is submitted, when the run has a result
        cache (``rows`` keys the rows and finds the records). The engine submits none of the rows of
        the batches returned (their ids are the backend's, negative), counts them in flight, and
        collects them through :meth:`results` like its own; a batch that can't be collected after
        all comes back with ``requeue`` set and is sent again. By default there is nothing to adopt.
        """
        return []

    def cancel_submitted(self) -> None:
        """Cancel work this run submitted that would outlive it (an OpenAI batch); ``MapJob.cancel()`` calls it.

        Stop only stops waiting for such work (a re-run collects it); cancelling a job means it. By
        default a backend has nothing that outlives its run.
        """


def error_tuples_for(batch: Batch, exc: BaseException, attempts: int) -> list[tuple[int, str, str, str, int, Any]]:
    """Every row of ``batch`` failing the same way (a setup error that affects the whole batch)."""
    return [(i, type(exc).__name__, str(exc), "", attempts, exc) for i in range(len(batch.args))]


T = TypeVar("T")


_warned_caps: set[tuple[str, str, int]] = set()


def capped_concurrency(requested: int, ceiling: int, what: str, why: str, option: str = "max_containers") -> int:
    """``requested`` limited to ``ceiling``, warning once per requested size when it's capped.

    The ceilings live in :mod:`modal_magic.options` (``process_ceiling()``, ``MAX_THREADS``).

    Examples
    --------
    >>> capped_concurrency(4, 8, "threads", "8 at most")
    4
    """
    if requested <= ceiling:
        return requested
    if (option, what, requested) not in _warned_caps:
        _warned_caps.add((option, what, requested))
        warnings.warn(f"{option}={requested} asks for more {what} than this machine can use: "
                      f"using {ceiling} ({why})", RuntimeWarning, stacklevel=5)
    return ceiling


def drain(outbox: queue.SimpleQueue[T], timeout: float | None) -> list[T]:
    """Wait up to ``timeout`` for one item, then take every item already there."""
    out: list[T] = []
    try:
        out.append(outbox.get(timeout=timeout))
        while True:
            out.append(outbox.get_nowait())
    except queue.Empty:
        pass
    return out


class LoopThread:
    """A private event loop in a daemon thread (a kernel's own loop can't be used from a run)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        """Schedule ``coro`` on the loop; returns a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.thread.is_alive():
            try:  # let async generators close on their own loop before it goes
                self.call(self.loop.shutdown_asyncgens()).result(timeout=10)
            except Exception as e:  # teardown only: the run's outcome is already known
                logging.getLogger("modal_magic").debug("event loop teardown: %s: %s", type(e).__name__, e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
