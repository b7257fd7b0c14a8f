"""Row keys remembered within a kernel, so re-running a cell doesn't hash its column again.

Re-running a cell maps the same column's objects through the same function, and hashing them (a
UTF-8 encoding and an XXH3 call a string, ~0.3 µs a row) was most of a fully cached re-run's time.
:class:`KeyMemo` keeps the last run's row objects and their keys. A later run of the same
function (same fingerprint) compares the objects position by position (``is``, in one C loop) and
hashes only the positions whose object isn't the one keyed there last time.

Why this is safe: the memo holds strong references to the rows it keyed, so a row that ``is`` the
object keyed at its position is that very object, alive all along. The memo is used only when
every row is of an immutable type (``str``, ``bytes``, numbers, ``bool``, ``None``): the same
object then has the same value, hence the same key. A list row could change in place and stay the
same object, so the keys of a column with one are never reused.

It never keeps a frame's data alive: it is dropped as soon as every frame it was made from (the
frame mapped, and the frame returned) is garbage. One memo per kernel: the last run that keyed rows.

Examples
--------
>>> import numpy as np
>>> rows = ["a", "b", "c"]
>>> memo = KeyMemo()
>>> keyed = []
>>> def hash_rows(subset):
...     keyed.append(len(subset))
...     return np.zeros((len(subset), 16), dtype=np.uint8), np.zeros(len(subset), dtype=bool)
>>> _ = memo.keys("fp", rows, hash_rows)
>>> _ = memo.keys("fp", list(rows), hash_rows)   # the same objects: nothing hashed
>>> _ = memo.keys("fp", ["a", "B", "c"], hash_rows)   # one new object: one row hashed
>>> keyed
[3, 1]
"""

from __future__ import annotations

import operator
import threading
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from .chunks import IMMUTABLE
from .keys import put_keys

__all__ = ["KEY_MEMO", "KeyMemo"]


KeyHasher = Callable[[list[Any]], "tuple[np.ndarray, np.ndarray]"]


class _Entry:
    __slots__ = ("fingerprint", "rows", "_arrays", "_make", "anchors", "_immutable")

    def __init__(self, fingerprint: str, rows: list[Any], arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                 *, make: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                 immutable: bool | None = None) -> None:
        self.fingerprint = fingerprint
        self.rows = rows  # strong references: no other object can take one of these ids meanwhile
        self._arrays = arrays  # (packed, bad, known)
        self._make = make  # or what makes them, when first needed
        self.anchors: list[weakref.ref[Any]] = []  # the frames it lives no longer than
        self._immutable = immutable  # worked out by the next run that uses it, so a first run doesn't pay

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows' keys, whether each can't be hashed, whether each was keyed: ``(packed, bad, known)``."""
        if self._arrays is None:
            assert self._make is not None
            self._arrays, self._make = self._make(), None
        return self._arrays

    def immutable(self) -> bool:
        if self._immutable is None:
            self._immutable = _all_immutable(self.rows)
        return self._immutable


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that can't be written: the memo hands out its keys without copying them."""
    view = array.view()
    view.flags.writeable = False
    return view


def _all_immutable(rows: Sequence[Any]) -> bool:
    return set(map(type, rows)) <= IMMUTABLE  # the same object of these types keys the same


class KeyMemo:
    """The keys of the last run's rows, reused for the same objects by a run of the same function."""

    def __init__(self) -> None:
        self._entry: _Entry | None = None
        self._lock = threading.Lock()  # background runs key rows on their own threads

    def keys(self, fingerprint: str, rows: list[Any], hash_rows: KeyHasher, *,
             anchors: Sequence[Any] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Every row's key ``(packed, bad)``: remembered ones where the object is the same, the rest
        hashed with ``hash_rows(subset)``; and remember them all for the next run, while ``anchors`` live.
        """
        with self._lock:
            entry = self._entry
        if (entry is None or entry.fingerprint != fingerprint or len(entry.rows) != len(rows)
                or not entry.immutable()):
            packed, bad = hash_rows(rows)
            self.remember(fingerprint, rows, packed, bad, anchors=anchors)
            return packed, bad
        known_packed, known_bad, known = entry.arrays()
        # `is` (see the module): the memo holds its rows, so the same object at a position is the one it keyed
        if all(map(operator.is_, rows, entry.rows)) and known.all():
            for frame in anchors:
                self.anchor(frame)
            return _read_only(known_packed), _read_only(known_bad)
        same = np.fromiter(map(operator.is_, rows, entry.rows), dtype=bool, count=len(rows)) & known
        packed, bad = known_packed.copy(), known_bad.copy()
        fresh = np.flatnonzero(~same).tolist()
        fresh_rows = [rows[i] for i in fresh]
        fresh_packed, bad[fresh] = hash_rows(fresh_rows)
        put_keys(packed, fresh, fresh_packed)
        self._keep(_Entry(fingerprint, rows, (_read_only(packed), _read_only(bad), np.ones(len(rows), dtype=bool)),
                          immutable=_all_immutable(fresh_rows)), anchors)
        return _read_only(packed), _read_only(bad)

    def remember(self, fingerprint: str, rows: list[Any], packed: np.ndarray, bad: np.ndarray,
                 known: np.ndarray | None = None, *, anchors: Sequence[Any]) -> None:
        """Keep ``rows``' keys (``known`` marks the rows keyed; all by default) until every anchor is gone.

        They serve a later run only if every row is of an immutable type (checked then). With no
        anchors, they are kept until the next run replaces them.
        """
        known = np.ones(len(rows), dtype=bool) if known is None else known
        self._keep(_Entry(fingerprint, rows, (packed, bad, known)), anchors)

    def remember_later(self, fingerprint: str, rows: list[Any],
                       make: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                       anchors: Sequence[Any]) -> None:
        """:meth:`remember` the ``(packed, bad, known)`` that ``make()`` returns, made when a run first
        needs them: a first run, which keyed its rows piece by piece, doesn't put them together."""
        self._keep(_Entry(fingerprint, rows, None, make=make), anchors)

    def _keep(self, entry: _Entry, anchors: Sequence[Any]) -> None:
        with self._lock:
            self._entry = entry
        for frame in anchors:
            self.anchor(frame)

    def anchor(self, frame: Any) -> None:
        """Keep what is remembered now no longer than ``frame`` lives (or another of its anchors)."""
        with self._lock:
            entry = self._entry
        if entry is None or any(ref() is frame for ref in entry.anchors):
            return

        def gone(_: Any) -> None:
            if not any(ref() is not None for ref in entry.anchors):
                self._drop(entry)

        entry.anchors.append(weakref.ref(frame, gone))

    @property
    def current(self) -> _Entry | None:
        """What is remembered now: fingerprint, rows, keys (None when nothing is)."""
        return self._entry

    def _drop(self, entry: _Entry) -> None:
        with self._lock:
            if self._entry is entry:
                self._entry = None
        entry.rows = []  # now, not when the garbage collector gets to the entry's reference cycle

    def forget(self) -> None:
        """Drop what is remembered, as a restarted kernel has nothing (benchmarks and tests use it)."""
        with self._lock:
            self._entry = None


#: the kernel's one memo
KEY_MEMO = KeyMemo()
