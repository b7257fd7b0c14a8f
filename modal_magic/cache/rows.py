"""The result cache as one run uses it: the rows' keys, the hits up front, successes as they arrive.

The engine opens a :class:`RunCache` per run (:meth:`RunCache.open`), asks it for the rows it
already holds, and hands it each batch that comes back; :func:`result_options` says which options
can change a row's result and so belong in the cache key.
"""

from __future__ import annotations

import sqlite3
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from ..fingerprint import function_fingerprint
from .database import warn_once
from .default import default_cache

if TYPE_CHECKING:
    from ..backends.base import Task
    from ..options import MapOptions

__all__ = ["RunCache", "result_options"]


class RunCache:
    """The per-row cache as one run uses it: keys for its rows, hits up front, successes as they arrive.

    Successes are written as batches return, grouped so that cheap rows don't pay a database write
    per batch: the buffer is written once it holds ``FLUSH_WORK_S`` of computed work or
    ``FLUSH_ROWS`` rows, and always at the end. Work that took real time (an LLM call, a GPU batch)
    is therefore written at once, and a crash loses at most the rows in flight plus a few
    milliseconds' worth of cheap ones. Rows under ``CHEAP_ROW_S`` each aren't stored at all.
    """

    FLUSH_WORK_S = 0.05
    FLUSH_ROWS = 50_000
    #: rows that computed faster than this aren't stored: reading them back would cost more
    #: (about 1 µs a row) than computing them again, and storing them would slow the first run
    CHEAP_ROW_S = 5e-6

    def __init__(self, cache: Any, keys: list[bytes | None], refresh: bool) -> None:
        self.cache = cache
        self.keys = keys
        self.refresh = refresh
        self.problems: list[tuple[bytes, str]] = []
        self._keys: list[bytes | None] = []
        self._values: list[Any] = []
        self._buffered_work_s = 0.0

    @classmethod
    def open(cls, task: Task, args: list[Any]) -> RunCache | None:
        try:
            cache = default_cache()
        except (OSError, ValueError, sqlite3.Error) as e:
            # Once per trouble: an unsafe or broken cache directory doesn't change between cells.
            warn_once(f"modal_magic's result cache is off: {e}. Runs go on without it (nothing is "
                      "read from or written to it) until that is fixed", stacklevel=5)
            return None
        fingerprint = function_fingerprint(task.fn, star=task.star, result_options=result_options(task.options))
        return cls(cache, cache.row_keys(fingerprint, args, star=task.star), task.options.cache == "refresh")

    def hits(self) -> dict[int, Any]:
        return {} if self.refresh else self.cache.get_many(self.keys)

    def save(self, positions: Sequence[int], values: list[Any], failed: list[int], work_s: float) -> None:
        if work_s < self.CHEAP_ROW_S * len(positions):
            return
        if not failed and isinstance(positions, range):
            self._keys.extend(self.keys[positions.start : positions.stop])
            self._values.extend(values)
        else:
            skip = set(failed)
            kept = [i for i, p in enumerate(positions) if p not in skip]
            self._keys.extend(self.keys[positions[i]] for i in kept)
            self._values.extend(values[i] for i in kept)
        self._buffered_work_s += work_s
        if self._buffered_work_s >= self.FLUSH_WORK_S or len(self._keys) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            self.problems.extend(self.cache.put_columns(self._keys, self._values))
        self._keys, self._values = [], []
        self._buffered_work_s = 0.0

    def report(self) -> None:
        if self.problems:
            warnings.warn(
                f"{len(self.problems)} result(s) were not cached ({self.problems[0][1]}); "
                "they are in the returned frame but will be computed again on the next run",
                stacklevel=4,
            )


def result_options(options: MapOptions) -> dict[str, Any]:
    """The options that can change a row's result, for the cache key; speed-only options stay out.

    Runs on this machine share results whatever the local backend; a Modal run is keyed by its
    image and environment, since packages and hardware there may differ.
    """
    if not options.is_modal:
        return {"where": "local"}
    image = options.image
    return {
        "where": "modal",
        "image": None if image is None else f"{type(image).__name__}:{getattr(image, 'object_id', None)}",
        "pip": options.pip,
        "apt": options.apt,
        "python_version": options.python_version,
        "gpu": options.gpu,
        "env": dict(options.env),
        "secrets": tuple(s if isinstance(s, str) else getattr(s, "object_id", repr(s)) for s in options.secrets),
        "volumes": {k: v if isinstance(v, str) else repr(v) for k, v in options.volumes.items()},
    }
