"""Picking up the Modal calls an earlier run spawned: adopting them in a re-run, listing and collecting them.

Every batch of a ``backend="modal"`` run is a spawned call on a detached app, recorded in the cache
database the moment it exists (:class:`~modal_magic.cache.calls.CallRecords`). When a kernel dies
mid-run, its calls go on. Running the same cell again (same function, rows and result options) in a
new kernel finds their records (:func:`adopt`): those whose rows are among the rows still to run are
collected instead of being sent again, finished or not; a call whose results have expired on
Modal's side is run again. Once nothing recorded is left on the dead kernel's app, the re-run stops
that app (:func:`stop_app`). :func:`recorded_jobs` lists the runs of other kernels that still have
recorded calls, and :func:`collect_job` collects one of them into the cache
(``modal_magic.attach(job_id)``).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ...cache.calls import CallRecord, CallRecords, owner_gone, this_owner
from ..base import Batch, BatchResult

if TYPE_CHECKING:
    from ...cache.rows import RunCache
    from ...options import MapOptions

__all__ = ["Adopted", "RecordedJob", "adopt", "collect", "collect_job", "job_key", "narrow", "open_records",
           "owner_gone", "recorded_jobs", "stop_app"]

#: seconds one poll for a call's output waits before asking again (Modal's own long poll is 55 s)
POLL_S = 50.0
#: runs of this process still collecting their calls: a re-run beside them doesn't take their calls over
LIVE_RUNS: set[str] = set()


def job_key(fingerprint: str) -> str:
    """What a run's calls are recorded under: a hash of the function's fingerprint (with its result options).

    Examples
    --------
    >>> job_key("fp") == job_key("fp"), len(job_key("fp"))
    (True, 32)
    """
    return blake2b(fingerprint.encode("utf-8", "surrogatepass"), digest_size=16, person=b"mm-modal-job").hexdigest()


def open_records(options: MapOptions | None = None) -> CallRecords | None:
    """The call records of the default cache, or ``None`` with ``cache=False`` or a cache that can't be written."""
    if options is not None and options.cache is False:
        return None
    try:
        from ...cache.database import DB_NAME
        from ...cache.default import default_cache
        from ...cache.location import default_cache_dir

        if options is None and not (default_cache_dir() / DB_NAME).exists():
            return None  # only looking: no cache, no records (and no cache made for it)
        cache = default_cache()
    except Exception:  # the run says the cache is off; it just can't be picked up after a restart
        return None
    return None if cache.read_only else CallRecords(cache.directory)


@dataclass
class Adopted:
    """A recorded call taken over by this run: its batch (this run's positions) and the record's rows it fills."""

    batch: Batch
    record: CallRecord
    rows: list[int]  # for each of batch.positions, the index of its row in the call's output


def adopt(records: CallRecords, rows: RunCache, todo: Sequence[int]) -> list[Adopted]:
    """The recorded calls holding some of the rows in ``todo``, oldest first; each row taken at most once.

    Records of runs of this process that are still collecting them are left to those runs.
    """
    job = job_key(rows.hasher.fingerprint)
    if not records.has_job(job):  # the usual case: no key is computed
        return []
    found = [r for r in records.open(job) if r.run not in LIVE_RUNS]
    if not found:
        return []
    positions = np.asarray(todo, dtype=np.intp)
    waiting: dict[bytes, list[int]] = defaultdict(list)
    for position, key in zip(positions.tolist(), rows.row_keys(positions)):
        if key is not None:
            waiting[key].append(position)
    adopted = []
    for number, record in enumerate(found, 1):
        taken, indices = [], []
        for i, key in enumerate(record.keys):
            if key is not None and waiting.get(key):
                taken.append(waiting[key].pop(0))
                indices.append(i)
        if taken:
            batch = Batch(-number, taken, [rows.args[p] for p in taken])
            adopted.append(Adopted(batch, record, indices))
    _forget_cached(records, rows, [r for r in found if r not in {a.record for a in adopted}])
    return adopted


