"""Runs rows where the work happens: in a worker process, a thread, an event loop, or a Modal container.

:func:`run_rows` (and :func:`run_rows_async`) call the user's function once per row, catch each
row's exception so one bad row can't fail its batch, retry with exponential backoff, and enforce the
per-row timeout where the platform allows it. Whatever a row raises is its error: a
``KeyboardInterrupt`` or ``SystemExit`` from the function too, and an exception whose ``str()``
itself raises (described as ``<unprintable ValueError>``); only a real Ctrl-C delivered to the
calling process's main thread stops the loop. They return plain tuples, never modal_magic objects,
because this file also runs on its own: ``python row_runner.py FD`` is the body of a local worker
process, started by path so a worker doesn't import pandas or the user's ``__main__`` script.
Only the standard library and cloudpickle may be imported here.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

# An error as it travels: (index in batch, type name, message, formatted traceback, attempts, exception or None)
ErrorTuple = tuple[int, str, str, str, int, Any]

#: first wait before retrying a row; doubles each try. (An LLM request's own retries have their
#: schedule, with jitter, in ``llm/row/limits.py``: same idea, same name, but that code must reach
#: containers without this module, so it keeps its own copy.)
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): 0.1, 0.2, 0.4 ... capped at 5.

    Examples
    --------
    >>> [backoff_s(a) for a in (1, 2, 3, 20)]
    [0.1, 0.2, 0.4, 5.0]
    """
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)


