"""Warm Modal sessions: one app per kernel and container spec, kept running between cells.

A :class:`WarmSession` is a ``modal.App`` held open (``async with app.run()``) on a private event
loop in a background thread, with a single function: the generic batch runner of
:mod:`~modal_magic.backends.modal.container`, created with ``scaledown_window=keep_warm`` so Modal
keeps its containers up between runs. Every run whose options give the same spec
(:func:`~modal_magic.backends.modal.setup.spec_of`: image, GPU, CPU, memory, secrets, env, volumes,
timeout, retries, max_containers, keep_warm) maps over that function, so a second cell, with the same
or an edited function, needs no new app, no image build and no container start. A run with another
spec starts another session, and says why ("new containers: gpu T4 → A10G").

A session stops when it has been idle for ``keep_warm`` seconds (Modal stops its containers on the
same clock), at :func:`shutdown_sessions` (``modal_magic.shutdown()``) and when the kernel exits;
with ``keep_warm=0`` it stops at the end of its run, as an ephemeral app does. While any session
lives, Modal's own output goes to :data:`SINK` (the runs show it under their bar) instead of the
notebook. :func:`sessions` lists the live ones.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
from typing import Any

from ...options import MapOptions
from ...shipping import by_value
from ..base import LoopThread
from . import container
from .setup import LineSink, capturing_output, function_kwargs, setup_error, spec_changes, spec_of

__all__ = ["RUNNER_NAME", "SINK", "WarmSession", "acquire", "exiting", "release", "sessions", "shutdown_sessions"]

#: Modal's output while sessions live (image builds, container logs), drained by the runs' bars
SINK = LineSink()
#: the one function of every warm app, as Modal's dashboard and logs name it
RUNNER_NAME = "modal_magic_runner"

_lock = threading.Lock()
_SESSIONS: dict[str, WarmSession] = {}
_last_spec: list[dict[str, Any]] = []  # the spec of the session used last, to say what changed
_previous_output: list[Any] = []  # Modal's output manager before the first session replaced it
_atexit_registered: list[bool] = []
_exiting = threading.Event()  # the kernel exits: runs still out leave their calls recorded for the next


class WarmSession:
    """One running Modal app with the generic batch runner, for one container spec."""

    def __init__(self, spec: dict[str, Any], options: MapOptions) -> None:
        self.spec = spec
        self.options = options
        self.keep_warm = options.keep_warm
        self.app_id: str | None = None
        self.function: Any = None
        self.loop: LoopThread | None = None
        self.runs = 0  # runs using it now
        self.runs_total = 0
        self.containers = 0
        self.started_at = time.time()
        self.last_used = time.monotonic()
        #: function tokens whose bytes were sent along with a run's first batches (containers up then have them)
        self.known_tokens: set[str] = set()
        self._start_lock = threading.Lock()
        self._started = False
        self._held: Any = None
        self._stop: asyncio.Event | None = None
        self._closed = threading.Event()
        self._idle_timer: threading.Timer | None = None
        self.failure: BaseException | None = None
        #: stop the app when the session closes; False leaves calls still running to a later kernel
        self.stop_app = True

    @property
    def alive(self) -> bool:
        """Started and not stopped (nor broken)."""
        return self._started and not self._closed.is_set()

    def start(self) -> None:
        """Create the app and its function and wait until it runs (once; later calls return at once)."""
        with self._start_lock:
            if self._started:
                if self._closed.is_set():
                    raise RuntimeError("this Modal session has stopped")
                return
            self.loop = LoopThread("modal_magic-modal")
            ready: asyncio.Future[None] = self.loop.loop.create_future()
            self._held = self.loop.call(self._hold(ready))
            try:
                asyncio.run_coroutine_threadsafe(_wait(ready), self.loop.loop).result()
            except BaseException:
                self._held.cancel()
                self._closed.wait(timeout=30)
                self.loop.stop()
                raise
            self._started = True

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        import modal

        self._stop = asyncio.Event()
        try:
            app = modal.App(f"modal-magic-{self.spec['image'][:40]}".replace(" ", "")[:60])
            serve = app.function(name=RUNNER_NAME, **function_kwargs(self.options, self.options.batch_size or 1))(
                container.serve)
            async with contextlib.AsyncExitStack() as stack:
                # The runner travels by value (the containers have no modal_magic); only while it is created.
                with by_value([container.__name__]):
                    # Detached: the batches spawned on it outlive this kernel, for a new one to collect
                    await stack.enter_async_context(app.run(detach=True))
                self.function, self.app_id = serve, app.app_id
                ready.set_result(None)
                await self._stop.wait()
                if self.stop_app:  # a detached app would outlive us: stop it (and its containers) now
                    await _stop_app(app)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            if not ready.done():
                ready.set_exception(setup_error(error))
            else:  # the app broke while warm: runs in flight see their map fail; the next run starts anew
                self.failure = error
        finally:
            self._closed.set()

    def close(self, timeout: float = 30, *, stop_app: bool = True) -> None:
        """Stop the app (and so its containers) and the session's thread.

        ``stop_app=False`` only disconnects: the calls still running on the detached app go on, and a
        later kernel collects them (Modal stops the app once they are done).
        """
        self.cancel_idle_timer()
        self.stop_app = stop_app
        if self.loop is None:
            return
        if self._stop is not None and not self._closed.is_set():
            self.loop.loop.call_soon_threadsafe(self._stop.set)
        if not self._closed.wait(timeout=timeout) and self._held is not None:
            self._held.cancel()
            self._closed.wait(timeout=10)
        self.loop.stop()
        self.loop = None

    def cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def stop_when_idle(self) -> None:
        """After a run: stop in ``keep_warm`` seconds unless another run comes first."""
        self.cancel_idle_timer()
        self._idle_timer = threading.Timer(self.keep_warm, _stop_if_idle, args=(self,))
        self._idle_timer.name = "modal_magic-modal-idle"
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def describe(self) -> dict[str, Any]:
        """One line of :func:`sessions`."""
        idle = 0.0 if self.runs else time.monotonic() - self.last_used
        spec = ", ".join(f"{k}={v}" for k, v in self.spec.items() if v not in (None, (), 0) and k != "keep_warm")
        return {"app_id": self.app_id, "spec": spec, "containers": self.containers, "runs": self.runs_total,
                "running": self.runs, "idle_s": round(idle, 1), "keep_warm_s": self.keep_warm}


async def _wait(ready: asyncio.Future[None]) -> None:
    await ready


async def _stop_app(app: Any) -> None:
    try:
        await app.stop.aio()
    except Exception as e:  # the app may already be gone (stopped by Modal, a restarted server)
        SINK.write(f"couldn't stop Modal app {app.app_id}: {type(e).__name__}: {e}\n")


def _key(spec: dict[str, Any]) -> str:
    return repr(sorted(spec.items()))


def acquire(options: MapOptions) -> tuple[WarmSession, str]:
    """The live session for ``options``' spec, else a new one; and what the run's bar should say.

    The message says whether containers are warm, starting for the first time, or new, and why.
    """
    spec = spec_of(options)
    key = _key(spec)
    with _lock:
        session = _SESSIONS.get(key)
        if session is not None and session._started and not session.alive:
            del _SESSIONS[key]  # it stopped (idle, or broke): start afresh
            session = None
        if session is not None:
            session.cancel_idle_timer()
            session.runs += 1
            news = f"warm containers: reusing Modal app {session.app_id} (no new app, image or container start)"
        else:
            previous = _last_spec[0] if _last_spec else None
            if previous is None:
                news = "starting a Modal app and its containers"
            elif previous == spec:
                news = "new containers: the warm ones had stopped (idle longer than keep_warm)"
            else:
                news = f"new containers: {spec_changes(previous, spec)}"
            session = _SESSIONS[key] = WarmSession(spec, options)
            session.runs += 1
            _install_output()
        _last_spec[:] = [spec]
    try:
        session.start()
    except BaseException:
        with _lock:
            session.runs -= 1
            if _SESSIONS.get(key) is session:
                del _SESSIONS[key]
            _restore_output_if_unused()
        raise
    session.runs_total += 1
    return session, news


def release(session: WarmSession, *, broken: bool = False) -> None:
    """A run is done with ``session``: stop it now (``keep_warm=0``, or broken) or once idle for keep_warm."""
    with _lock:
        session.runs -= 1
        session.last_used = time.monotonic()
        if session.runs > 0:
            return
        stop_now = broken or session.keep_warm == 0 or not session.alive
        if stop_now:
            _SESSIONS.pop(_key(session.spec), None)
    if stop_now:
        session.close()
        with _lock:
            _restore_output_if_unused()
    else:
        session.stop_when_idle()


def _stop_if_idle(session: WarmSession) -> None:
    with _lock:
        if session.runs > 0:
            return
        if _SESSIONS.get(_key(session.spec)) is session:
            del _SESSIONS[_key(session.spec)]
    session.close()
    with _lock:
        _restore_output_if_unused()


def _set_containers(n: int) -> None:
    for session in list(_SESSIONS.values()):
        if session.runs:
            session.containers = n


def _install_output() -> None:
    from modal._output.manager import OutputManager

    if not _atexit_registered:
        # Registered after the modal client was imported, so it runs before the client's own exit
        # hooks (atexit runs last-registered first) while the client can still stop the apps.
        atexit.register(shutdown_sessions, leave_running=True)
        _atexit_registered.append(True)
    if not _previous_output:
        _previous_output.append(OutputManager.get())
        OutputManager._set(capturing_output(SINK, _set_containers))


def _restore_output_if_unused() -> None:
    if _SESSIONS or not _previous_output:
        return
    from modal._output.manager import OutputManager

    OutputManager._set(_previous_output.pop())


def sessions() -> list[dict[str, Any]]:
    """The warm Modal sessions of this kernel: app id, spec, containers, runs, idle seconds, keep_warm."""
    with _lock:
        return [s.describe() for s in _SESSIONS.values() if s.alive]


def exiting() -> bool:
    """Whether the kernel is exiting: a run still out must leave its calls as recorded, not collect them."""
    return _exiting.is_set()


def shutdown_sessions(*, leave_running: bool = False) -> int:
    """Stop every warm session (their apps and containers); return how many were stopped.

    ``leave_running=True`` (a kernel that exits) leaves the app of a session with a run in flight
    running for its spawned batches, which a later kernel collects; the others stop.
    """
    if leave_running:
        _exiting.set()
    with _lock:
        live = list(_SESSIONS.values())
        _SESSIONS.clear()
        _last_spec.clear()  # the next run starts afresh, rather than "the warm ones had stopped"
    for session in live:
        session.close(stop_app=not (leave_running and session.runs > 0))
    with _lock:
        _restore_output_if_unused()
    return len(live)

