"""Which stored chunk holds each key asked for: one hash table of the asked keys, probed by every
stored key in one vectorised call.

A cached re-run of a million rows asks for a million keys at once, against chunks of thousands of
keys each. Doing that with a Python dict (one ``bytes`` object per key, one lookup per stored key)
cost about 3 µs a row, more than computing a cheap row again. Here the asked keys stay one
``(n, KEY_BYTES)`` uint8 array: their last 8 bytes go into a pandas hash table (random bits: the key
is a hash), the keys of all the function's chunks probe it at once, and the first 8 bytes are
compared for the rows that matched, so a hit is always a match of the whole key. Chunks are taken
oldest first and a newer chunk's copy of a key wins over an older one's, so the newest result wins
(a ``cache="refresh"`` run, a retry). When the stored keys are exactly the asked ones, in order (a
re-run of the frame the function last ran on, stored in order), :class:`InOrder` skips all of that.

Examples
--------
>>> import numpy as np
>>> asked = np.arange(3 * KEY_BYTES, dtype=np.uint8).reshape(3, KEY_BYTES)
>>> matcher = KeyMatcher(asked)
>>> [chunk_id for chunk_id, _ in matcher.match([(5, asked[[1]].tobytes()), (7, asked[[2, 0]].tobytes())])]
[5, 7]
>>> rows, values = matcher.assemble({5: ["one"], 7: ["two", "zero"]})
>>> rows.tolist(), values
([0, 1, 2], ['zero', 'one', 'two'])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import xxhash

from .chunks import IMMUTABLE, own_copy
from .keys import KEY_BYTES, take_keys

__all__ = ["Found", "InOrder", "KeyMatcher", "WriteLog"]


def _low_half(keys: np.ndarray) -> np.ndarray:
    """Each key's last 8 bytes as one uint64 (of the row's hash, so well spread)."""
    return np.ascontiguousarray(keys[:, KEY_BYTES - 8 :]).view("<u8").ravel()


def _high_half(keys: np.ndarray) -> np.ndarray:
    """Each key's first 8 bytes as one uint64: one comparison a key instead of eight."""
    return np.ascontiguousarray(keys[:, : KEY_BYTES - 8]).view("<u8").ravel()