class _RowTimeout(BaseException):
    """Raised by the alarm inside the user's code; a BaseException so a bare ``except Exception`` can't eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _RowTimeout()


def describe(exc: BaseException) -> str:
    """``str(exc)``, or ``<unprintable ValueError>`` when that raises (as the traceback module does)."""
    try:
        return str(exc)
    except BaseException:  # noqa: B036 - a broken __str__ may raise anything; describing must not
        return f"<unprintable {type(exc).__name__}>"


def _error_tuple(i: int, exc: BaseException, attempts: int) -> ErrorTuple:
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: B036 - e.g. a __str__ that hangs up on repr too: the row's error still says what
        tb = f"{type(exc).__name__}: {describe(exc)}\n(the traceback could not be formatted)\n"
    # An exception may say how many tries it already took inside one call of the row (an LLM
    # request's own HTTP retries): those count as attempts too. The contract is
    # modal_magic.errors.RowReport, read by name because only the standard library is imported here.
    inner = getattr(exc, "row_attempts", None)
    if isinstance(inner, int) and not isinstance(inner, bool) and inner > 1:
        attempts += inner - 1
    return (i, type(exc).__name__, describe(exc), tb, attempts, exc)


def _timeout_error(timeout: float) -> TimeoutError:
    return TimeoutError(f"the row ran longer than timeout={timeout:g}s")


class _InterruptWatch:
    """Tells a real Ctrl-C from a row that raises ``KeyboardInterrupt`` itself.

    On the main thread, the SIGINT handler in place (Python's default, or the kernel's) is wrapped
    for the duration so a delivered signal is noted; a ``KeyboardInterrupt`` with no signal behind
    it came from the row, and is that row's error like any other exception. Off the main thread,
    or where SIGINT is ignored (worker processes), every ``KeyboardInterrupt`` is the row's.
    """

    signalled = False

    def __init__(self, previous: Callable[..., Any]) -> None:
        self.previous = previous
        signal.signal(signal.SIGINT, self._noted)

    def _noted(self, signum: int, frame: Any) -> None:
        self.signalled = True
        self.previous(signum, frame)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


class _NoSignals:
    """Where no SIGINT handler runs (another thread, a worker ignoring it): nothing to tell apart."""

    signalled = False


_NO_SIGNALS = _NoSignals()
#: set in a local worker process, which ignores SIGINT: every KeyboardInterrupt there is a row's
_IGNORES_SIGINT = False


def run_rows(
    fn: Callable[..., Any],
    star: bool,
    args_list: Sequence[Any],
    retries: int = 0,
    timeout: float | None = None,
    seconds: list[float] | None = None,
) -> tuple[list[Any], list[ErrorTuple]]:
    """Call ``fn`` on each row's arguments; return ``(values, errors)`` with ``None`` where a row failed.

    The timeout is enforced with ``SIGALRM`` when called on a process's main thread (workers and the
    sequential backend); elsewhere the caller enforces it. With ``seconds`` (a list, ``timings=True``)
    each row's wall time, all its tries and their backoff included, is appended to it in row order;
    without it the tight loop measures nothing, so tiny rows pay nothing for the feature.
    """
    # asked each call, not kept in a global: this module travels by value to Modal, and a Thread
    # object (it holds locks) can't be pickled
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main and not _IGNORES_SIGINT else None
    if not callable(handler):
        return _run_rows(fn, star, args_list, retries, timeout, main, _NO_SIGNALS, seconds)
    interrupt = _InterruptWatch(handler)
    try:
        return _run_rows(fn, star, args_list, retries, timeout, main, interrupt, seconds)
    finally:
        interrupt.restore()


def _run_rows(fn: Callable[..., Any], star: bool, args_list: Sequence[Any], retries: int, timeout: float | None,
              main: bool, interrupt: _InterruptWatch | _NoSignals,
              seconds: list[float] | None = None) -> tuple[list[Any], list[ErrorTuple]]:
    use_alarm = timeout is not None and main
    if not use_alarm and not retries and seconds is None:
        return _run_rows_once(fn, star, args_list, interrupt)
    previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    values: list[Any] = [None] * len(args_list)
    errors: list[ErrorTuple] = []
    try:
        for i, args in enumerate(args_list):
            attempt = 1
            began = time.perf_counter()
            while True:
                try:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, timeout)
                    try:
                        values[i] = fn(*args) if star else fn(args)
                    finally:
                        if use_alarm:
                            signal.setitimer(signal.ITIMER_REAL, 0)
                    break
                except _RowTimeout:
                    exc: BaseException = _timeout_error(timeout)  # type: ignore[arg-type]
                except BaseException as e:  # a row's SystemExit or KeyboardInterrupt is that row's error
                    if interrupt.signalled:
                        raise  # Ctrl-C: the caller stops the run
                    exc = e
                if attempt > retries:
                    errors.append(_error_tuple(i, exc, attempt))
                    break
                time.sleep(backoff_s(attempt))
                attempt += 1
            if seconds is not None:
                seconds.append(time.perf_counter() - began)
    finally:
        if previous is not None:
            signal.signal(signal.SIGALRM, previous)
    return values, errors


def _run_rows_once(fn: Callable[..., Any], star: bool, args_list: Sequence[Any],
                   interrupt: _InterruptWatch | _NoSignals) -> tuple[list[Any], list[ErrorTuple]]:
    """:func:`run_rows` without retries or alarms: the tight loop tiny rows need."""
    values: list[Any] = []
    errors: list[ErrorTuple] = []
    append = values.append
    for i, args in enumerate(args_list):
        try:
            append(fn(*args) if star else fn(args))
        except BaseException as e:  # a row's SystemExit or KeyboardInterrupt is that row's error
            if interrupt.signalled:
                raise  # Ctrl-C: the caller stops the run
            append(None)
            errors.append(_error_tuple(i, e, 1))
    return values, errors


class _RowRaised(Exception):
    """Carries a ``KeyboardInterrupt`` or ``SystemExit`` raised by an async row out of its task.

    asyncio lets those two escape a task and stop the event loop itself; wrapped, they stay that
    row's error.
    """

    def __init__(self, raised: BaseException) -> None:
        super().__init__(raised)
        self.raised = raised


async def _guarded(call: Any) -> Any:
    try:
        return await call
    except (KeyboardInterrupt, SystemExit) as e:
        raise _RowRaised(e) from None


async def run_rows_async(
    fn: Callable[..., Any],
    star: bool,
    args_list: Sequence[Any],
    retries: int = 0,
    timeout: float | None = None,
    seconds: list[float] | None = None,
) -> tuple[list[Any], list[ErrorTuple]]:
    """The same as :func:`run_rows` for an ``async def`` function, awaited on the running loop."""
    values: list[Any] = [None] * len(args_list)
    errors: list[ErrorTuple] = []
    for i, args in enumerate(args_list):
        attempt = 1
        began = time.perf_counter()
        while True:
            try:
                call = _guarded(fn(*args) if star else fn(args))
                values[i] = await (asyncio.wait_for(call, timeout) if timeout is not None else call)
                break
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                exc: BaseException = _timeout_error(timeout)  # type: ignore[arg-type]
            except _RowRaised as e:
                exc = e.raised
            except BaseException as e:  # a row's SystemExit or KeyboardInterrupt is that row's error
                exc = e
            if attempt > retries:
                errors.append(_error_tuple(i, exc, attempt))
                break
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1
        if seconds is not None:
            seconds.append(time.perf_counter() - began)
    return values, errors


def dumps(obj: Any) -> bytes:
    """Pickle fast with the standard pickler; fall back to cloudpickle for notebook-defined objects."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=5)


