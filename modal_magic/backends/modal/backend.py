"""``backend="modal"``: batches of rows stream through one ``Function.map`` on a warm session's runner.

A run takes the warm session for its container spec (see :mod:`~modal_magic.backends.modal.session`),
pickles the user's function once into a runner (:func:`pack_runner`: its bytes and a token that names
them) and maps over the session's generic function with ``order_outputs=False``. Each input is
``(token, bytes or None, batch_id, rows)``: the first batches of a function the session hasn't seen
carry its bytes, later ones don't, and a container that doesn't know the token yet answers "need
function", so that batch goes again with them. Each input returns per-row outcomes, so a row's
exception never fails its input; an input lost with its container (crash, timeout, preemption) comes
back as an exception with no index, and is identified once every other input in flight has
returned, then retried split by the engine.

All Modal calls run on the session's private event loop in a background thread: a Jupyter kernel's
main thread already runs a loop, where Modal's blocking API refuses to work. Stop cancels this run's
call; the containers stay warm for the next cell (``keep_warm=0`` stops them with the run).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import queue
from typing import Any

import cloudpickle

from ...options import DEFAULT_MODAL_CONTAINERS
from ...shipping import by_value, dumps_function
from .. import row_runner
from ..base import Backend, BackendFailed, Batch, BatchResult, Task
from . import session as sessions
from .container import NEED_FUNCTION
from .setup import check_credentials, check_python_version, check_reachable, lost_cause

__all__ = ["ModalBackend", "pack_runner"]

#: Modal inlines arguments up to 2 MiB; keep batches well under it so most inputs avoid a blob round trip
PAYLOAD_TARGET_BYTES = 1 << 20
#: remote inputs should compute long enough to hide Modal's per-input overhead
TARGET_BATCH_S = 1.0
#: containers to plan batches for when max_containers isn't set (Modal scales further on its own)
DEFAULT_CONTAINERS = DEFAULT_MODAL_CONTAINERS
_DONE = object()


class _Stale(Exception):
    """The warm session's app was gone when this run's call started (stopped by Modal, or a restarted server)."""


def pack_runner(task: Task) -> tuple[bytes, str]:
    """The user's function wrapped as a batch runner, pickled for containers; and a token naming it.

    The runner code and the user's own modules travel by value (containers have neither), and so
    does whatever the caller registered by value (the LLM row code).
    """
    opts = task.options
    runner = row_runner.batch_runner(task.fn, task.star, opts.retries, opts.timeout, task.is_async,
                                     timings=opts.timings)
    with by_value([row_runner.__name__, *cloudpickle.list_registry_pickle_by_value()]):
        payload = dumps_function(runner)
    return payload, hashlib.sha256(payload).hexdigest()[:32]


class ModalBackend(Backend):
    """A warm session per container spec; this run's batches stream through one ``map`` call on it."""

    name = "modal"
    timeout_needs_single_rows = True
    target_batch_s = TARGET_BATCH_S

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight: dict[int, Batch] = {}
        self._lost: list[BaseException] = []
        self._session: sessions.WarmSession | None = None
        self._map: Any = None  # concurrent.futures.Future of this run's map call
        self._inputs: asyncio.Queue[Any] | None = None
        self._news: list[str] = []
        self._payload = b""
        self._token = ""
        self._with_payload = 0  # batches still to send with the function's bytes
        self._outputs = 0  # outputs this run has had (a call that fails before any may be a stale session)
        self._restarted = False

    # capacity: enough inputs queued that no container waits for its next one
    @property
    def capacity(self) -> int:
        return 2 * self.parallelism

    @property
    def parallelism(self) -> int:
        return self._options.max_containers or DEFAULT_CONTAINERS

    def max_batch_rows(self, args: list[Any]) -> int | None:
        sample = args[:: max(1, len(args) // 64)][:64]
        if not sample:
            return None
        per_row = max(1, len(row_runner.dumps(sample)) // len(sample))
        return max(1, PAYLOAD_TARGET_BYTES // per_row)

    def initial_batch_rows(self, n: int) -> int:
        return max(1, math.ceil(n / (self.parallelism * 4)))

    def start(self, task: Task) -> None:
        self._options = opts = task.options
        check_python_version(opts)
        check_credentials()
        check_reachable()
        self._payload, self._token = pack_runner(task)
        self._session, news = sessions.acquire(opts, run=self)
        self._news.append(news)
        self._start_map()

    def _start_map(self) -> None:
        assert self._session is not None and self._session.loop is not None
        if self._token not in self._session.known_tokens:
            # Containers that are up get the bytes with these; one started later asks for them.
            self._with_payload = self.parallelism
            self._session.known_tokens.add(self._token)
        self._inputs = asyncio.Queue()
        self._map = self._session.loop.call(self._run_map(self._session, self._inputs))

    def _restart(self) -> None:
        """The warm app was gone: start a new session and send it every batch still out."""
        assert self._session is not None
        sessions.release(self._session, broken=True, run=self)
        self._session = None
        self._session, _ = sessions.acquire(self._options, run=self)
        self._news.append(f"new containers: the warm Modal app had stopped; started {self._session.app_id}")
        self._restarted = True
        self._start_map()
        for batch in self._in_flight.values():
            self._send(batch, True)

    @staticmethod
    async def _feed(inputs: asyncio.Queue[Any]) -> Any:
        while True:
            item = await inputs.get()
            if item is _DONE:
                return
            yield item

    async def _run_map(self, session: sessions.WarmSession, inputs: asyncio.Queue[Any]) -> None:
        outputs = 0
        try:
            async for output in session.function.map.aio(self._feed(inputs), order_outputs=False,
                                                         return_exceptions=True):
                outputs += 1
                self._outbox.put(output)
            self._outbox.put(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            gone = type(e).__name__ == "NotFoundError" or session.failure is not None
            if gone and outputs == 0 and session.runs_total > 1 and not self._restarted:
                self._outbox.put(_Stale(str(e)))
            else:
                self._outbox.put(BackendFailed(f"the Modal run failed: {type(e).__name__}: {e}"))

    def containers(self) -> int | None:
        return self._session.containers if self._session is not None else None

    def container_seconds(self) -> float | None:
        return sessions.run_seconds(self)  # start to scale-down, this run's share (see container_time)

    def drain_logs(self) -> list[str]:
        news, self._news = self._news, []
        return news + sessions.SINK.drain()

    def _send(self, batch: Batch, with_payload: bool) -> None:
        assert self._session is not None and self._session.loop is not None and self._inputs is not None
        item = (self._token, self._payload if with_payload else None, batch.id, batch.args)
        self._session.loop.loop.call_soon_threadsafe(self._inputs.put_nowait, item)

    def submit(self, batch: Batch) -> None:
        self._in_flight[batch.id] = batch
        self._send(batch, self._with_payload > 0)
        self._with_payload -= 1

    def results(self, timeout: float | None) -> list[BatchResult]:
        out: list[BatchResult] = []
        try:
            item = self._outbox.get(timeout=timeout)
            while True:
                out.extend(self._take(item))
                item = self._outbox.get_nowait()
        except queue.Empty:
            pass
        if self._lost and len(self._lost) >= len(self._in_flight):
            # Every input still out is one of the lost ones: now we know which they were.
            cause = lost_cause(self._lost[0])
            out.extend(BatchResult(batch, lost=cause) for batch in self._in_flight.values())
            self._in_flight.clear()
            self._lost.clear()
        return out

    def _take(self, item: Any) -> list[BatchResult]:
        if isinstance(item, BackendFailed):
            raise item
        if isinstance(item, _Stale):
            self._restart()
            return []
        if item is _DONE:
            return []
        if isinstance(item, BaseException):  # an input lost with its container; which one is known later
            self._lost.append(item)
            return []
        if item[0] == NEED_FUNCTION:  # a container started after the first batches: send it the function
            self._send(self._in_flight[item[1]], True)
            return []
        batch_id, packed = item
        batch = self._in_flight.pop(batch_id)
        return [BatchResult.from_packed(batch, packed)]

    def cancel(self) -> None:
        if self._map is not None:
            self._map.cancel()  # this run's call stops; the containers stay warm unless keep_warm=0

    def finish(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._map is not None and not self._map.done() and session.loop is not None:
            session.loop.loop.call_soon_threadsafe(self._inputs.put_nowait, _DONE)  # type: ignore[union-attr]
        broken = False
        if self._map is not None:
            try:
                self._map.result(timeout=30)
            except concurrent.futures.CancelledError:  # Stop: the containers stay warm
                pass
            except concurrent.futures.TimeoutError:  # the call didn't end by itself: don't trust the session
                self._map.cancel()
                broken = True
        sessions.release(session, broken=broken or session.failure is not None, run=self)
