"""The result cache as one run uses it: the rows' keys, the hits up front, successes as they arrive.

The engine opens a :class:`RunCache` per run (:meth:`RunCache.open`), asks it for the rows it
already holds, and hands it each batch that comes back; :func:`result_options` says which options
can change a row's result and so belong in the cache key.
"""

from __future__ import annotations

import sqlite3
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..fingerprint import function_fingerprint
from .database import warn_once
from .default import default_cache
from .keys import RowKeyHasher

if TYPE_CHECKING:
    from ..backends.base import Task
    from ..options import MapOptions

__all__ = ["RunCache", "result_options"]


class RunCache:
    """The per-row cache as one run uses it: keys for its rows, hits up front, successes as they arrive.

    Rows are keyed only when a key is needed: all of them up front when the cache holds results of
    this function (to look them up), else only the rows being stored, as they are written. A
    function's first run, and every run of one whose rows are too cheap to store, hashes nothing
    before its rows start, and a cheap map never pays for keys it won't use.

    Successes are written as batches return, grouped so that cheap rows don't pay a database write
    per batch: the buffer is written once it holds ``FLUSH_WORK_S`` of computed work or
    ``FLUSH_ROWS`` rows, and always at the end. Work that took real time (an LLM call, a GPU batch)
    is therefore written at once, and a crash loses at most the rows in flight plus a fraction of a
    second's worth of cheap ones. Rows under ``CHEAP_ROW_S`` each (by their batch's time, and by
    the run's so far) aren't stored at all.
    """

    FLUSH_WORK_S = 0.25
    FLUSH_ROWS = 50_000
    #: rows that computed faster than this aren't stored: keying, storing and reading one back costs
    #: about 1 µs, so storing them would slow the first run for a re-run no faster than computing them
    CHEAP_ROW_S = 2e-6

    def __init__(self, cache: Any, hasher: RowKeyHasher, args: list[Any], star: bool, refresh: bool) -> None:
        self.cache = cache
        self.hasher = hasher
        self.args = args
        self.star = star
        self.refresh = refresh
        self.problems: list[tuple[bytes, str]] = []
        self._keys: tuple[np.ndarray, np.ndarray] | None = None  # every row's, once needed
        self._positions: list[Sequence[int]] = []
        self._values: list[Any] = []
        self._buffered_work_s = 0.0
        self._seen_rows = 0
        self._seen_work_s = 0.0

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
        return cls(cache, RowKeyHasher(fingerprint), args, task.star, task.options.cache == "refresh")

    def hits(self) -> tuple[np.ndarray, list[Any]]:
        """The positions of the rows the cache holds, and their values."""
        if self.refresh or not self.args or not self.cache.holds_part(self.hasher.part):
            return np.empty(0, dtype=np.intp), []
        self._keys = self.hasher.key_array(self.args, self.star)
        return self.cache.lookup(*self._keys)

    def save(self, positions: Sequence[int], values: list[Any], failed: list[int], work_s: float) -> None:
        self._seen_rows += len(positions)
        self._seen_work_s += work_s
        if work_s < self.CHEAP_ROW_S * len(positions):
            return
        if not failed:
            self._positions.append(positions)
            self._values.extend(values)
        else:
            skip = set(failed)
            kept = [i for i, p in enumerate(positions) if p not in skip]
            self._positions.append([positions[i] for i in kept])
            self._values.extend(values[i] for i in kept)
        self._buffered_work_s += work_s
        if self._buffered_work_s >= self.FLUSH_WORK_S or len(self._values) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        # The one-row batches a run starts with carry a worker's first-call costs, so cheap rows can
        # look worth storing there; judged on the run so far they aren't, and they are dropped: one
        # stored row would make every later run of the function key all its rows to look it up.
        if self._values and self._seen_work_s >= self.CHEAP_ROW_S * self._seen_rows:
            if self._keys is not None:
                where = np.concatenate([np.arange(p.start, p.stop) if isinstance(p, range) else np.asarray(p, dtype=np.intp)
                                        for p in self._positions])
                packed, bad = self._keys[0][where], self._keys[1][where]
            else:
                rows: list[Any] = []
                for positions in self._positions:
                    if isinstance(positions, range):
                        rows.extend(self.args[positions.start : positions.stop])
                    else:
                        rows.extend(self.args[p] for p in positions)
                packed, bad = self.hasher.key_array(rows, self.star)
            values = self._values
            if bad.any():  # inputs that can't be hashed faithfully aren't cached
                values = [value for value, skip in zip(values, bad.tolist()) if not skip]
                packed = packed[~bad]
            self.problems.extend(self.cache.put_packed(packed, values))
        self._positions, self._values = [], []
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
