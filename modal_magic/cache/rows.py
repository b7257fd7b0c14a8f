"""The result cache as one run uses it: the rows' keys, the hits up front, successes as they arrive.

The engine opens a :class:`RunCache` per run (:meth:`RunCache.open`), asks it for the rows it
already holds, and hands it each batch that comes back; :func:`result_options` says which options
can change a row's result and so belong in the cache key.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..fingerprint import function_fingerprint
from .database import warn_once
from .default import default_cache
from .location import default_cache_dir
from .key_memo import KEY_MEMO
from .keys import KEY_BYTES, RowKeyHasher, key_list, put_keys, take_keys
from .match import WriteLog

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
    second's worth of cheap ones. Rows under ``CHEAP_ROW_S`` each aren't stored at all, nor, unless
    they take ``COSTLY_ROW_S``, rows of a run whose rows were mostly that cheap.
    """

    FLUSH_WORK_S = 0.25
    FLUSH_ROWS = 50_000
    #: rows that computed faster than this aren't stored: keying, storing and reading one back costs
    #: about 1 µs, so storing them would slow the first run for a re-run no faster than computing them
    CHEAP_ROW_S = 2e-6
    #: a batch this slow a row is stored even in a run of mostly cheap rows (say a function that
    #: skips most rows but calls a model on some): no hiccup of a busy machine makes cheap rows
    #: look this slow
    COSTLY_ROW_S = 0.01

    def __init__(self, cache: Any, hasher: RowKeyHasher, args: list[Any], star: bool, refresh: bool,
                 frame: Any = None) -> None:
        self.cache = cache
        self.hasher = hasher
        self.args = args
        self.star = star
        self.refresh = refresh
        # The frame mapped, when its rows are its column's own objects: their keys are remembered
        # while it lives (see key_memo); None, and nothing is remembered
        self.frame = frame
        self._remembered = False  # whether this run's keys are the memo's now
        # a first run's keys, flush by flush: (positions, packed, bad); put in row order only if a later run asks
        self._keyed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # where a first run's rows went, made as the first are written; False once it can't be every row, each once
        self._layout: WriteLog | bool | None = None
        self.problems: list[tuple[bytes, str]] = []
        self._keys: tuple[np.ndarray, np.ndarray] | None = None  # every row's, once needed
        self._buffer: list[tuple[Sequence[int], list[Any], float]] = []  # (positions, values, per row s)
        self._buffered_rows = 0
        self._buffered_work_s = 0.0
        self._cheap_rows = 0  # rows of the run so far in batches under CHEAP_ROW_S a row
        self._costly_rows = 0

    @classmethod
    def open(cls, task: Task, args: list[Any], frame: Any = None) -> RunCache | None:
        try:
            cache = default_cache()
        except (OSError, ValueError, sqlite3.Error) as e:
            # Once per trouble: an unsafe or broken cache directory doesn't change between cells.
            what = f"{e}. Runs go on without it (nothing is read from or written to it) until that is fixed"
            if isinstance(e, sqlite3.Error) and "full" in str(e):
                what = (f"the disk holding {default_cache_dir()} is full ({e}). Runs go on without it: free some "
                        "space or point MODAL_MAGIC_CACHE_DIR elsewhere")
            warn_once(f"modal_magic's result cache is off: {what}", stacklevel=5)
            return None
        fingerprint = function_fingerprint(task.fn, star=task.star, result_options=result_options(task.options))
        return cls(cache, RowKeyHasher(fingerprint), args, task.star, task.options.cache == "refresh", frame)

    def hits(self) -> tuple[np.ndarray, list[Any]]:
        """The positions of the rows the cache holds, and their values."""
        if self.refresh or not self.args or not self.cache.holds_part(self.hasher.part):
            return np.empty(0, dtype=np.intp), []
        if self.frame is None:
            self._keys = self.hasher.key_array(self.args, self.star)
        else:  # re-running a cell: the same objects keep the keys they had (see key_memo)
            self._keys = KEY_MEMO.keys(self.hasher.fingerprint, self.args, self._hash_rows, anchors=[self.frame])
            self._remembered = True
        return self.cache.lookup(*self._keys)

    def row_keys(self, positions: Sequence[int]) -> list[bytes | None]:
        """The keys of the rows at ``positions`` (``None`` for a row that can't be hashed faithfully)."""
        if self._keys is not None:
            where = np.asarray(positions, dtype=np.intp)
            return key_list(take_keys(self._keys[0], where), self._keys[1][where])
        return self.hasher.keys([self.args[int(p)] for p in positions], self.star)

    def _hash_rows(self, rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        return self.hasher.key_array(rows, self.star)

    def keep_keys_with(self, frame: Any) -> None:
        """Remember this run's keys while ``frame`` (the frame it returned) lives, too."""
        if self._remembered:
            KEY_MEMO.anchor(frame)

    def save(self, positions: Sequence[int], values: list[Any], failed: list[int], work_s: float) -> None:
        per_row = work_s / max(1, len(positions))
        if per_row < self.CHEAP_ROW_S:
            self._cheap_rows += len(positions)
            return
        if len(positions) > 1:  # a one-row batch may be all warm-up (a worker's or the function's first call)
            self._costly_rows += len(positions)
        if failed:
            skip = set(failed)
            kept = [i for i, p in enumerate(positions) if p not in skip]
            positions, values = [positions[i] for i in kept], [values[i] for i in kept]
        self._buffer.append((positions, values, per_row))
        self._buffered_rows += len(values)
        self._buffered_work_s += work_s
        if self._buffered_work_s >= self.FLUSH_WORK_S or self._buffered_rows >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered and worth keeping."""
        # A batch's time is wall time: a first call (a worker's, or a function loading its model)
        # or a busy machine can make a batch of cheap rows look costly. So a batch is stored when
        # most of the run's rows so far came in costly batches of several rows, or when it is far
        # too slow for noise to explain and not a lone row: one stray stored row would make every
        # later run of a cheap function key all its rows to look it up.
        mostly_costly = self._costly_rows >= self._cheap_rows
        kept = [entry for entry in self._buffer
                if mostly_costly or (entry[2] >= self.COSTLY_ROW_S and len(entry[1]) > 1)]
        if kept:
            values = list(itertools.chain.from_iterable(batch_values for _, batch_values, _ in kept))
            where = np.concatenate([np.arange(p.start, p.stop) if isinstance(p, range) else np.asarray(p, dtype=np.intp)
                                    for p, _, _ in kept])
            if self._keys is not None:
                packed, bad = take_keys(self._keys[0], where), self._keys[1][where]
            else:
                rows: list[Any] = []
                for positions, _, _ in kept:
                    if isinstance(positions, range):
                        rows.extend(self.args[positions.start : positions.stop])
                    else:
                        rows.extend(self.args[p] for p in positions)
                packed, bad = self.hasher.key_array(rows, self.star)
                # (positions as int32 where they fit: the memo holds them until a re-run asks)
                self._keyed.append((where.astype(np.int32) if len(self.args) < 2**31 else where, packed, bad))
            if bad.any():  # inputs that can't be hashed faithfully aren't cached
                values = [value for value, skip in zip(values, bad.tolist()) if not skip]
                packed = take_keys(packed, ~bad)
            if len(values):
                written: list[tuple[int, int]] = []
                self.problems.extend(self.cache.put_packed(packed, values, written=written))
                self._note_written(where[~bad] if bad.any() else where, packed, written, len(values))
        self._buffer = []
        self._buffered_rows = 0
        self._buffered_work_s = 0.0

    def _note_written(self, positions: np.ndarray, packed: np.ndarray, written: list[tuple[int, int]],
                      stored: int) -> None:
        """Follow where this run's rows went, while every row it stored is accounted for."""
        if self._layout is False:
            return
        if sum(n for _, n in written) != stored or self._keys is not None:  # a re-run reads instead
            self._layout = False
            return
        if self._layout is None:
            self._layout = WriteLog(len(self.args))
        self._layout.add(positions, packed, written)

    def _remember_layout(self) -> None:
        """A run that stored every row tells the cache where: re-running it then matches nothing."""
        layout, self._layout = self._layout, False
        if not isinstance(layout, WriteLog) or not layout.written:
            return
        if layout.complete() and not any(bad.any() for _, _, bad in self._keyed):  # each row stored once
            try:
                self.cache.stored_all(layout)
            except sqlite3.Error:  # only a shortcut for the next lookup: that lookup matches keys instead
                pass

    def report(self) -> None:
        self._remember_layout()
        if self._keyed and self.frame is not None:  # a first run: its keys serve the next run of the cell
            # Put in row order when that run asks, not now: the end of a run waits for nothing else.
            # (Only the keys go with it, not this run: the memo must not keep the frame alive.)
            KEY_MEMO.remember_later(self.hasher.fingerprint, self.args,
                                    functools.partial(_in_row_order, len(self.args), self._keyed), anchors=[self.frame])
            self._keyed = []
            self._remembered = True
        if self.problems:
            warnings.warn(
                f"{len(self.problems)} result(s) were not cached ({self.problems[0][1]}); "
                "they are in the returned frame but will be computed again on the next run",
                stacklevel=4,
            )


def _in_row_order(n: int, keyed: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A first run's keys by position ``(packed, bad, known)``, from what its flushes keyed
    (``(positions, packed, bad)`` each)."""
    packed, bad, known = np.empty((n, KEY_BYTES), dtype=np.uint8), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for where, piece, piece_bad in keyed:
        put_keys(packed, where, piece)
        bad[where], known[where] = piece_bad, True
    return packed, bad, known


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