def pack_results(values: list[Any], errors: list[ErrorTuple], elapsed: float,
                 seconds: list[float] | None = None) -> bytes:
    """Serialise a batch's results; a value or exception that can't travel becomes that row's error only.

    The result is ``(values, errors, elapsed)``, with each row's seconds as a fourth item when
    measured (:func:`unpack_results` reads both).
    """
    try:
        return dumps(_packed(values, errors, elapsed, seconds))
    except Exception:  # noqa: BLE001 - a value's own __reduce__ may raise anything: find it row by row
        return _pack_row_by_row(values, errors, elapsed, seconds)


def _packed(values: list[Any], errors: list[ErrorTuple], elapsed: float, seconds: list[float] | None) -> tuple:
    return (values, errors, elapsed) if seconds is None else (values, errors, elapsed, seconds)


def unpack_results(data: Any) -> tuple[list[Any], list[ErrorTuple], float, list[float] | None]:
    """What :func:`pack_results` packed: ``(values, errors, elapsed, seconds or None)``.

    Examples
    --------
    >>> unpack_results(pack_results([1], [], 0.5))
    ([1], [], 0.5, None)
    >>> unpack_results(pack_results([1], [], 0.5, [0.25]))[3]
    [0.25]
    """
    values, errors, elapsed, *seconds = pickle.loads(data)
    return values, errors, elapsed, seconds[0] if seconds else None


def _pack_row_by_row(values: list[Any], errors: list[ErrorTuple], elapsed: float,
                     seconds: list[float] | None = None) -> bytes:
    """:func:`pack_results` for a batch that didn't pickle whole: each row that can't travel says so."""
    safe_errors: list[ErrorTuple] = []
    for err in errors:
        try:
            dumps(err[5])
            safe_errors.append(err)
        except Exception:  # noqa: BLE001 - the exception object can't travel: its type, message and traceback do
            safe_errors.append(err[:5] + (None,))
    failed = {e[0] for e in safe_errors}
    for i, value in enumerate(values):
        if i in failed:
            continue
        try:
            dumps(value)
        except Exception as e:  # noqa: BLE001 - the value's own __reduce__ may raise anything
            values[i] = None
            message = f"the function returned a {type(value).__name__} that can't be pickled: {describe(e)}"
            safe_errors.append((i, "UnpicklableResult", message, "", 1, None))
    return dumps(_packed(values, safe_errors, elapsed, seconds))


def batch_runner(
    fn: Callable[..., Any], star: bool, retries: int, timeout: float | None, is_async: bool,
    timings: bool = False,
) -> Callable[[Any], Any]:
    """The function a Modal container runs: one input is ``(batch_id, [row args...])``.

    It returns ``(batch_id, packed results)`` and never raises for a row, so one bad row can't fail
    its batch; Modal's own retries then apply only to inputs lost with their container. This module
    is shipped to the container by value, so the container needs nothing of modal_magic. With
    ``timings`` each row's seconds travel back too (see :func:`pack_results`).
    """

    def run_batch(item: tuple[int, list[Any]]) -> tuple[int, bytes]:
        batch_id, args_list = item
        started = time.perf_counter()
        seconds: list[float] | None = [] if timings else None
        values, errors = run_rows(fn, star, args_list, retries, timeout, seconds)
        return batch_id, pack_results(values, errors, time.perf_counter() - started, seconds)

    async def run_batch_async(item: tuple[int, list[Any]]) -> tuple[int, bytes]:
        batch_id, args_list = item
        started = time.perf_counter()
        seconds: list[float] | None = [] if timings else None
        values, errors = await run_rows_async(fn, star, args_list, retries, timeout, seconds)
        return batch_id, pack_results(values, errors, time.perf_counter() - started, seconds)

    runner = run_batch_async if is_async else run_batch
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in getattr(fn, "__name__", "fn"))
    runner.__name__ = runner.__qualname__ = f"modal_magic_{name}"
    return runner


# --- the local worker process ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the process that started it dies (no orphans after kill -9)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return  # no libc by that name: the EOF on the pipe still ends an idle worker