class KeyMatcher:
    """Matches asked keys against stored chunks' keys, the newest chunk winning.

    Parameters
    ----------
    keys : numpy.ndarray
        The keys asked for, ``(n, KEY_BYTES)`` uint8 (equal keys may repeat: each such row gets the
        value, each its own object unless immutable).
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self._high = _high_half(keys)
        self._codes, uniques = pd.factorize(_low_half(keys))
        self._table = pd.Index(uniques)
        # factorize numbers keys in order of first appearance, so a row repeats an earlier key's
        # half exactly when its code is no greater than the largest code before it
        self._repeat = np.zeros(len(keys), dtype=bool)
        self._repeat[1:] = self._codes[1:] <= np.maximum.accumulate(self._codes)[:-1]
        self._first_row = np.flatnonzero(~self._repeat)  # the first row of each code, in code order
        # A row that shares its last 8 bytes with an earlier asked key but not its first 8 (a chance
        # of 2**-64) would be matched through that key: it is never a hit.
        self._ambiguous = self._high != self._high[self._first_row[self._codes]]
        self._needed: list[tuple[int, bytes]] = []
        #: where this lookup's hits were, once assembled from every chunk it needed (see Found)
        self.found: Found | None = None
        self._owner = np.full(len(uniques), -1, dtype=np.int64)  # offset among the stored keys, per code
        self._chunks: list[tuple[int, bytes]] = []
        self._starts = np.zeros(0, dtype=np.int64)
        self._stored = np.zeros((0, KEY_BYTES), dtype=np.uint8)

    def match(self, chunks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """Note which asked keys the chunks (``(chunk id, keys blob)``, oldest first) hold; return
        the chunks that hold the newest copy of some asked key."""
        if not chunks:
            return []
        self._chunks = chunks
        sizes = np.fromiter((len(blob) // KEY_BYTES for _, blob in chunks), dtype=np.int64, count=len(chunks))
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._stored = np.frombuffer(b"".join(blob for _, blob in chunks), dtype=np.uint8).reshape(-1, KEY_BYTES)
        found = self._table.get_indexer(_low_half(self._stored))
        where = np.flatnonzero(found >= 0)
        # the table matched the last 8 bytes; an owner must match the first 8 too
        where = where[_high_half(self._stored[where]) == self._high[self._first_row[found[where]]]]
        np.maximum.at(self._owner, found[where], where)  # offsets grow with age: the newest copy wins
        owned = self._owner[self._owner >= 0]
        which = np.unique(np.searchsorted(self._starts, owned, side="right") - 1)
        self._needed = [chunks[i] for i in which.tolist()]
        return self._needed

    def assemble(self, loaded: dict[int, list[Any]]) -> tuple[np.ndarray, list[Any]]:
        """The asked rows that are hits and their values, given the loaded chunks' values by chunk id.

        A row whose newest chunk isn't in ``loaded`` (it failed its check) is a miss, even if an
        older chunk holds it: it runs again.
        """
        owned = self._owner[self._codes] if len(self._codes) else np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(owned >= 0)
        offsets = owned[rows]
        chunk = np.searchsorted(self._starts, offsets, side="right") - 1
        usable = np.fromiter((chunk_id in loaded for chunk_id, _ in self._chunks), dtype=bool, count=len(self._chunks))
        keep = usable[chunk] & ~self._ambiguous[rows]
        if not keep.all():
            rows, offsets, chunk = rows[keep], offsets[keep], chunk[keep]
        # The loaded chunks' values, one list in chunk order; each row's place in it
        flat: list[Any] = []
        flat_start = np.zeros(len(self._chunks), dtype=np.int64)
        for i, (chunk_id, _) in enumerate(self._chunks):
            values = loaded.get(chunk_id)
            if values is not None:
                flat_start[i] = len(flat)
                flat.extend(values)
        places = offsets - self._starts[chunk] + flat_start[chunk]
        copies = np.flatnonzero(self._repeat[rows])
        if all(chunk_id in loaded for chunk_id, _ in self._needed):
            self.found = Found.of_lookup(self._needed, rows, places, copies, self.keys,
                                         [chunk_id for chunk_id, _ in self._chunks])
        return rows, _gather(flat, places, copies)


def _gather(flat: list[Any], places: np.ndarray, copies: np.ndarray, in_order: bool | None = None) -> list[Any]:
    """``flat[place]`` for each place; the values at ``copies`` (rows repeating an earlier row's key,
    handed the same object) each become their own copy. ``in_order``: whether ``places`` is known to
    be ``0, 1, 2, ...`` (``None``: look)."""
    if in_order is None:
        in_order = len(places) == len(flat) and bool((places == np.arange(len(flat))).all())
    if in_order:
        values = flat  # the chunks are the rows asked for, in order
    else:
        values = list(map(flat.__getitem__, places.tolist()))
    if len(copies) and not {type(values[i]) for i in copies.tolist()} <= IMMUTABLE:
        for i in copies.tolist():
            values[i] = own_copy(values[i])
    return values


def _view(data: Any) -> memoryview:
    """``data`` (an array, or bytes) as the flat bytes a digest reads."""
    return memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")


def _digest(data: Any) -> bytes:
    return xxhash.xxh3_128_digest(_view(data))


def _digest_in_order(keys: np.ndarray, order: np.ndarray, step: int = 1 << 16) -> bytes:
    """:func:`_digest` of ``keys[order]``, taken a slice at a time: no copy of all the keys at once."""
    digest = xxhash.xxh3_128()
    for start in range(0, len(order), step):
        digest.update(_view(take_keys(keys, order[start : start + step])))
    return digest.digest()


class Found:
    """Where a lookup's hits were, so that the same lookup again needs no matching.

    Re-running a cell asks for the same keys, of the same chunks: as long as the keys asked, the
    ids of the function's chunks and the keys of the chunks holding hits are exactly as they were
    (:meth:`fits`, by digest), every row's newest copy is where it was, and only the chunks that
    hold hits are read (and checked) again.
    """

    def __init__(self, needed_ids: list[int], sizes: list[int], rows: np.ndarray | None, places: np.ndarray,
                 copies: np.ndarray, asked: int, chunk_ids: list[int], asked_digest: bytes, needed_digest: bytes,
                 order: np.ndarray | None = None, in_order: bool | None = None) -> None:
        self._needed_ids = needed_ids  # the chunks holding hits, and how many rows each holds
        self._sizes = sizes
        self._rows = None if rows is None or len(rows) == asked else rows  # None: every asked row
        self._asked = asked
        self._places = places.astype(np.int32) if len(places) and places.max() < 2**31 else places
        self._copies = copies
        self._order = order  # the asked rows in the order their digest was taken (None: as asked)
        self._in_order = in_order  # whether the chunks hold every asked row, in order (None: unknown)
        self._key = (asked_digest, tuple(chunk_ids), needed_digest)

    @classmethod
    def of_lookup(cls, needed: list[tuple[int, bytes]], rows: np.ndarray, places: np.ndarray, copies: np.ndarray,
                  asked: np.ndarray, chunk_ids: list[int]) -> Found:
        """Where a lookup of ``asked`` among the function's ``chunk_ids`` found its hits: the
        ``needed`` chunks (``(chunk id, keys blob)``), and for each hit row its place among them."""
        return cls([chunk_id for chunk_id, _ in needed], [len(blob) // KEY_BYTES for _, blob in needed], rows,
                   places, copies, len(asked), chunk_ids, _digest(asked),
                   _digest(b"".join(blob for _, blob in needed)))

    @classmethod
    def of_writes(cls, log: WriteLog, chunk_ids: list[int]) -> Found:
        """Where a run that stored every row once put them (its :class:`WriteLog`), among the
        function's ``chunk_ids``: nothing to read back. The keys asked for next time, taken in the
        order they were written, must be the keys the chunks hold."""
        digest = log.digest.digest()
        return cls([chunk_id for chunk_id, _ in log.written], [n for _, n in log.written], None, log.places,
                   np.zeros(0, dtype=np.intp), len(log.places), chunk_ids, digest, digest,
                   order=None if log.in_order else log.order(), in_order=log.in_order)

    def fits(self, asked: np.ndarray, chunks: list[tuple[int, bytes]]) -> bool:
        """Whether this is where the hits of a lookup of ``asked`` in the function's ``chunks`` are."""
        if len(asked) != self._asked or tuple(chunk_id for chunk_id, _ in chunks) != self._key[1]:
            return False
        blobs = dict(chunks)
        asked_digest = _digest(asked) if self._order is None else _digest_in_order(asked, self._order)
        return (asked_digest == self._key[0]
                and _digest(b"".join(blobs[chunk_id] for chunk_id in self._needed_ids)) == self._key[2])

    def needed(self, chunks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The chunks holding hits, as ``(chunk id, keys blob)`` from the function's ``chunks``."""
        blobs = dict(chunks)
        return [(chunk_id, blobs[chunk_id]) for chunk_id in self._needed_ids]

    def assemble(self, loaded: dict[int, list[Any]]) -> tuple[np.ndarray, list[Any]]:
        """As :meth:`KeyMatcher.assemble`: a chunk that failed its check leaves its rows misses."""
        rows = np.arange(self._asked) if self._rows is None else self._rows
        flat: list[Any] = []
        for chunk_id, size in zip(self._needed_ids, self._sizes):
            flat.extend(loaded.get(chunk_id) or [None] * size)
        if all(chunk_id in loaded for chunk_id in self._needed_ids):
            return rows, _gather(flat, self._places, self._copies, self._in_order)
        starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        ok = np.fromiter((chunk_id in loaded for chunk_id in self._needed_ids), dtype=bool, count=len(self._sizes))
        keep = ok[np.searchsorted(starts, self._places, side="right") - 1]
        copies = np.flatnonzero(np.isin(np.arange(len(rows)), self._copies)[keep])
        return rows[keep], _gather(flat, self._places[keep], copies)


class InOrder:
    """The stored chunks of a function are, oldest first, exactly the rows asked for: row ``i``'s
    value is the ``i``-th stored one.

    The usual re-run of a cell (the frame this function last ran on, every row stored by that run)
    takes this path: one comparison of the keys as bytes instead of hashing and probing them.
    """

    def __init__(self, chunks: list[tuple[int, bytes]]) -> None:
        self._chunks = chunks

    @staticmethod
    def fits(keys: np.ndarray, blobs: list[bytes]) -> bool:
        """Whether the chunks' keys, in order, are ``keys``."""
        return sum(map(len, blobs)) == keys.nbytes and b"".join(blobs) == keys.tobytes()

    def assemble(self, loaded: dict[int, list[Any]]) -> tuple[np.ndarray, list[Any]]:
        """The rows of the chunks that loaded (one that failed its check leaves its rows misses), and their values."""
        rows: list[np.ndarray] = []
        values: list[Any] = []
        start = 0
        for chunk_id, keys_blob in self._chunks:
            n = len(keys_blob) // KEY_BYTES
            chunk_values = loaded.get(chunk_id)
            if chunk_values is not None:
                rows.append(np.arange(start, start + n))
                values.extend(chunk_values)
            start += n
        return (np.concatenate(rows) if rows else np.empty(0, dtype=np.intp)), values


class WriteLog:
    """Where a first run's rows go as they are stored, kept as they are written, for :meth:`Found.of_writes`.

    Row ``positions[j]`` of a write goes ``j``-th into that write's chunks; the log keeps each
    row's place among all the chunks written, and a running digest of their keys in that order,
    which is the digest :meth:`Found.fits` takes of the chunks' stored keys. So a run that stores
    every row leaves behind where each is without gathering or hashing its keys again at the end.

    Examples
    --------
    >>> log = WriteLog(3)
    >>> keys = np.arange(3 * KEY_BYTES, dtype=np.uint8).reshape(3, KEY_BYTES)
    >>> log.add(np.array([2, 0]), keys[[2, 0]], [(11, 2)]); log.add(np.array([1]), keys[[1]], [(12, 1)])
    >>> log.places.tolist(), log.written, log.complete(), log.in_order
    ([1, 2, 0], [(11, 2), (12, 1)], True, False)
    """

    def __init__(self, n: int) -> None:
        self.places = np.full(n, -1, dtype=np.int32 if n < 2**31 else np.int64)
        self.written: list[tuple[int, int]] = []
        self.digest = xxhash.xxh3_128()
        self.stored = 0
        self._positions: list[np.ndarray] = []
        self.in_order = True  # whether the rows went in so far in their own order: 0, 1, 2, ...

    def add(self, positions: np.ndarray, keys: np.ndarray, written: list[tuple[int, int]]) -> None:
        """The rows at ``positions``, whose keys are ``keys``, went in that order into ``written``."""
        places = np.arange(self.stored, self.stored + len(positions), dtype=self.places.dtype)
        self.in_order = self.in_order and bool((positions == places).all())
        self.places[positions] = places
        self.stored += len(positions)
        self.digest.update(_view(keys))
        self.written.extend(written)
        self._positions.append(np.asarray(positions, dtype=self.places.dtype))

    def order(self) -> np.ndarray:
        """The rows' positions in the order they were written."""
        return np.concatenate(self._positions) if self._positions else np.empty(0, dtype=self.places.dtype)

    def complete(self) -> bool:
        """Whether every row was stored, each once."""
        return self.stored == len(self.places) and bool((self.places >= 0).all())
