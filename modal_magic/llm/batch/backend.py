"""The backend that runs an LLM map through OpenAI's Batch API: submit, record, wait, collect.

The engine hands :class:`BatchBackend` every row still to run (the cache has already answered the
rest) in one go. A thread of its own then, without blocking the engine's loop (so Stop works):

1. builds one request line per distinct row (:mod:`.requests`) and looks in the cache database
   for batches recorded for these rows (:class:`~modal_magic.cache.batches.BatchRecords`): a row
   already in a batch that was submitted earlier, by this process or another, is collected from
   it and never submitted again;
2. keeps, in order, the rows whose worst case fits ``budget_usd`` at batch prices (the rest get
   ``BudgetExceeded`` before anything is uploaded), splits them over the API's limits, and for
   each batch uploads the file (recorded at once), creates the batch (its id recorded at once);
3. polls every batch, showing its status and request counts on the bar, and when one ends
   downloads its output and error files and hands each row its answer columns or its error
   (:mod:`.outcomes`), in engine batches the engine caches as they arrive.

Pressing Stop stops the waiting, not the batches: they keep running at OpenAI, and running the
cell again collects them. :meth:`BatchBackend.cancel_batches` cancels them for real (where a
background job handle's ``cancel()`` would plug in).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

from ...backends.base import Backend, Batch, BatchResult, Task, drain
from ...cache.batches import BatchRecords
from ...cache.keys import row_keys
from ..row.failures import redact, redact_url, url_secrets
from ..row.limits import Limits, Meter
from ..row.session import Session
from .outcomes import BatchFailed, BatchLost, outcome, read_lines, unfinished_error
from .requests import SETTINGS, PlannedRequest, fit_budget, plan_requests, split

if TYPE_CHECKING:
    from ..row.limits import Request

__all__ = ["BatchBackend", "BatchRun", "BatchStillRunning", "request_scope"]

_TERMINAL = ("completed", "expired", "cancelled", "failed")
_log = logging.getLogger("modal_magic")


def request_scope(request: Request, base_url: str | None) -> str:
    """What a batch's requests are, as a hash: every field that goes into a request line, and the endpoint.

    Batches are recorded under it, and the rows' ``custom_id`` values are keyed by it, so a batch is found
    again by any run that would send the same requests there (in another process, or after the
    notebook's code around it changed), and by no other. The key is not part of it.

    Examples
    --------
    >>> from modal_magic.llm.row.limits import Request
    >>> a = Request(template="Say {t}", fields=("t",), model="m", into="a")
    >>> request_scope(a, None) == request_scope(replace(a, into="b"), None), request_scope(a, None) == request_scope(a, "http://x/v1")
    (True, False)
    """
    import json

    lines = {"template": request.template, "fields": request.fields, "model": request.model, "system": request.system,
             "temperature": request.temperature, "max_tokens": request.max_tokens,
             "response_format": request.response_format, "extra_body": request.extra_body,
             "endpoint": redact_url(base_url) or "api.openai.com"}
    text = json.dumps(lines, sort_keys=True, default=repr)
    return blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=b"mm-llm-batch").hexdigest()


class BatchStillRunning(UserWarning):
    """The run stopped waiting, but its batches go on at OpenAI; running the cell again collects them."""


class BatchRun:
    """What every run of one ``df.modal.llm(..., batch=True)`` call shares: its retries included.

    The request (at batch prices), the key and endpoint, and the budget with what earlier runs of
    the same call spent, so ``out.modal.retry_failed()`` spends only what is left.
    """

    def __init__(self, request: Request, batch_price: tuple[float, float] | None, *, api_key: str | None,
                 base_url: str | None, max_output_tokens: int, budget_usd: float | None) -> None:
        self.request = replace(request, price=batch_price)
        self.api_key = api_key
        self.base_url = base_url
        self.max_output_tokens = max_output_tokens
        self.budget_usd = budget_usd
        self.spent_usd = 0.0  # what the answers collected so far cost
        self.booked_usd = 0.0  # the worst case of batches submitted and not yet collected
        self.lock = threading.Lock()

    def backend(self) -> BatchBackend:
        """A backend for one run (the engine makes one per run, a retry's included)."""
        return BatchBackend(self)

    def __repr__(self) -> str:  # never the key
        return f"<BatchRun model={self.request.model!r} base_url={redact_url(self.base_url)!r}>"

    def __reduce__(self) -> Any:
        raise TypeError("a BatchRun holds an API key and is never pickled")


@dataclass
class _Tracked:
    """A batch the run waits for, and the requests of this run it answers."""

    file_id: str
    batch_id: str
    requests: list[PlannedRequest]
    status: str = "validating"
    done: int = 0
    total: int = 0
    picked_up: bool = False  # submitted by an earlier run


@dataclass
class _Handed:
    """Queued after a batch's rows: the engine has its answers once this is drained."""

    file_id: str
    keys: list[bytes] = field(default_factory=list)


class BatchBackend(Backend):
    """Runs every row of an LLM map as one request of an OpenAI batch; see the module's docstring."""

    name = "openai-batch"
    target_batch_s = 1e9  # never sized from timings: the engine sends fixed-size groups of rows

    def __init__(self, run: BatchRun) -> None:
        self.run = run
        self._outbox: queue.SimpleQueue[BatchResult | _Handed] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._records: BatchRecords | None = None
        self._to_mark: list[_Handed] = []
        self._tracked: dict[str, _Tracked] = {}
        self._status: str | None = None
        self._cancelled: set[str] = set()  # batch ids this run cancelled at OpenAI
        self._client: Any = None
        self._secrets = (run.api_key, *url_secrets(run.base_url))
        # Where each row's outcome goes: its engine batch, and what is still missing in each.
        self._batches: dict[int, Batch] = {}
        self._batch_of: dict[int, int] = {}
        self._missing: dict[int, int] = {}
        self._values: dict[int, Any] = {}
        self._errors: dict[int, BaseException] = {}
        self._started = time.monotonic()
        self._waiting_files: dict[str, tuple[set[int], list[bytes]]] = {}

    # --- the Backend interface ---------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 1 << 40  # every row at once: they all go into the batch file(s)

    def start(self, task: Task) -> None:
        self._task = task
        self._scope = request_scope(self.run.request, self.run.base_url)
        self._refresh = task.options.cache == "refresh"
        try:
            from ...cache.default import default_cache

            cache = default_cache()
            if cache.read_only:
                raise PermissionError(f"{cache.path} is read-only")
            self._records = BatchRecords(cache.directory)
        except Exception as e:  # an unusable cache: the run goes on, but can't be picked up after a restart
            warnings.warn(f"the batch can't be recorded in the result cache ({type(e).__name__}: {e}): if this "
                          "process stops before it finishes, running the cell again submits it again",
                          BatchStillRunning, stacklevel=3)

    def submit(self, batch: Batch) -> None:
        self.submit_many([batch])

    def submit_many(self, batches: list[Batch]) -> None:
        for batch in batches:
            self._batches[batch.id] = batch
            self._missing[batch.id] = len(batch.positions)
            for position in batch.positions:
                self._batch_of[int(position)] = batch.id
        if self._thread is not None:
            raise RuntimeError("BatchBackend takes every row of a run in one submit_many call")
        self._thread = threading.Thread(target=self._work, args=(batches,), name="modal_magic-llm-batch", daemon=True)
        self._thread.start()

    def results(self, timeout: float | None) -> list[BatchResult]:
        self._mark_handed()
        found = drain(self._outbox, timeout)
        results = [r for r in found if isinstance(r, BatchResult)]
        self._to_mark += [r for r in found if isinstance(r, _Handed)]
        return results

    def status(self) -> str | None:
        return self._status

    def cancel(self) -> None:
        # The engine stopped part-way through the last results it was handed (Stop, on_error="raise"),
        # so they may not all be cached: leave their batches for the next run to collect again.
        self._to_mark = []
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        running = [t.batch_id for t in self._tracked.values()
                   if t.status not in _TERMINAL and t.batch_id not in self._cancelled]
        if running:
            warnings.warn(
                f"stopped waiting for OpenAI batch{'es' if len(running) > 1 else ''} {', '.join(running)}: "
                f"{'they keep' if len(running) > 1 else 'it keeps'} running at OpenAI. Run the cell again to collect "
                "the answers (nothing is submitted twice), or modal_magic.llm.cancel_batches() to cancel "
                f"{'them' if len(running) > 1 else 'it'}", BatchStillRunning, stacklevel=2)

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        # The engine has stored the answers of every batch of results it was handed (results() ran).
        self._mark_handed()
        if self._client is not None:
            self._client.close()
            self._client = None

    def cancel_batches(self) -> list[str]:
        """Cancel this run's batches at OpenAI (their unanswered rows end ``BatchCancelled``); return their ids."""
        ids = [t.batch_id for t in self._tracked.values() if t.status not in _TERMINAL]
        for batch_id in ids:
            self._openai().batches.cancel(batch_id)
        self._cancelled.update(ids)  # asked for: no "keeps running" warning when the run stops waiting
        return ids

    def cancel_submitted(self) -> None:
        self.cancel_batches()

    # --- the thread ----------------------------------------------------------------------------------

    def _work(self, batches: list[Batch]) -> None:
        rows = [(int(p), tuple(a)) for b in batches for p, a in zip(b.positions, b.args)]
        try:
            self._run(rows)
        except Exception as e:  # the batch machinery itself broke: every row still out fails with it
            failure = BatchFailed(f"the batch run broke: {type(e).__name__}: {self._clean(str(e))}")
            _log.debug("batch run failed", exc_info=True)
            self._resolve({p: (None, failure) for p, _ in rows if p not in self._values and p not in self._errors})

    def _run(self, rows: list[tuple[int, tuple[Any, ...]]]) -> None:
        run = self.run
        session = Session(run.request, Limits(), Meter(run.request.price is not None), api_key=None, base_url=None)
        keys = row_keys(self._scope, [values for _, values in rows], star=True)
        planned, errors = plan_requests(session, rows, keys, run.max_output_tokens, run.request.price)
        self._resolve({p: (None, e) for p, e in errors.items()})
        too_big = [r for r in planned.values() if len(r.line) > SETTINGS.max_bytes]
        for request in too_big:
            del planned[request.custom_id]
            error = ValueError(f"this row's request is {len(request.line):,} bytes, more than one batch file may "
                               f"hold ({SETTINGS.max_bytes:,}): shorten the prompt, or run it without batch=True")
            self._resolve({p: (None, error) for p in request.positions})
        self._pick_up(planned)
        tracked = {r.custom_id for t in self._tracked.values() for r in t.requests}
        fresh = sorted((r for r in planned.values() if r.custom_id not in tracked), key=lambda r: r.positions[0])
        with run.lock:
            kept, refused = fit_budget(fresh, run.budget_usd, run.spent_usd + run.booked_usd)
        if refused is not None:
            self._resolve({p: (None, refused) for r in fresh[len(kept):] for p in r.positions})
        for group in split(kept, SETTINGS):
            if self._stop.is_set():
                return
            self._submit(group)
        self._wait(session)

    def _pick_up(self, planned: dict[str, PlannedRequest]) -> None:
        """Attach this run's rows to the recorded batches that hold them, instead of submitting them again."""
        if self._records is None or self._refresh:
            return
        by_key = {r.key: r for r in planned.values() if r.key is not None}
        for record in self._records.open(self._scope):
            mine = [by_key.pop(k) for k in record.keys if k in by_key]
            if not mine:
                continue
            batch_id = record.batch_id or self._find_batch(record.file_id)
            if batch_id is None:  # uploaded, but the process stopped before the batch was created
                self._records.forget(record.file_id)
                for request in mine:
                    by_key[request.key] = request  # type: ignore[index]
                continue
            if record.batch_id is None:
                self._records.created(record.file_id, batch_id)
            self._track(_Tracked(record.file_id, batch_id, mine, picked_up=True))

    def _find_batch(self, file_id: str) -> str | None:
        """The batch created from ``file_id``, among the endpoint's recent batches; ``None`` when there is none."""
        for i, batch in enumerate(self._openai().batches.list(limit=100)):
            if batch.input_file_id == file_id:
                return batch.id
            if i >= 1000:
                break
        return None

    def _submit(self, group: list[PlannedRequest]) -> None:
        import openai

        client = self._openai()
        data = b"".join(r.line for r in group)
        file_id = None
        try:
            uploaded = client.files.create(file=("modal_magic_batch.jsonl", data), purpose="batch")
            file_id = uploaded.id
            if self._records is not None:
                self._records.uploaded(self._scope, file_id, [r.key for r in group if r.key is not None],
                                       sum(r.worst_usd for r in group))
            created = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h",
                                            metadata={"created_by": "modal_magic", "requests": str(len(group))})
        except openai.OpenAIError as e:
            if file_id is not None and self._records is not None:
                self._records.forget(file_id)
            error = BatchFailed(f"submitting the batch to {self._where()} failed: {type(e).__name__}: "
                                f"{self._clean(str(e))}; nothing was submitted for this row")
            self._resolve({p: (None, error) for r in group for p in r.positions})
            return
        if self._records is not None:
            self._records.created(file_id, created.id)
        with self.run.lock:  # its worst case stays booked until its answers say what it cost
            self.run.booked_usd += sum(r.worst_usd for r in group)
        self._track(_Tracked(file_id, created.id, group, status=created.status))

    def _track(self, tracked: _Tracked) -> None:
        tracked.total = len(tracked.requests)
        self._tracked[tracked.file_id] = tracked
        positions = {p for r in tracked.requests for p in r.positions}
        self._waiting_files[tracked.file_id] = ({self._batch_of[p] for p in positions},
                                               [r.key for r in tracked.requests if r.key is not None])
        self._show()

    def _wait(self, session: Session) -> None:
        import openai

        client = self._openai()
        delay = SETTINGS.poll_first_s
        failures = 0
        while not self._stop.is_set():
            waiting = [t for t in self._tracked.values() if t.status not in _TERMINAL]
            if not waiting:
                return
            for tracked in waiting:
                try:
                    batch = client.batches.retrieve(tracked.batch_id)
                except openai.NotFoundError:
                    tracked.status = "failed"
                    self._collect(session, tracked, None, f"{self._where()} doesn't know it (404)")
                    continue
                except openai.OpenAIError as e:
                    failures += 1
                    if failures >= SETTINGS.poll_failures:
                        self._give_up(tracked, e)
                    continue
                failures = 0
                tracked.status = batch.status
                counts = batch.request_counts
                if counts is not None:
                    tracked.done, tracked.total = counts.completed + counts.failed, counts.total or tracked.total
                if batch.status in _TERMINAL:
                    self._collect(session, tracked, batch)
            self._show()
            self._stop.wait(delay)
            delay = min(delay * 2, SETTINGS.poll_max_s)

    def _give_up(self, tracked: _Tracked, error: BaseException) -> None:
        """The endpoint stopped answering: the rows fail, the record stays open for the next run."""
        tracked.status = "lost"
        lost = BatchLost(f"lost contact with OpenAI's batch {tracked.batch_id} ({type(error).__name__}: "
                         f"{self._clean(str(error))}); it may still finish: run the cell again to collect it")
        del self._waiting_files[tracked.file_id]  # not handed over: the next run looks for it again
        self._resolve({p: (None, lost) for r in tracked.requests for p in r.positions})

    def _collect(self, session: Session, tracked: _Tracked, batch: Any, detail: str = "") -> None:
        """The batch ended: give each of its rows its answer columns or its error."""
        client = self._openai()
        lines: dict[str, dict[str, Any]] = {}
        if batch is not None:
            for file_id in (batch.error_file_id, batch.output_file_id):  # an answer wins over an error
                if file_id:
                    lines.update(read_lines(client.files.content(file_id).text))
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            detail = "; ".join(self._clean(str(getattr(e, "message", e))) for e in errors[:3])
        outcomes: dict[int, tuple[Any, BaseException | None]] = {}
        spent = 0.0
        cost_column = self.run.request.columns["cost_usd"]
        for request in tracked.requests:
            line = lines.get(request.custom_id)
            if line is None and tracked.status == "failed":
                value, error = None, unfinished_error(tracked.batch_id, "failed", detail)
            else:
                value, error = outcome(session, tracked.batch_id, line, tracked.status, self._clean)
            if value is not None:
                spent += value.get(cost_column) or 0.0
            usage = getattr(error, "row_usage", None)
            if usage is not None and usage[1] is not None:
                spent += usage[1]
            for position in request.positions:
                outcomes[position] = (dict(value) if value is not None else None, error)
        with self.run.lock:
            self.run.spent_usd += spent
            if not tracked.picked_up:
                self.run.booked_usd = max(0.0, self.run.booked_usd - sum(r.worst_usd for r in tracked.requests))
        self._resolve(outcomes)

    def _resolve(self, outcomes: dict[int, tuple[Any, BaseException | None]]) -> None:
        """File rows' outcomes; hand the engine every engine batch now complete, then the batches they finish."""
        complete: set[int] = set()
        for position, (value, error) in outcomes.items():
            if position in self._values or position in self._errors:
                continue
            if error is not None:
                self._errors[position] = error
            else:
                self._values[position] = value
            batch_id = self._batch_of[position]
            self._missing[batch_id] -= 1
            if self._missing[batch_id] == 0:
                complete.add(batch_id)
        elapsed = time.monotonic() - self._started
        for batch_id in sorted(complete):
            batch = self._batches.pop(batch_id)
            values, errors = [], []
            for i, position in enumerate(batch.positions):
                error = self._errors.get(int(position))
                values.append(None if error is not None else self._values.get(int(position)))
                if error is not None:
                    errors.append((i, type(error).__name__, str(error), "", getattr(error, "attempts", 1), error))
            self._outbox.put(BatchResult(batch, values, errors, elapsed))
        for file_id, (engine_batches, keys) in list(self._waiting_files.items()):
            if self._tracked[file_id].status in _TERMINAL and not (engine_batches & set(self._batches)):
                del self._waiting_files[file_id]
                self._outbox.put(_Handed(file_id, keys))

    def _mark_handed(self) -> None:
        marks, self._to_mark = self._to_mark, []
        if self._records is None:
            return
        for mark in marks:
            self._records.handed(mark.file_id, mark.keys)

    # --- helpers -------------------------------------------------------------------------------------

    def _openai(self) -> Any:
        if self._client is None:
            from ..row.session import openai_client_settings

            import openai

            base_url, query = openai_client_settings(self.run.base_url)
            self._client = openai.OpenAI(api_key=self.run.api_key, base_url=base_url, default_query=query,
                                         max_retries=3, timeout=120.0)
        return self._client

    def _where(self) -> str:
        return redact_url(self.run.base_url) or "api.openai.com"

    def _clean(self, text: str) -> str:
        return redact(" ".join(text.split()), *self._secrets)

    def _show(self) -> None:
        tracked = list(self._tracked.values())
        if not tracked:
            return
        done = sum(t.done if t.status not in ("completed",) else t.total for t in tracked)
        total = sum(t.total for t in tracked)
        states = sorted({t.status for t in tracked})
        picked = sum(t.picked_up for t in tracked)
        what = (f"OpenAI batch {tracked[0].batch_id}" if len(tracked) == 1
                else f"{len(tracked)} OpenAI batches")
        again = f" ({picked} picked up from an earlier run)" if picked else ""
        self._status = f"{what}{again}: {', '.join(states)}, {done:,}/{total:,} requests done"