def _forget_cached(records: CallRecords, rows: RunCache, unadopted: list[CallRecord]) -> None:
    """Forget records whose rows are all in this frame but none left to run: the cache has them (a
    kernel died between caching a call's rows and deleting its record)."""
    if not unadopted:
        return
    present = set(rows.row_keys(range(len(rows.args))))
    records.forget([r.call_id for r in unadopted if all(k is None or k in present for k in r.keys)])


def narrow(batch: Batch, output: tuple[int, Any], rows: list[int] | None) -> BatchResult:
    """The result of ``batch`` from a call's output ``(batch id, packed outcomes)``; ``rows`` picks this
    run's rows out of the call's (None: all of them)."""
    packed = output[1]
    if rows is None:
        return BatchResult.from_packed(batch, packed)
    full = BatchResult.from_packed(Batch(batch.id, list(range(max(rows) + 1)), []), packed)
    where = {row: i for i, row in enumerate(rows)}
    values = [full.values[row] for row in rows]
    errors = [(where[e[0]], *e[1:]) for e in full.errors if e[0] in where]
    seconds = None if full.row_seconds is None else [full.row_seconds[row] for row in rows]
    return BatchResult(batch, values, errors, full.elapsed_s, row_seconds=seconds)  # type: ignore[arg-type]


async def collect(call: Any, *, fresh: bool = False) -> tuple[str, Any]:
    """Wait for a spawned call: ``("done", output)``, ``("expired", None)`` or ``("lost", exception)``.

    ``fresh``: just spawned by this run, so its outputs can't have expired.
    """
    from modal.exception import OutputExpiredError

    # Never get() without a timeout: on a call whose outputs expired it would poll forever. And the
    # client keeps polling an expired call until its timeout, so the first look doesn't wait.
    wait = POLL_S if fresh else 0.0
    while True:
        try:
            return "done", await call.get.aio(timeout=wait)
        except asyncio.CancelledError:
            raise
        except OutputExpiredError:  # no output, and no input left running
            return "expired", None
        except Exception as e:
            if type(e) is TimeoutError:  # still running (FunctionTimeoutError, a subclass, is an outcome)
                wait = POLL_S
                continue
            return "lost", e  # lost with its container, timed out, cancelled, or its app is gone


def call_from_id(call_id: str) -> Any:
    """A handle on a spawned call, by its id (collected with :func:`collect`)."""
    import modal

    return modal.FunctionCall.from_id(call_id)


async def stop_app(app_id: str) -> None:
    """Stop a Modal app by id (an orphan left by a dead kernel: its containers and anything left in it)."""
    import modal
    from modal._utils.async_utils import synchronizer
    from modal.app import _App

    # modal 1.6 has a public App.stop() but no public handle on an app by id (only by deployed name);
    # _new_remote is what App.lookup builds, without the lookup. The pinned client's tests cover it.
    client = synchronizer._translate_in(await modal.Client.from_env.aio())
    app = synchronizer._translate_out(_App._new_remote(None, app_id, "", client))
    await app.stop.aio()


async def stop_orphans(records: CallRecords, apps: dict[str, str], keep: str | None) -> list[str]:
    """Stop each of ``apps`` (app id -> the owner that spawned on it) whose owner is gone and that has no
    recorded call left; ``keep`` is this kernel's own app. Returns the apps stopped."""
    stopped = []
    for app_id, owner in apps.items():
        if app_id == keep or owner == this_owner() or not owner_gone(owner) or records.of_app(app_id):
            continue
        try:
            await stop_app(app_id)
            stopped.append(app_id)
        except Exception:  # already stopped, or gone: nothing is left running either way
            pass
    return stopped


# --- other kernels' jobs: jobs() and attach() -------------------------------------------------------


