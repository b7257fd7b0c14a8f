"""Backends by name: where the rows run.

The registry maps a name to a factory and imports each backend only when it is used, so
``import modal_magic`` never pays for the Modal client. Add one with :func:`register_backend`.
``async def`` functions run on the asyncio backend whichever local backend was named, unless their
:class:`~modal_magic.backends.base.Runtime` asks for worker processes (an LLM run with ``processes=``).
"""

from __future__ import annotations

import importlib
from typing import Callable

from .base import Account, Backend, BackendFailed, Batch, BatchResult, Runtime, Task

__all__ = ["Account", "Backend", "BackendFailed", "Batch", "BatchResult", "Runtime", "Task", "backend_names", "create_backend", "register_backend"]

_FACTORIES: dict[str, str | Callable[[], Backend]] = {
    "local": "modal_magic.backends.processes:ProcessBackend",
    "threads": "modal_magic.backends.threads:ThreadBackend",
    "sequential": "modal_magic.backends.sequential:SequentialBackend",
    "modal": "modal_magic.backends.modal:ModalBackend",
}
_DEPLOYED = "modal_magic.backends.modal:DeployedBackend"
_ASYNC = "modal_magic.backends.aio:AsyncBackend"
_ASYNC_PROCESSES = "modal_magic.backends.processes:AsyncProcessBackend"


def register_backend(name: str, factory: str | Callable[[], Backend]) -> None:
    """Make ``backend=name`` available; ``factory`` is a callable or a lazy ``"module:Class"`` path.

    Examples
    --------
    >>> from modal_magic.backends.sequential import SequentialBackend
    >>> register_backend("inline", SequentialBackend)
    >>> "inline" in backend_names()
    True
    """
    _FACTORIES[name] = factory


def backend_names() -> list[str]:
    """The registered backend names, in registration order."""
    return list(_FACTORIES)


def _load(factory: str | Callable[[], Backend]) -> Backend:
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory()  # type: ignore[operator]


def create_backend(task: Task) -> Backend:
    """A fresh backend for one run of ``task`` (backends may share warm resources between runs)."""
    if task.runtime.backend is not None:
        return task.runtime.backend()
    name = task.options.backend
    if task.is_async and not task.options.is_modal:
        if name == "local" and task.runtime.worker_processes > 1:
            return _load(_ASYNC_PROCESSES)
        return _load(_ASYNC)
    if name.startswith("modal:"):
        return _load(_DEPLOYED)
    return _load(_FACTORIES[name])
