"""Modal: fan batches of rows out with ``Function.map()`` on an ephemeral app, or a deployed Function.

``backend="modal"`` builds one ephemeral ``modal.App`` per run from the options (image, GPU, CPU,
memory, secrets, volumes, timeout, retries, max_containers) with the user's function wrapped by
:func:`~modal_magic.backends.row_runner.batch_runner` and shipped with ``serialized=True``. Each remote
input carries a batch of rows and returns per-row outcomes, so a row's exception never fails its
input; an input lost with its container (crash, timeout, preemption) comes back as an exception
with no index under ``order_outputs=False``, and is identified once every other input in flight has
returned, then retried split by the engine.

All Modal calls run on a private event loop in a background thread: a Jupyter kernel's main thread
already runs a loop, where Modal's blocking API refuses to work, and a background loop lets Stop
cancel the app at once. ``backend="modal:APP/FUNCTION"`` maps over an already deployed Function.
"""

from __future__ import annotations

import asyncio
import math
import queue
import socket
import sys
import threading
import traceback
from typing import Any
from urllib.parse import urlparse

import cloudpickle

from ..costs import input_timeout_s
from ..errors import ModalSetupError, WorkerCrashed
from ..options import DEFAULT_MODAL_CONTAINERS, MapOptions
from . import row_runner as _worker
from ..shipping import by_value, by_value_packages
from .base import Backend, BackendFailed, Batch, BatchResult, LoopThread, Task, drain

#: Modal inlines arguments up to 2 MiB; keep batches well under it so most inputs avoid a blob round trip
PAYLOAD_TARGET_BYTES = 1 << 20
#: remote inputs should compute long enough to hide Modal's per-input overhead
TARGET_BATCH_S = 1.0
#: containers to plan batches for when max_containers isn't set (Modal scales further on its own)
DEFAULT_CONTAINERS = DEFAULT_MODAL_CONTAINERS
_DONE = object()


# --- preflight: fast, clear failures before anything starts ---------------------------------------------


def check_credentials() -> None:
    """Fail at once, saying how to authenticate, when no Modal token is configured."""
    from modal.config import config

    if not (config.get("token_id") and config.get("token_secret")):
        raise ModalSetupError(
            "no Modal token found. Run `modal token new` (or `python -m modal setup`) once, or set "
            "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (from https://modal.com/settings/tokens); "
            "or run locally with backend='local'"
        )


