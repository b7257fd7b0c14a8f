"""Subprocess "containers" for the local Modal test server.

A ``FunctionRuntime`` owns the worker processes of one function (its containers) and a queue of
pending ``Attempt``s.  Each pool slot keeps one worker process and feeds it batches of inputs; the
worker answers with one frame per finished input, so when a process dies or is killed for a timeout
the runtime knows which input was running: that one gets a "crash"/"timeout" outcome, the inputs of
the batch that had not started go back to the front of the queue, and a fresh worker replaces the
dead one.  Everything here runs on the server's event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import pickle
import signal
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

_HEADER = struct.Struct(">I")
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker_main.py")
_task_counter = itertools.count(1)

# Upper bound of inputs sent to a worker in one round trip (tiny inputs are executed back to back
# inside the worker; results still come back one frame per input).
MAX_INPUTS_PER_ROUND_TRIP = 64
MAX_BYTES_PER_ROUND_TRIP = 8 * 1024 * 1024


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(eq=False)
class Attempt:
    """One execution attempt of one input."""

    key: int
    args: bytes
    data_format: int
    owner: Any = None  # (function call, input record), opaque to this module
    cancelled: bool = False


@dataclass
class WorkerSpec:
    kind: str  # "serialized" | "module" | "pickled"
    payload: bytes = b""
    module: str = ""
    qualname: str = ""
    module_dir: str = ""
    env: dict = field(default_factory=dict)
    sys_path: list = field(default_factory=list)
    cwd: str = ""
    image_packages: list = field(default_factory=list)  # packages the image carries (mounted local source)


class WorkerInitError(Exception):
    def __init__(self, payload: dict):
        super().__init__(payload.get("repr", "worker failed to start"))
        self.payload = payload


class Worker:
    """One worker process. Launched blank (it pre-imports modal), then bound to a function by ``init``."""

    def __init__(self, proc: asyncio.subprocess.Process, task_id: str):
        self.proc = proc
        self.task_id = task_id
        self._buf = bytearray()
        self._frames: collections.deque = collections.deque()
        self._on_log: Callable[[str, str], None] | None = None
        self._log_task = asyncio.get_running_loop().create_task(self._pump_logs())
        self.busy_since: float | None = None  # loop time when the currently running input started
        self.timed_out = False
        self.state = ""  # the container's last reported task state (FunctionRuntime._task_state)

    @classmethod
    async def launch(cls) -> "Worker":
        task_id = f"ta-local{next(_task_counter):06d}"
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            _WORKER_SCRIPT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C in the test terminal should not hit the workers
        )
        return cls(proc, task_id)

    async def init(self, spec: WorkerSpec, on_log: Callable[[str, str], None]) -> None:
        """Load the function in the worker; raises WorkerInitError (and kills the worker) on failure."""
        self._on_log = on_log
        # The environment is the server process's current one (e.g. MODAL_SERVER_URL set by the test)
        # plus the function's image ENV layers and secrets, applied before the function is loaded.
        env = dict(os.environ)
        env.update({k: v for k, v in spec.env.items() if v is not None})
        env["PYTHONUNBUFFERED"] = "1"
        env["MODAL_TASK_ID"] = self.task_id
        init = {
            "kind": spec.kind,
            "payload": spec.payload,
            "module": spec.module,
            "qualname": spec.qualname,
            "module_dir": spec.module_dir,
            "sys_path": spec.sys_path,
            "cwd": spec.cwd,
            "image_packages": spec.image_packages,
            "env": env,
            "task_id": self.task_id,
        }
        try:
            self._send(init)
            await self.proc.stdin.drain()
            frame = await self._next_frame()
        except (ConnectionError, asyncio.IncompleteReadError, BrokenPipeError, RuntimeError):
            frame = None
        if frame is None or frame[0] != "ready":
            await self.kill()
            if frame is not None and frame[0] == "init_error":
                raise WorkerInitError(frame[1])
            rc = self.proc.returncode
            raise WorkerInitError(
                {"repr": f"worker process exited during startup ({_signal_name(rc if rc is not None else 0)})"}
            )

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def _send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)

    async def _next_frame(self):
        """The next frame from the worker, or None at EOF."""
        while not self._frames:
            chunk = await self.proc.stdout.read(1 << 18)
            if not chunk:
                return None
            self._buf += chunk
            buf = self._buf
            pos = 0
            n = len(buf)
            while n - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if n - pos - 4 < size:
                    break
                self._frames.append(pickle.loads(bytes(buf[pos + 4 : pos + 4 + size])))
                pos += 4 + size
            if pos:
                del buf[:pos]
        return self._frames.popleft()

    async def _pump_logs(self):
        stream = self.proc.stderr
        try:
            while True:
                line = await stream.readline()
                if not line:
                    return
                if self._on_log is not None:
                    self._on_log(self.task_id, line.decode("utf-8", "replace"))
        except Exception:
            return

    async def run(self, attempts: list[Attempt], timeout_secs: float, batched: bool):
        """Run the attempts; returns (finished, failure).

        finished: list of (attempt, kind, payload) for inputs that completed ("ok" / "err").
        failure: None, or (kind, description, unfinished_attempts) with kind "crash" or "timeout".
        """
        loop = asyncio.get_running_loop()
        op = "run_batch" if batched else "run"
        pending = collections.deque(attempts)
        finished = []
        try:
            self._send((op, [(a.key, a.args, a.data_format) for a in attempts]))
            await self.proc.stdin.drain()
        except (ConnectionError, BrokenPipeError, RuntimeError):
            pass  # reading will hit EOF below
        self.busy_since = loop.time()
        watchdog = loop.create_task(self._watchdog(timeout_secs)) if timeout_secs > 0 else None
        try:
            while pending:
                try:
                    frame = await self._next_frame()
                except (ConnectionError, asyncio.IncompleteReadError):
                    frame = None
                if frame is None:
                    rc = await self.proc.wait()
                    if self.timed_out:
                        return finished, ("timeout", f"timeout of {timeout_secs:g}s", list(pending))
                    return finished, ("crash", _signal_name(rc), list(pending))
                _, key, kind, payload = frame
                attempt = pending.popleft()
                if attempt.key != key:  # protocol bug; should never happen
                    raise RuntimeError(f"worker answered input {key} while {attempt.key} was expected")
                finished.append((attempt, kind, payload))
                if not batched:
                    self.busy_since = loop.time()
            return finished, None
        finally:
            self.busy_since = None
            if watchdog is not None:
                watchdog.cancel()

    async def _watchdog(self, timeout_secs: float):
        loop = asyncio.get_running_loop()
        interval = min(0.1, max(0.01, timeout_secs / 20))
        while True:
            await asyncio.sleep(interval)
            started = self.busy_since
            if started is not None and loop.time() - started > timeout_secs:
                self.timed_out = True
                self._kill_now()
                return

    def _kill_now(self):
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass

    async def kill(self):
        self._kill_now()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wait_for(self._log_task, 2)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            self._log_task.cancel()


class SparePool:
    """Blank worker processes launched ahead of time, so that a new function's first inputs don't wait
    for a Python interpreter to start and import modal (most of a second).  The pool owns every process
    it launches until ``take`` hands one out, so a cancelled caller cannot leak one."""

    def __init__(self, target: int):
        self.target = target
        self._ready: collections.deque[Worker] = collections.deque()
        self._launching = 0
        self._waiters = 0
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._available = asyncio.Event()

    def _launch(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            self._launching += 1
            task = loop.create_task(self._launch_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def fill(self) -> None:
        if not self._closed:
            self._launch(max(0, self.target + self._waiters - len(self._ready) - self._launching))

    async def _launch_one(self) -> None:
        try:
            worker = await Worker.launch()
        except Exception:
            worker = None
        finally:
            self._launching -= 1
        if worker is not None:
            if self._closed:
                await worker.kill()
                return
            self._ready.append(worker)
        ev, self._available = self._available, asyncio.Event()
        ev.set()

    async def take(self) -> Worker:
        self._waiters += 1
        try:
            while True:
                while self._ready:
                    worker = self._ready.popleft()
                    if worker.alive:
                        return worker
                    await worker.kill()
                if self._closed:
                    raise RuntimeError("the worker pool is closed")
                ev = self._available
                self.fill()
                await ev.wait()
        finally:
            self._waiters -= 1
            self.fill()

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        await asyncio.gather(*tasks, return_exceptions=True)  # launches finish and kill their process
        while self._ready:
            await self._ready.popleft().kill()
        ev, self._available = self._available, asyncio.Event()
        ev.set()


class FunctionRuntime:
    """The containers of one function: a queue of attempts and a pool of worker processes."""

    def __init__(
        self,
        *,
        name: str,
        spec: WorkerSpec,
        pool_size: int,
        timeout_secs: float,
        batch_max_size: int,
        batch_wait_ms: int,
        on_outcome: Callable[[Attempt, str, Any], None],
        on_log: Callable[[str, str], None],
        on_worker_started: Callable[[str], None] | None = None,
        on_task_state: Callable[[str, str], None] | None = None,
        spares: SparePool | None = None,
        start_delay_s: float = 0.0,
        idle_timeout_s: float = 0.0,
    ):
        self.name = name
        # a container's cold start (image pull, Python start, imports) on top of the worker's own start
        self.start_delay_s = start_delay_s
        # scaledown_window: a container idle this long stops (0: containers stay while the app runs)
        self.idle_timeout_s = idle_timeout_s
        self.spec = spec
        self.pool_size = max(1, pool_size)
        self.timeout_secs = timeout_secs
        self.batch_max_size = batch_max_size
        self.batch_wait_ms = batch_wait_ms
        self._on_outcome = on_outcome
        self._on_log = on_log
        self._on_worker_started = on_worker_started
        # a container's lifecycle as Modal reports it to the client: "assigned" (a worker took it),
        # "loading" (cold start: image, Python, imports), "idle" (up, ready for inputs), "completed" (stopped)
        self._on_task_state = on_task_state
        self._spares = spares
        self._queue: collections.deque[Attempt] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots: list[asyncio.Task] = []
        self._idle_slots = 0
        self._workers: set[Worker] = set()
        self._closed = False
        self._init_error: dict | None = None
        self.workers_started = 0

    # -- queue ---------------------------------------------------------------------------------
    def submit(self, attempts: list[Attempt]) -> None:
        if self._closed:
            for a in attempts:
                self._on_outcome(a, "terminated", None)
            return
        if self._init_error is not None:
            for a in attempts:
                self._on_outcome(a, "init_error", self._init_error)
            return
        self._queue.extend(attempts)
        self._wakeup.set()
        self._ensure_slots()

    def _requeue_front(self, attempts: list[Attempt]) -> None:
        self._queue.extendleft(reversed(attempts))
        self._wakeup.set()

    def _ensure_slots(self) -> None:
        wanted = min(self.pool_size, len(self._slots) + max(0, len(self._queue) - self._idle_slots))
        loop = asyncio.get_running_loop()
        while len(self._slots) < wanted:
            self._slots.append(loop.create_task(self._slot_loop()))

    async def _take(self) -> list[Attempt] | None:
        while True:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
            if self._closed:
                return None
            if self._queue:
                break
            self._wakeup.clear()
            self._idle_slots += 1
            try:
                if self.idle_timeout_s > 0:
                    await asyncio.wait_for(self._wakeup.wait(), self.idle_timeout_s)
                else:
                    await self._wakeup.wait()
            except asyncio.TimeoutError:
                return None  # idle past the scaledown window: this container stops
            finally:
                self._idle_slots -= 1
        if self.batch_max_size > 0:
            if len(self._queue) < self.batch_max_size and self.batch_wait_ms > 0:
                await asyncio.sleep(self.batch_wait_ms / 1000)
            limit = self.batch_max_size
        else:
            n_slots = max(1, len(self._slots))
            limit = max(1, min(MAX_INPUTS_PER_ROUND_TRIP, -(-len(self._queue) // n_slots)))
        batch = []
        size = 0
        while self._queue and len(batch) < limit and (size < MAX_BYTES_PER_ROUND_TRIP or self.batch_max_size > 0):
            a = self._queue.popleft()
            if not a.cancelled:
                batch.append(a)
                size += len(a.args)
        return batch or await self._take()

    # -- execution -----------------------------------------------------------------------------
    async def _slot_loop(self) -> None:
        worker: Worker | None = None
        try:
            while True:
                batch = await self._take()
                if batch is None:
                    return
                if worker is None or not worker.alive:
                    if worker is not None:
                        await self._retire(worker)
                        worker = None
                    try:
                        worker = await (self._spares.take() if self._spares is not None else Worker.launch())
                    except RuntimeError:  # the server is shutting down
                        self._requeue_front(batch)
                        return
                    self._task_state(worker, "assigned")
                    self._task_state(worker, "loading")
                    try:
                        if self.start_delay_s > 0:
                            await asyncio.sleep(self.start_delay_s)
                        await worker.init(self.spec, self._on_log)
                    except WorkerInitError as exc:
                        self._task_state(worker, "completed")
                        worker = None
                        self._fail_all(exc.payload, batch)
                        return
                    self._workers.add(worker)
                    self._task_state(worker, "idle")
                    self.workers_started += 1
                    if self._on_worker_started is not None:
                        self._on_worker_started(worker.task_id)
                    if self._closed:
                        self._requeue_front(batch)
                        return
                finished, failure = await worker.run(batch, self.timeout_secs, batched=self.batch_max_size > 0)
                for attempt, kind, payload in finished:
                    self._on_outcome(attempt, kind, payload)
                if failure is not None:
                    kind, description, unfinished = failure
                    victims = unfinished if self.batch_max_size > 0 else unfinished[:1]
                    rest = [] if self.batch_max_size > 0 else unfinished[1:]
                    if rest:
                        self._requeue_front(rest)
                    await self._retire(worker)
                    worker = None
                    if self._closed:
                        return
                    for attempt in victims:
                        self._on_outcome(attempt, kind, {"description": description, "task_id": ""})
        except asyncio.CancelledError:
            pass
        finally:
            me = asyncio.current_task()
            if me in self._slots:  # scaled down: a later input starts a new container
                self._slots.remove(me)
                if self._queue and not self._closed:  # one came in as this container was stopping
                    self._ensure_slots()
            if worker is not None:
                await self._retire(worker)

    def _task_state(self, worker: Worker, state: str) -> None:
        if worker.state == "completed":
            return  # reported stopped once; nothing comes after
        worker.state = state
        if self._on_task_state is not None:
            self._on_task_state(worker.task_id, state)

    async def _retire(self, worker: Worker) -> None:
        """The container stops (crash, timeout, scale-down, app stop): kill its process, report it completed."""
        self._workers.discard(worker)
        await worker.kill()
        self._task_state(worker, "completed")

    def _fail_all(self, payload: dict, batch: list[Attempt]) -> None:
        self._init_error = payload
        attempts = batch + [a for a in self._queue if not a.cancelled]
        self._queue.clear()
        for a in attempts:
            self._on_outcome(a, "init_error", payload)

    async def close(self) -> None:
        """Drop queued inputs and kill all worker processes."""
        self._closed = True
        self._queue.clear()
        self._wakeup.set()
        for w in list(self._workers):
            w._kill_now()
        slots, self._slots = self._slots, []
        for t in slots:
            t.cancel()
        if slots:
            await asyncio.gather(*slots, return_exceptions=True)
        for w in list(self._workers):
            await w.kill()
            self._task_state(w, "completed")
        self._workers.clear()

    @property
    def live_worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.alive]
