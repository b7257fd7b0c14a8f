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
notebook. :func:`sessions` lists the live ones, with what their containers have cost so far.

Each session's :class:`~modal_magic.backends.modal.container_time.ContainerClock` records its
containers' lifetimes from the task states Modal streams, and which run used the session when, so
:func:`run_seconds` can say how many container-seconds a run is billed for (the rule is in that
module: overlapping runs split a second, the idle tail after a run is that run's).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import threading
import time
import weakref
from typing import Any, Hashable

from ...costs import ContainerRate, container_rate
from ...options import MapOptions
from ...shipping import by_value
from ..base import LoopThread
from . import container
from .container_time import ContainerClock
from .setup import LineSink, capturing_output, function_kwargs, setup_error, spec_changes, spec_of

__all__ = ["RUNNER_NAME", "SINK", "WarmSession", "acquire", "exiting", "release", "run_seconds", "sessions",
           "shutdown_sessions"]

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
# run -> the sessions it used (a run that restarts on a new app uses two); weak: a run forgotten is gone
_RUN_SESSIONS: weakref.WeakKeyDictionary[Any, list[WarmSession]] = weakref.WeakKeyDictionary()
# the session whose app the current task serves (set in WarmSession._hold; Modal's log task inherits it)
_CURRENT_SESSION: contextvars.ContextVar[WarmSession | None] = contextvars.ContextVar("modal_magic_session",
                                                                                      default=None)
#: task states of a container that is up (Modal reports running containers as IDLE; ACTIVE is older)
_UP_STATES = (4, 8)  # api_pb2.TASK_STATE_ACTIVE, TASK_STATE_IDLE


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
        #: the containers' lifetimes and which run used the session when (what each run is billed)
        self.clock = ContainerClock(options.keep_warm)
        self.rate: ContainerRate = container_rate(options.gpu, cpu=options.cpu, memory=options.memory)
        self._task_states: dict[str, int] = {}
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
        _CURRENT_SESSION.set(self)
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
        self.clock.close()
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

    def task_state(self, task_id: str, state: int) -> None:
        """A container of this session's app changed state (from Modal's log stream)."""
        self.clock.task_state(task_id, state)
        self._task_states[task_id] = state
        self.containers = sum(s in _UP_STATES for s in self._task_states.values())

    def describe(self) -> dict[str, Any]:
        """One line of :func:`sessions`."""
        idle = 0.0 if self.runs else time.monotonic() - self.last_used
        spec = ", ".join(f"{k}={v}" for k, v in self.spec.items() if v not in (None, (), 0) and k != "keep_warm")
        seconds = self.clock.total_seconds()
        return {"app_id": self.app_id, "spec": spec, "containers": self.containers, "runs": self.runs_total,
                "running": self.runs, "idle_s": round(idle, 1), "keep_warm_s": self.keep_warm,
                "container_s": round(seconds, 1), "compute_usd": self.rate.cost(seconds)}


async def _wait(ready: asyncio.Future[None]) -> None:
    await ready


async def _stop_app(app: Any) -> None:
    try:
        await app.stop.aio()
    except Exception as e:  # the app may already be gone (stopped by Modal, a restarted server)
        SINK.write(f"couldn't stop Modal app {app.app_id}: {type(e).__name__}: {e}\n")


def _key(spec: dict[str, Any]) -> str:
    return repr(sorted(spec.items()))


def acquire(options: MapOptions, run: Hashable | None = None) -> tuple[WarmSession, str]:
    """The live session for ``options``' spec, else a new one; and what the run's bar should say.

    The message says whether containers are warm, starting for the first time, or new, and why.
    ``run`` (the run's backend: any object a weak reference can point to) is who the session's
    container time is billed to from now until :func:`release` with the same ``run``
    (see :func:`run_seconds`).
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
    if run is not None:
        session.clock.begin(run)
        with _lock:
            _RUN_SESSIONS.setdefault(run, []).append(session)
    return session, news


def release(session: WarmSession, *, broken: bool = False, run: Hashable | None = None) -> None:
    """A run is done with ``session``: stop it now (``keep_warm=0``, or broken) or once idle for keep_warm."""
    if run is not None:
        session.clock.end(run)  # from here its idle tail is this run's, unless another run is using it
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


def run_seconds(run: Hashable) -> float | None:
    """Container-seconds billed to ``run`` so far (its keep_warm idle tail projected once it has
    ended), over every session it used; ``None`` where Modal streamed no container states.

    Examples
    --------
    >>> class Run: ...
    >>> run_seconds(Run()) is None  # a run that used no session
    True
    """
    with _lock:
        used = list(_RUN_SESSIONS.get(run, []))
    if not any(session.clock.containers_seen for session in used):
        return None
    return sum(session.clock.run_seconds(run) for session in used)


def _on_task_state(task_id: str, state: int) -> None:
    # The client streams each app's logs in a task started inside that session's ``app.run()``, which
    # inherits the context the session set: that says whose container it is (Modal runs them all on
    # its own event loop, so the loop can't tell).
    session = _CURRENT_SESSION.get()
    if session is not None:
        session.task_state(task_id, state)


def _install_output() -> None:
    from modal._output.manager import OutputManager

    if not _atexit_registered:
        # Registered after the modal client was imported, so it runs before the client's own exit
        # hooks (atexit runs last-registered first) while the client can still stop the apps.
        atexit.register(shutdown_sessions, leave_running=True)
        _atexit_registered.append(True)
    if not _previous_output:
        _previous_output.append(OutputManager.get())
        OutputManager._set(capturing_output(SINK, _on_task_state))


def _restore_output_if_unused() -> None:
    if _SESSIONS or not _previous_output:
        return
    from modal._output.manager import OutputManager

    OutputManager._set(_previous_output.pop())


def sessions() -> list[dict[str, Any]]:
    """The warm Modal sessions of this kernel: app id, spec, containers, runs, idle seconds, keep_warm,
    container-seconds and estimated dollars so far (idle included)."""
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