@dataclass(frozen=True)
class RecordedJob:
    """A run of another kernel with calls still recorded: what ``modal_magic.jobs()`` lists for it."""

    id: str
    function: str
    rows_pending: int
    calls: int
    app_ids: tuple[str, ...]
    age_s: float
    owner: str

    def done(self) -> bool:
        """False: a recorded job is one still to collect (as ``MapJob.done()`` says of a running one)."""
        return False

    def __repr__(self) -> str:
        apps = ", ".join(self.app_ids)
        return (f"<RecordedJob {self.id} {self.function!r}: {self.rows_pending:,} rows in {self.calls} Modal calls "
                f"on {apps}, spawned {self.age_s:,.0f}s ago by {self.owner}; modal_magic.attach({self.id!r}) "
                "collects them into the cache>")


def recorded_jobs(records: CallRecords | None = None) -> list[RecordedJob]:
    """The runs of other processes whose calls are recorded and not yet collected, oldest first."""
    records = records if records is not None else open_records()
    if records is None:
        return []
    runs: dict[str, list[CallRecord]] = defaultdict(list)
    for record in records.all():
        if record.owner != this_owner() and record.run not in LIVE_RUNS:
            runs[record.run].append(record)
    now = time.time()
    return [RecordedJob(run, calls[0].function, sum(len(c.keys) for c in calls), len(calls),
                        tuple(dict.fromkeys(c.app_id for c in calls)), now - calls[0].created, calls[0].owner)
            for run, calls in runs.items()]


def collect_job(job_id: str, on_rows: Callable[[int, int], None] | None = None) -> Any:
    """Collect every recorded call of run ``job_id`` into the cache; return a frame of the rows collected.

    The frame has one row per row of the calls: ``key`` (its cache key, hex), ``result`` and ``error``
    (``"Type: message"`` for a row that failed, or whose results had expired on Modal). Running the
    cell that started the job again is then served from the cache. ``on_rows(done, failed)`` is called
    as calls come back.
    """
    import pandas as pd

    from ...cache.default import default_cache
    from ..base import LoopThread

    records = open_records()
    calls = [r for r in records.all() if r.run == job_id] if records is not None else []
    if records is None or not calls:
        raise KeyError(f"no recorded Modal job {job_id!r} (modal_magic.jobs() lists them)")
    cache = default_cache()
    LIVE_RUNS.add(job_id)
    loop = LoopThread("modal_magic-attach")
    keys: list[str] = []
    results: list[Any] = []
    errors: list[str | None] = []
    try:
        def take(record: CallRecord, kind: str, output: Any) -> None:
            n = len(record.keys)
            if kind == "done":
                result = narrow(Batch(0, list(range(n)), []), output, None)
                failed = {e[0]: f"{e[1]}: {e[2]}" for e in result.errors}
                good = [i for i in range(n) if i not in failed and record.keys[i] is not None]
                if good:
                    packed = np.frombuffer(b"".join(record.keys[i] for i in good), dtype=np.uint8).reshape(len(good), -1)
                    cache.put_packed(packed, [result.values[i] for i in good])
                row_errors = [failed.get(i) for i in range(n)]
                values = [None if i in failed else result.values[i] for i in range(n)]
            else:
                why = ("OutputExpired: its results had expired on Modal; re-running the cell runs these rows again"
                       if kind == "expired" else f"{type(output).__name__}: {output}")
                row_errors, values = [why] * n, [None] * n
            keys.extend(k.hex() if k is not None else "" for k in record.keys)
            results.extend(values)
            errors.extend(row_errors)
            records.forget([record.call_id])
            if on_rows is not None:
                bad = sum(e is not None for e in row_errors)
                on_rows(n - bad, bad)

        async def gather() -> None:
            async def one(record: CallRecord) -> None:
                take(record, *await collect(call_from_id(record.call_id)))

            await asyncio.gather(*(one(r) for r in calls))

        loop.call(gather()).result()
        apps = {r.app_id: r.owner for r in calls}
        loop.call(stop_orphans(records, apps, None)).result()
    finally:
        LIVE_RUNS.discard(job_id)
        loop.stop()
        records.close()
    return pd.DataFrame({"key": keys, "result": results, "error": errors})