class _AsyncBatches:
    """An ``async def`` function's batches in a worker: each one a task on an event loop of its own thread.

    The worker's main thread goes on reading batches while earlier ones are awaited, so one
    worker process keeps many rows in flight (an LLM run's requests); each batch's results are
    sent back the moment it finishes, in whatever order that is.
    """

    def __init__(self, send: Callable[[bytes], None], pid: int) -> None:
        self._send = send
        self._pid = pid
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="modal_magic-worker-loop", daemon=True).start()

    def start(self, batch_id: int, fn: Any, star: bool, args_list: list[Any], retries: int,
              timeout: float | None, timings: bool = False) -> None:
        asyncio.run_coroutine_threadsafe(self._run(batch_id, fn, star, args_list, retries, timeout, timings),
                                         self._loop)

    async def _run(self, batch_id: int, fn: Any, star: bool, args_list: list[Any], retries: int,
                   timeout: float | None, timings: bool) -> None:
        started = time.perf_counter()
        if timeout is not None:  # the kernel's watchdog counts this batch's time from here
            self._send(b"S" + batch_id.to_bytes(8, "little"))
        seconds: list[float] | None = [] if timings else None
        try:
            values, errors = await run_rows_async(fn, star, args_list, retries, timeout, seconds)
        except BaseException as e:  # the row loop itself broke: every row says why, none goes missing
            values, errors = [None] * len(args_list), [_error_tuple(i, e, 1) for i in range(len(args_list))]
            seconds = None
        _exit_if_forked(self._pid)
        elapsed = time.perf_counter() - started
        self._send(b"R" + batch_id.to_bytes(8, "little") + pack_results(values, errors, elapsed, seconds))


def _exit_if_forked(pid: int) -> None:
    """A row forked and its child came back here: the child ends now, before it touches the socket."""
    if os.getpid() != pid:
        os._exit(0)


def _reset(path: list[str], cwd: str, env: dict[str, str]) -> None:
    """Start a run as the kernel is now: its sys.path, working directory and environment."""
    sys.path[:] = path
    if env != os.environ:
        os.environ.clear()
        os.environ.update(env)
    if cwd and os.path.isdir(cwd) and cwd != os.getcwd():
        os.chdir(cwd)


def main(fd: int) -> None:
    """Serve batches over the socket ``fd`` until told to exit or the parent goes away.

    Messages in: ``("run", sys.path, cwd, environ)`` at the start of each run, ``("fn", fn, star,
    retries, timeout, is_async, timings)`` when the function or how it runs changes, ``("batch", id, rows, payload)``, ``("exit",)``. Messages out: ``S`` + id
    when a batch starts (only with a timeout: the kernel's watchdog counts from it) and ``R`` + id +
    results when it ends. The kernel always reads (a thread per worker), so a large result never
    blocks this process for long.
    """
    from multiprocessing.connection import Connection

    global _IGNORES_SIGINT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us itself
    _IGNORES_SIGINT = True
    _die_with_parent()
    pid = os.getpid()
    conn = Connection(fd)
    sending = threading.Lock()  # async batches report from the loop's thread

    def send(data: bytes) -> None:
        with sending:
            conn.send_bytes(data)

    import cloudpickle

    fn: Any = None
    load_error: BaseException | None = None
    star, retries, timeout, is_async, timings = False, 0, None, False, False
    async_batches: _AsyncBatches | None = None
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "batch":
            _, batch_id, n, payload = message
            failure = load_error
            if failure is None:
                try:
                    args_list = pickle.loads(payload)
                except Exception as e:  # e.g. a value's class isn't importable in the worker
                    failure = e
            if failure is None and is_async:
                if async_batches is None:
                    async_batches = _AsyncBatches(send, pid)
                async_batches.start(batch_id, fn, star, args_list, retries, timeout, timings)
                continue
            if timeout is not None:  # the kernel's watchdog counts this batch's time from here
                send(b"S" + batch_id.to_bytes(8, "little"))
            started = time.perf_counter()
            seconds: list[float] | None = None
            if failure is not None:  # every row of the batch fails the same way, and says why
                values, errors = [None] * n, [_error_tuple(i, failure, 1) for i in range(n)]
            else:
                seconds = [] if timings else None
                values, errors = run_rows(fn, star, args_list, retries, timeout, seconds)
            elapsed = time.perf_counter() - started
            _exit_if_forked(pid)
            send(b"R" + batch_id.to_bytes(8, "little") + pack_results(values, errors, elapsed, seconds))
        elif kind == "fn":
            _, fn_bytes, star, retries, timeout, is_async, timings = message
            try:
                fn, load_error = cloudpickle.loads(fn_bytes), None
            except Exception as e:  # e.g. a module the function needs isn't installed in the worker
                fn, load_error = None, e
        elif kind == "run":
            _reset(*message[1:])
        elif kind == "exit":
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
