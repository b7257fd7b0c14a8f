"""What a warm Modal container runs: one generic batch runner that is sent each user function once.

A warm session's app has a single Modal function, :func:`serve`, created once per container spec.
Each remote input is ``(token, payload, batch_id, rows)``: ``token`` names a user function (a hash
of its pickled runner), and ``payload`` is that runner's bytes, or ``None``. A container keeps the
runners it has unpickled by token, so it needs a function's bytes once, not once per batch: an input
without bytes for a token the container doesn't know yet comes back as ``("need", batch_id)`` and
the kernel sends that batch again with them. While the function is unchanged the container keeps the
same unpickled function, so its module-level state (a model loaded lazily into a global) survives
from one batch, and one cell, to the next. ``async def`` runners run on one event loop per container
that outlives batches, as an HTTP client bound to it must.

This module is shipped to containers by value: only the standard library and cloudpickle.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

__all__ = ["NEED_FUNCTION", "serve", "MAX_RUNNERS"]

#: the reply to an input whose function the container hasn't been sent yet
NEED_FUNCTION = "modal_magic:need-function"
#: functions a container keeps unpickled (the last ones used); an older one is sent again if needed
MAX_RUNNERS = 4

# Module state that travels (pickled, empty) with serve(): a lock can't be pickled, so it is made on first use.
_RUNNERS: OrderedDict[str, Any] = OrderedDict()
_LOOP: list[asyncio.AbstractEventLoop] = []
_LOCKS: dict[str, Any] = {}


def _lock() -> Any:
    return _LOCKS.setdefault("lock", threading.Lock())  # setdefault is atomic: one lock per container


def _runner(token: str, payload: bytes | None) -> Any:
    with _lock():
        runner = _RUNNERS.get(token)
        if runner is not None:
            _RUNNERS.move_to_end(token)
            return runner
        if payload is None:
            return None
        import cloudpickle

        runner = _RUNNERS[token] = cloudpickle.loads(payload)
        while len(_RUNNERS) > MAX_RUNNERS:
            _RUNNERS.popitem(last=False)
        return runner


def _loop() -> asyncio.AbstractEventLoop:
    with _lock():
        if not _LOOP:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="modal_magic-container-loop", daemon=True).start()
            _LOOP.append(loop)
        return _LOOP[0]


def serve(item: tuple[str, bytes | None, int, list[Any]]) -> Any:
    """Run one batch of rows with the function ``token`` names; ``(NEED_FUNCTION, batch_id)`` if unknown.

    Examples
    --------
    >>> serve(("no-such-token", None, 7, [1, 2]))
    ('modal_magic:need-function', 7)
    """
    token, payload, batch_id, rows = item
    runner = _runner(token, payload)
    if runner is None:
        return NEED_FUNCTION, batch_id
    if asyncio.iscoroutinefunction(runner):
        return asyncio.run_coroutine_threadsafe(runner((batch_id, rows)), _loop()).result()
    return runner((batch_id, rows))