def check_reachable(timeout_s: float = 5.0) -> None:
    """Fail within seconds when Modal's server can't be reached (the client would retry for a minute)."""
    from modal.config import config

    url = urlparse(config.get("server_url"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ModalSetupError(
            f"can't reach Modal at {url.scheme}://{url.hostname}:{port} ({e.strerror or e}); "
            "check your network, proxy, or MODAL_SERVER_URL"
        ) from None


def local_python_version() -> str:
    """This kernel's ``MAJOR.MINOR`` Python version, which the default image matches."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_python_version(options: MapOptions) -> None:
    """A function defined in a notebook is pickled, and bytecode only loads on the same Python version."""
    wanted = options.python_version
    if wanted is not None and wanted != local_python_version():
        raise ModalSetupError(
            f"python_version={wanted!r} differs from this kernel's Python {local_python_version()}: "
            "a notebook-defined function is pickled and only loads on the same version. Leave "
            "python_version unset (the image then matches this kernel) or run the kernel on "
            f"Python {wanted}"
        )


# --- building the app ---------------------------------------------------------------------------------


def build_image(options: MapOptions) -> Any:
    """The container image: ``image=`` as given, else debian_slim on this kernel's Python + pip/apt."""
    import modal

    if options.image is not None:
        return options.image
    image = modal.Image.debian_slim(python_version=options.python_version or local_python_version())
    if options.apt:
        image = image.apt_install(*options.apt)
    # The rows' code and results are pickled on both sides: match this kernel's cloudpickle.
    return image.pip_install(f"cloudpickle=={cloudpickle.__version__}", *options.pip)


def function_kwargs(options: MapOptions, batch_rows: int) -> dict[str, Any]:
    """``App.function(...)`` arguments from the options (``batch_rows``: rows per input, for the timeout)."""
    import modal

    secrets = [modal.Secret.from_name(s) if isinstance(s, str) else s for s in options.secrets]
    volumes = {
        path: modal.Volume.from_name(v, create_if_missing=True) if isinstance(v, str) else v
        for path, v in options.volumes.items()
    }
    kwargs: dict[str, Any] = {
        "image": build_image(options),
        "serialized": True,
        "secrets": secrets,
        "volumes": volumes,
    }
    if options.env:
        kwargs["env"] = dict(options.env)
    if options.gpu is not None:
        kwargs["gpu"] = options.gpu
    if options.cpu is not None:
        kwargs["cpu"] = options.cpu
    if options.memory is not None:
        kwargs["memory"] = options.memory
    if options.max_containers is not None:
        kwargs["max_containers"] = options.max_containers
    if options.retries:
        kwargs["retries"] = options.retries
    if options.timeout is not None:  # the same figure a map's budget_usd books per input
        kwargs["timeout"] = input_timeout_s(options.timeout, options.retries, batch_rows)
    return kwargs


def _error_tuples(i: int, exc: BaseException) -> tuple[int, str, str, str, int, Any]:
    # Modal rebuilds the remote traceback onto the exception it raises locally.
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (i, type(exc).__name__, str(exc), tb, 1, exc)


class _LineSink:
    """A file for rich to write to: complete lines are kept for the progress display to fetch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = ""
        self._lines: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            *done, self._partial = (self._partial + text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
            self._lines.extend(line.rstrip() for line in done if line.strip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def drain(self) -> list[str]:
        with self._lock:
            lines, self._lines = self._lines, []
        return lines


def _capturing_output(sink: _LineSink, on_containers: Any) -> Any:
    """Modal's own output manager, writing to ``sink`` instead of the notebook, and counting containers."""
    from modal._output.rich import RichOutputManager
    from modal_proto import api_pb2
    from rich.console import Console

    class CapturingOutputManager(RichOutputManager):
        def __init__(self) -> None:
            super().__init__()
            self._console = Console(file=sink, width=120, force_terminal=False, force_jupyter=False,
                                    highlight=False, color_system=None)
            self._stderr_console = self._console
            self._use_ansi_color = False

        def function_progress_callback(self, tag: str, total: int | None) -> Any:
            return lambda completed, total: None  # our bar shows progress; no second one in the logs

        def update_task_state(self, task_id: str, state: int) -> None:
            super().update_task_state(task_id, state)
            running = (api_pb2.TASK_STATE_ACTIVE, api_pb2.TASK_STATE_IDLE)
            on_containers(sum(s in running for s in self._task_states.values()))

    return CapturingOutputManager()


class ModalBackend(Backend):
    """An ephemeral app per run; batches stream through one ``Function.map`` with ``order_outputs=False``."""

    name = "modal"
    timeout_needs_single_rows = True
    target_batch_s = TARGET_BATCH_S

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_flight: dict[int, Batch] = {}
        self._lost: list[BaseException] = []
        self._session: Any = None
        self._loop: LoopThread | None = None
        self._closed = threading.Event()  # set when the session has left app.run() (the app is stopped)
        self._sink = _LineSink()
        self._containers: int | None = None

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
        per_row = max(1, len(_worker.dumps(sample)) // len(sample))
        return max(1, PAYLOAD_TARGET_BYTES // per_row)

    def initial_batch_rows(self, n: int) -> int:
        return max(1, math.ceil(n / (self.parallelism * 4)))

    def start(self, task: Task) -> None:
        self._options = opts = task.options
        check_python_version(opts)
        check_credentials()
        check_reachable()
        self._loop = LoopThread("modal_magic-modal")
        self._inputs: asyncio.Queue[Any] | None = None
        ready: asyncio.Future[None] = self._loop.loop.create_future()
        self._session = self._loop.call(self._run_session(task, ready))
        try:
            asyncio.run_coroutine_threadsafe(self._wait(ready), self._loop.loop).result()
        except BaseException:
            self._session.cancel()
            self._closed.wait(timeout=30)
            self._loop.stop()
            raise

    @staticmethod
    async def _wait(ready: asyncio.Future[None]) -> None:
        await ready

    async def _feed(self) -> Any:
        assert self._inputs is not None
        while True:
            item = await self._inputs.get()
            if item is _DONE:
                return
            yield item

    def containers(self) -> int | None:
        return self._containers

    def drain_logs(self) -> list[str]:
        return self._sink.drain()

    def _set_containers(self, n: int) -> None:
        self._containers = n

    async def _run_session(self, task: Task, ready: asyncio.Future[None]) -> None:
        import modal
        from modal._output.manager import OutputManager

        opts = task.options
        # Ship the row runner by value (the container needs no copy of modal_magic), the user's own
        # modules too, so module state the notebook changed is what the containers see, and whatever
        # the caller registered by value (the LLM row code): Modal pickles with a cloudpickle of its own.
        shipped = [*by_value_packages(task.fn), _worker.__name__, *cloudpickle.list_registry_pickle_by_value()]
        with by_value(shipped):
            previous_output = OutputManager.get()
            OutputManager._set(_capturing_output(self._sink, self._set_containers))
            try:
                self._inputs = asyncio.Queue()
                runner = _worker.batch_runner(task.fn, task.star, opts.retries, opts.timeout, task.is_async,
                                              timings=opts.timings)
                app = modal.App(f"modal-magic-{runner.__name__.removeprefix('modal_magic_')}"[:60])
                batch_rows = opts.batch_size or 1
                remote = app.function(**function_kwargs(opts, batch_rows))(runner)
                async with app.run():
                    ready.set_result(None)
                    async for output in remote.map.aio(self._feed(), order_outputs=False, return_exceptions=True):
                        self._outbox.put(output)
                self._outbox.put(_DONE)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                if not ready.done():
                    ready.set_exception(_setup_error(e))
                else:
                    self._outbox.put(BackendFailed(f"the Modal run failed: {type(e).__name__}: {e}"))
            finally:
                OutputManager._set(previous_output)
                self._closed.set()

    def submit(self, batch: Batch) -> None:
        assert self._loop is not None and self._inputs is not None
        self._in_flight[batch.id] = batch
        self._loop.loop.call_soon_threadsafe(self._inputs.put_nowait, (batch.id, batch.args))

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
            cause = _lost_cause(self._lost[0])
            out.extend(BatchResult(batch, lost=cause) for batch in self._in_flight.values())
            self._in_flight.clear()
            self._lost.clear()
        return out

    def _take(self, item: Any) -> list[BatchResult]:
        if isinstance(item, BackendFailed):
            raise item
        if item is _DONE:
            return []
        if isinstance(item, BaseException):  # an input lost with its container; which one is known later
            self._lost.append(item)
            return []
        batch_id, packed = item
        batch = self._in_flight.pop(batch_id)
        return [BatchResult.from_packed(batch, packed)]

    def cancel(self) -> None:
        if self._session is not None:
            self._session.cancel()  # leaving app.run() stops the app and its containers

    def finish(self) -> None:
        if self._loop is None:
            return
        if self._inputs is not None and self._session is not None and not self._session.done():
            self._loop.loop.call_soon_threadsafe(self._inputs.put_nowait, _DONE)
        if not self._closed.wait(timeout=30):  # the app didn't stop by itself: cancel it
            self.cancel()
            self._closed.wait(timeout=10)
        self._loop.stop()
        self._loop = None


def _lost_cause(error: BaseException) -> BaseException:
    """Name an input lost with its container the way the local backends do: crashed or timed out."""
    text = f"{type(error).__name__}: {error}"
    if "Timeout" in type(error).__name__:
        return TimeoutError(f"the Modal container ran past its timeout ({text})")
    return WorkerCrashed(f"the Modal container running this row was lost ({text})")


def _setup_error(error: BaseException) -> BaseException:
    """Turn Modal's set-up failures into messages that say what to do."""
    name = type(error).__name__
    text = str(error)
    if name == "NotFoundError" and "Secret" in text:
        return ModalSetupError(f"{text}. Create it with `modal secret create NAME KEY=VALUE` or on modal.com/secrets")
    if name in ("AuthError", "Unauthenticated"):
        return ModalSetupError(f"Modal rejected the token ({text}); run `modal token new`")
    return error


class DeployedBackend(Backend):
    """``backend="modal:APP/FUNCTION"``: each batch of rows is one ``Function.map`` call on a deployed Function."""

    name = "modal-deployed"

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._loop: LoopThread | None = None
        self._futures: set[Any] = set()

    @property
    def capacity(self) -> int:
        return self._options.max_containers or 8

    def start(self, task: Task) -> None:
        import modal

        self._options = task.options
        self._star = task.star
        app_name, _, function_name = task.options.backend.removeprefix("modal:").partition("/")
        check_credentials()
        check_reachable()
        self._loop = LoopThread("modal_magic-modal")
        self._function = modal.Function.from_name(app_name, function_name)
        try:
            self._loop.call(self._function.hydrate.aio()).result()
        except Exception as e:
            self._loop.stop()
            if type(e).__name__ == "NotFoundError":
                raise ModalSetupError(
                    f"no deployed Modal function {function_name!r} in app {app_name!r}: deploy it with "
                    f"`modal deploy`, or check the names (and the environment) in backend='modal:APP/FUNCTION'"
                ) from None
            raise

    async def _run(self, batch: Batch) -> None:
        started = asyncio.get_running_loop().time()
        mapper = self._function.starmap if self._star else self._function.map
        try:
            outputs = [o async for o in mapper.aio(batch.args, order_outputs=True, return_exceptions=True)]
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._outbox.put(BatchResult(batch, lost=e))
            return
        values = [None if isinstance(o, BaseException) else o for o in outputs]
        errors = [_error_tuples(i, o) for i, o in enumerate(outputs) if isinstance(o, BaseException)]
        self._outbox.put(BatchResult(batch, values, errors, asyncio.get_running_loop().time() - started))

    def submit(self, batch: Batch) -> None:
        assert self._loop is not None
        future = self._loop.call(self._run(batch))
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)

    def results(self, timeout: float | None) -> list[BatchResult]:
        return drain(self._outbox, timeout)

    def cancel(self) -> None:
        for future in list(self._futures):
            future.cancel()

    def finish(self) -> None:
        self.cancel()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None


__all__ = ["ModalBackend", "DeployedBackend", "ModalSetupError", "check_credentials", "check_reachable"]
