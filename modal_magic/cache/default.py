"""The process-wide result cache: the one :func:`default_cache` every run uses, and :func:`clear`."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .location import default_cache_dir
from .database import DB_NAME
from .store import RowCache

__all__ = ["default_cache", "clear"]


_default: RowCache | None = None
_default_lock = threading.Lock()


def default_cache() -> RowCache:
    """The process's cache in :func:`default_cache_dir`, opened on first use (reopened if that moves)."""
    global _default
    directory = default_cache_dir()
    with _default_lock:
        if _default is None or _default.directory != directory:
            if _default is not None:
                _default.close()
            _default = RowCache(directory)
        return _default


def clear(path: str | os.PathLike[str] | None = None) -> None:
    """Delete every cached result in ``path`` (default: :func:`default_cache_dir`).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     with RowCache(directory) as cache:
    ...         _ = cache.put_many([(cache.row_keys("fp", [1])[0], "one")])
    ...     clear(directory)
    ...     with RowCache(directory) as cache:
    ...         print(cache.get_many(cache.row_keys("fp", [1])))
    {}
    """
    directory = Path(path).expanduser() if path is not None else default_cache_dir()
    with _default_lock:
        if _default is not None and _default.directory == directory:
            _default.clear()
            return
    if not (directory / DB_NAME).exists():
        return
    with RowCache(directory) as cache:
        cache.clear()

