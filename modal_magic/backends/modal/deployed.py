"""``backend="modal:APP/FUNCTION"``: map over a Function already deployed with ``modal deploy``.

Each batch of rows is one ``Function.map`` call on the deployed Function (one input per row, so a
``@modal.batched`` function is batched by Modal itself), driven from a private event loop in a
background thread. A name that doesn't exist is a clear error before any row runs. modal_magic
can't see a deployed function's code, so these runs are never cached.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

from ...errors import ModalSetupError
from ...options import DEFAULT_DEPLOYED_CONCURRENCY
from ..base import Backend, Batch, BatchResult, LoopThread, Task, drain
from .setup import check_credentials, check_reachable, error_tuples

__all__ = ["DeployedBackend"]


class DeployedBackend(Backend):
    """``backend="modal:APP/FUNCTION"``: each batch of rows is one ``Function.map`` call on a deployed Function."""

    name = "modal-deployed"

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._loop: LoopThread | None = None
        self._futures: set[Any] = set()

    @property
    def capacity(self) -> int:
        return self._options.max_containers or DEFAULT_DEPLOYED_CONCURRENCY

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
        errors = [error_tuples(i, o) for i, o in enumerate(outputs) if isinstance(o, BaseException)]
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


