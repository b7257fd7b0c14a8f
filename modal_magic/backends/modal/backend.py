"""``backend="modal"``: each batch of rows is a call spawned on a warm session's detached app, recorded as it goes.

A run takes the warm session for its container spec (see :mod:`~modal_magic.backends.modal.session`),
pickles the user's function once into a runner (:func:`pack_runner`: its bytes and a token that names
them) and spawns one call of the session's generic function per batch. Each call's input is
``(token, bytes or None, batch_id, rows)``: the first batches of a function the session hasn't seen
carry its bytes, later ones don't, and a container that doesn't know the token yet answers "need
function", so that batch goes again with them. Each call returns per-row outcomes, so a row's
exception never fails its call; a call lost with its container (crash, timeout, preemption) raises,
and the engine retries its rows split.

The session's app is detached and every call is written to the cache database the moment it exists
(:mod:`~modal_magic.cache.calls`), so the batches survive the kernel: running the same cell again in
a new kernel adopts the calls still recorded for its rows (:mod:`.reattach`), collects those that
finished, waits for those in flight, runs again those whose results expired, and submits only the
rows never sent. A record is deleted once its rows were handed to the engine (which caches them).

All Modal calls run on the session's private event loop in a background thread: a Jupyter kernel's
main thread already runs a loop, where Modal's blocking API refuses to work. Stop cancels this run's
calls; the containers stay warm for the next cell (``keep_warm=0`` stops them with the run).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import os
import queue
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import cloudpickle

from ...options import DEFAULT_MODAL_CONTAINERS
from ...shipping import by_value, dumps_function
from .. import row_runner
from ..base import Backend, BackendFailed, Batch, BatchResult, Task, drain
from . import reattach
from . import session as sessions
from .container import NEED_FUNCTION
from .setup import check_credentials, check_python_version, check_reachable, lost_cause

if TYPE_CHECKING:
    from ...cache.calls import CallRecords
    from ...cache.rows import RunCache

__all__ = ["ModalBackend", "pack_runner"]

#: Modal inlines arguments up to 2 MiB; keep batches well under it so most inputs avoid a blob round trip
PAYLOAD_TARGET_BYTES = 1 << 20
#: remote inputs should compute long enough to hide Modal's per-input overhead
TARGET_BATCH_S = 1.0
#: containers to plan batches for when max_containers isn't set (Modal scales further on its own)
DEFAULT_CONTAINERS = DEFAULT_MODAL_CONTAINERS


def pack_runner(task: Task) -> tuple[bytes, str]:
    """The user's function wrapped as a batch runner, pickled for containers; and a token naming it.

    The runner code and the user's own modules travel by value (containers have neither), and so
    do the modules the run's :class:`~modal_magic.backends.base.Runtime` names (the LLM row code)
    and whatever the caller registered by value.
    """
    opts = task.options
    runner = row_runner.batch_runner(task.fn, task.star, opts.retries, opts.timeout, task.is_async,
                                     timings=opts.timings)
    with by_value([row_runner.__name__, *task.runtime.by_value, *cloudpickle.list_registry_pickle_by_value()]):
        payload = dumps_function(runner)
    return payload, hashlib.sha256(payload).hexdigest()[:32]


@dataclass
class _Out:
    """A batch out on Modal: its call, and which send of it the news coming back is about."""

    batch: Batch
    sends: int = 0  # news about an earlier send (before a resend) is stale
    call_id: str | None = None
    future: concurrent.futures.Future[Any] | None = None
    rows: list[int] | None = None  # adopted: which of the call's rows are this batch's
    adopted_from: str | None = None  # adopted: the app it runs on
    owner: str | None = None  # adopted: the kernel that spawned it


class ModalBackend(Backend):
    """A warm session per container spec; each batch is a call spawned on it and recorded for reattaching."""

    name = "modal"
    timeout_needs_single_rows = True
    target_batch_s = TARGET_BATCH_S

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._out: dict[int, _Out] = {}
        self._session: sessions.WarmSession | None = None
        self._news: list[str] = []
        self._payload = b""
        self._token = ""
        self._with_payload = 0  # batches still to send with the function's bytes
        self._outputs = 0  # calls this run has collected (a spawn that fails before any may be a stale session)
        self._restarted = False
        self._records: CallRecords | None = None
        self._rows: RunCache | None = None
        self._job = ""
        self._run = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self._handed: list[str] = []  # call ids whose rows went to the engine: forgotten at the next results()
        self._orphans: dict[str, str] = {}  # apps of adopted calls -> the kernel that spawned on them
        self._adopted_left = 0
        self._expired = 0

    # capacity: enough calls out that no container waits for its next input
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
        self._function = getattr(task.fn, "__name__", "function")
        check_python_version(opts)
        check_credentials()
        check_reachable()
        self._payload, self._token = pack_runner(task)
        self._session, news = sessions.acquire(opts, run=self)
        self._news.append(news)
        self._note_new_token()
        reattach.LIVE_RUNS.add(self._run)

    def _note_new_token(self) -> None:
        assert self._session is not None
        if self._token not in self._session.known_tokens:
            # Every batch of the first round carries the bytes (spawned calls reach containers in no
            # set order); a container started later asks for them.
            self._with_payload = self.capacity
            self._session.known_tokens.add(self._token)

    def reattach(self, todo: Sequence[int], rows: RunCache) -> list[Batch]:
        self._rows = rows
        self._records = reattach.open_records(self._options)
        if self._records is None:
            return []
        self._job = reattach.job_key(rows.hasher.fingerprint)
        adopted = reattach.adopt(self._records, rows, todo)
        for taken in adopted:
            out = self._out[taken.batch.id] = _Out(taken.batch, call_id=taken.record.call_id, rows=taken.rows,
                                                   adopted_from=taken.record.app_id, owner=taken.record.owner)
            self._orphans.setdefault(taken.record.app_id, taken.record.owner)
            self._watch(out, reattach.call_from_id(taken.record.call_id))
        if adopted:
            self._adopted_left = len(adopted)
            apps = ", ".join(self._orphans)
            self._news.append(f"reattached to {len(adopted)} Modal calls ({sum(len(a.batch.positions) for a in adopted):,} "
                              f"rows) spawned by an earlier run on {apps}: collecting them, not sending them again")
        return [taken.batch for taken in adopted]

    # --- sending ---------------------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        self._out[batch.id] = out = _Out(batch)
        self._send(out, self._with_payload > 0)
        self._with_payload -= 1

    def _send(self, out: _Out, with_payload: bool) -> None:
        assert self._session is not None and self._session.loop is not None
        out.sends += 1
        out.rows = out.adopted_from = out.call_id = out.owner = None
        item = (self._token, self._payload if with_payload else None, out.batch.id, out.batch.args)
        out.future = self._session.loop.call(self._spawn(self._session, out, out.sends, item))

    async def _spawn(self, session: sessions.WarmSession, out: _Out, send: int, item: tuple[Any, ...]) -> None:
        try:
            call = await session.function.spawn.aio(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._outbox.put(("spawn-failed", out.batch.id, send, e))
            return
        out.call_id = call.object_id
        if self._records is not None and self._rows is not None:
            try:  # recorded the moment it exists: a kernel that dies now leaves it to the next one
                self._records.spawned(call.object_id, job=self._job, run=self._run, app_id=session.app_id or "",
                                      function=self._function, keys=self._rows.row_keys(out.batch.positions))
            except Exception as e:  # a cache that can't be written: the run goes on, unrecorded
                self._news.append(f"couldn't record Modal call {call.object_id} in the cache: {e}")
        kind, output = await reattach.collect(call, fresh=True)
        self._outbox.put((kind, out.batch.id, send, output))

    def _watch(self, out: _Out, call: Any) -> None:
        assert self._session is not None and self._session.loop is not None
        out.sends += 1

        async def collect(send: int) -> None:
            kind, output = await reattach.collect(call)
            self._outbox.put((kind, out.batch.id, send, output))

        out.future = self._session.loop.call(collect(out.sends))

    def _restart(self) -> None:
        """The warm app was gone: start a new session and send it every batch still out."""
        assert self._session is not None
        sessions.release(self._session, broken=True, run=self)
        self._session = None
        self._session, _ = sessions.acquire(self._options, run=self)
        self._news.append(f"new containers: the warm Modal app had stopped; started {self._session.app_id}")
        self._restarted = True
        self._note_new_token()
        for out in self._out.values():
            if out.adopted_from is None:
                if out.call_id is not None:
                    self._handed.append(out.call_id)  # its app is gone, and the call with it
                self._send(out, True)

    # --- collecting ------------------------------------------------------------------------------

    def containers(self) -> int | None:
        return self._session.containers if self._session is not None else None

    def container_seconds(self) -> float | None:
        return sessions.run_seconds(self)  # start to scale-down, this run's share (see container_time)

    def drain_logs(self) -> list[str]:
        news, self._news = self._news, []
        return news + sessions.SINK.drain()

    def results(self, timeout: float | None) -> list[BatchResult]:
        if sessions.exiting():  # the kernel exits: calls failing with its client stay recorded for the next
            time.sleep(timeout or 0)
            return []
        self._forget_handed()  # the engine has cached what the last call handed it
        out: list[BatchResult] = []
        for kind, batch_id, send, payload in drain(self._outbox, timeout):
            sent = self._out.get(batch_id)
            if sent is None or send != sent.sends:
                continue  # news of an earlier send of a batch that went again
            out.extend(self._take(sent, kind, payload))
        return out

    def _take(self, out: _Out, kind: str, payload: Any) -> list[BatchResult]:
        session = self._session
        assert session is not None
        if kind == "spawn-failed":
            gone = type(payload).__name__ == "NotFoundError" or session.failure is not None
            if gone and self._outputs == 0 and session.runs_total > 1 and not self._restarted:
                self._restart()
                return []
            raise BackendFailed(f"the Modal run failed: {type(payload).__name__}: {payload}")
        adopted = out.adopted_from is not None
        if adopted:
            self._adopted_left -= 1
        if out.call_id is not None:
            self._handed.append(out.call_id)
        if kind == "done" and isinstance(payload, tuple) and payload and payload[0] == NEED_FUNCTION:
            # a container started after the first batches (or one of an earlier kernel's app): send the function
            self._send(out, True)
            return []
        del self._out[out.batch.id]
        if kind == "expired":
            self._expired += 1
            self._say_expired()
            return [BatchResult(out.batch, requeue=True)]
        self._say_expired()
        if kind == "lost":
            return [BatchResult(out.batch, lost=lost_cause(payload))]
        self._outputs += 1
        return [reattach.narrow(out.batch, payload, out.rows)]

    def _say_expired(self) -> None:
        if self._expired and self._adopted_left == 0:
            self._news.append(f"results of {self._expired} batches had expired on Modal; running those rows again")
            self._expired = 0

    def _forget_handed(self) -> None:
        if self._handed and self._records is not None:
            self._records.forget(self._handed)
        self._handed = []
        if self._orphans and self._adopted_left == 0 and self._session is not None:
            self._stop_orphans(self._session)  # while the run still shows what it did

    def _stop_orphans(self, session: sessions.WarmSession) -> None:
        """Stop the apps of dead kernels this run collected everything from (once)."""
        orphans, self._orphans = self._orphans, {}
        if not orphans or self._records is None or session.loop is None:
            return
        try:
            stopped = session.loop.call(reattach.stop_orphans(self._records, orphans, session.app_id)).result(30)
        except Exception as e:
            stopped = []
            self._news.append(f"couldn't stop the earlier run's Modal app: {type(e).__name__}: {e}")
        for app_id in stopped:
            self._news.append(f"stopped Modal app {app_id}: the kernel that ran it is gone and nothing is left on it")

    # --- ending ----------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop: this run's calls are cancelled on Modal (their containers stay warm unless keep_warm=0)."""
        session = self._session
        outs = list(self._out.values())
        for out in outs:
            if out.future is not None:
                out.future.cancel()
        # this run's calls, and those it adopted from a dead kernel; a live kernel's are its own to stop
        calls = [out.call_id for out in outs if out.call_id is not None
                 and (out.owner is None or reattach.owner_gone(out.owner))]
        if session is not None and session.loop is not None and calls:
            try:
                session.loop.call(_cancel_calls(calls)).result(timeout=10)
            except Exception:  # the app may be gone already: its calls with it
                pass
        self._handed.extend(calls)
        self._out.clear()

    def cancel_submitted(self) -> None:
        self.cancel()

    def finish(self) -> None:
        session, self._session = self._session, None
        reattach.LIVE_RUNS.discard(self._run)
        if session is None:
            return
        if self._out:  # the run ended with calls out (a failure): stop them rather than leave them running
            self._session = session
            self.cancel()
            self._session = None
        self._forget_handed()
        self._stop_orphans(session)
        if self._records is not None:
            self._records.close()
        sessions.release(session, broken=session.failure is not None, run=self)


async def _cancel_calls(call_ids: list[str]) -> None:
    await asyncio.gather(*(reattach.call_from_id(c).cancel.aio() for c in call_ids), return_exceptions=True)
