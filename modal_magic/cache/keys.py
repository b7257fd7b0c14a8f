"""Row keys: a 16-byte hash of the function's fingerprint and one row's input values.

:func:`row_keys` is what the cache files results under. Equal values of the same type get the same
key in every process (no dependence on the string-hash seed or object identity); values of
different types never do. Raw input values are never stored, only these keys.

Examples
--------
>>> k = row_keys("fp", ["x", "y", "x"])
>>> len(k[0]), k[0] == k[2], k[0] == k[1]
(16, True, False)
"""

from __future__ import annotations

import io
import itertools
import pickle
from hashlib import blake2b
from typing import Any, Sequence

import numpy as np
import xxhash

__all__ = ["KEY_BYTES", "RowKeyHasher", "key_list", "put_keys", "row_keys", "take_keys"]

#: bytes in a row key: a 4-byte tag of the fingerprint (so one function's rows are found by an
#: index) and 12 bytes of the row's hash
KEY_BYTES = 16

_U64 = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array: a bijection that scatters every input bit."""
    z = z ^ (z >> _U64(30))
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


class RowKeyHasher:
    """Turns row values into two 64-bit lanes keyed by the fingerprint, vectorised per value type.

    ``str`` (as UTF-8) and ``bytes`` go through XXH3-128 seeded from the fingerprint (one C call a
    value: a third of the cost of two SipHash passes, which made keying most of a re-run); ``int``
    (within int64), ``float`` and ``bool`` through a keyed SplitMix64 of their bits (a bijection, so
    two different numbers never collide); anything else through BLAKE2b of a type tag and a
    memo-free pickle, row by row. Each type has its own keys, so ``1``, ``1.0``, ``True``, ``"1"``
    and ``b"1"`` all differ. A value's lanes depend only on the value and the fingerprint, never on
    its neighbours, so the same row gets the same key whatever else is in the column.

    Not to be confused with :class:`modal_magic.fingerprint.FunctionHasher`, which hashes the
    *function* (one object graph, walked); this one hashes row inputs, many at a time.
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        seed = blake2b(fingerprint.encode("utf-8", "surrogatepass"), digest_size=64, person=b"mm-rowkey-v2").digest()
        self.part = seed[:4]
        more = blake2b(seed, digest_size=64, person=b"mm-rowkey-v2b").digest()
        words = np.frombuffer(more, dtype="<u8")
        self.int_keys = (words[0], words[1])
        self.float_keys = (words[2], words[3])
        self.bool_keys = (words[4], words[5])
        self.column_keys = (words[6], words[7])
        self.str_seed = int.from_bytes(seed[4:12], "little")
        self.bytes_seed = int.from_bytes(seed[20:28], "little")
        self.generic_key = seed[36:64]

    def keys(self, rows: Sequence[Any], star: bool) -> list[bytes | None]:
        """One key per row (``None`` for a row that can't be hashed faithfully); see :func:`row_keys`."""
        return key_list(*self.key_array(rows, star))

    def key_array(self, rows: Sequence[Any], star: bool) -> tuple[np.ndarray, np.ndarray]:
        """The rows' keys as an ``(n, KEY_BYTES)`` uint8 array, and a bool mask of the rows without one.

        What the cache uses inside a run: no Python object per key (a million ``bytes`` keys
        cost ~60 MB and ~0.1 s to make), and a chunk's keys are one slice's ``tobytes()``.

        Examples
        --------
        >>> import threading
        >>> packed, bad = RowKeyHasher("fp").key_array(["a", threading.Lock(), "a"], star=False)
        >>> packed.shape, bad.tolist(), bytes(packed[0]) == bytes(packed[2])
        ((3, 16), [False, True, False], True)
        """
        n = len(rows)
        bad_mask = np.zeros(n, dtype=bool)
        if n == 0:
            return np.empty((0, KEY_BYTES), dtype=np.uint8), bad_mask
        a, b, bad = self._star(rows) if star else self._column(rows if isinstance(rows, list) else list(rows))
        # Bytes 0-3 the fingerprint's tag, 4-11 lane a, 12-15 half of lane b, written as two
        # little-endian words a key (five times faster than filling byte columns of a 2-D array).
        words = np.empty((n, 2), dtype="<u8")
        low, shift = _U64(0xFFFFFFFF), _U64(32)
        np.bitwise_or(_U64(int.from_bytes(self.part, "little")), (a & low) << shift, out=words[:, 0])
        np.bitwise_or(a >> shift, (b & low) << shift, out=words[:, 1])
        packed = words.view(np.uint8)
        if bad:
            bad_mask[list(bad)] = True
        return packed, bad_mask

    def _star(self, rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, set[int]]:
        widths = set(map(len, rows)) if all(type(r) is tuple for r in rows) else set()
        if len(widths) != 1:  # not one tuple per row of the same width: hash each row as one value
            return self._column(list(rows))
        n = len(rows)
        a = np.full(n, self.column_keys[0], dtype=np.uint64)
        b = np.full(n, self.column_keys[1], dtype=np.uint64)
        bad: set[int] = set()
        with np.errstate(over="ignore"):
            for j, column in enumerate(zip(*rows)):
                ca, cb, cbad = self._column(list(column))
                position = _U64(0x9E3779B97F4A7C15) * _U64(j + 1)
                a = _mix(a ^ ca ^ position)
                b = _mix(b ^ cb ^ ~position)
                bad |= cbad
        return a, b, bad

    def _column(self, values: list[Any]) -> tuple[np.ndarray, np.ndarray, set[int]]:
        n = len(values)
        a = np.empty(n, dtype=np.uint64)
        b = np.empty(n, dtype=np.uint64)
        bad: set[int] = set()
        kinds = set(map(type, values))
        if len(kinds) == 1:
            groups = [(type(values[0]), None)]
        else:
            codes = {kind: code for code, kind in enumerate(kinds)}
            code_array = np.fromiter(map(codes.__getitem__, map(type, values)), dtype=np.int32, count=n)
            groups = [(kind, np.flatnonzero(code_array == code)) for kind, code in codes.items()]
        for kind, where in groups:
            subset = values if where is None else [values[i] for i in where]
            ga, gb, gbad = self._typed(kind, subset)
            if where is None:
                a, b = ga, gb
                bad |= gbad
            else:
                a[where] = ga
                b[where] = gb
                bad.update(int(where[i]) for i in gbad)
        return a, b, bad

    def _typed(self, kind: type, values: list[Any]) -> tuple[np.ndarray, np.ndarray, set[int]]:
        if kind is str or kind is bytes:
            return self._xxh3(values, self.str_seed if kind is str else self.bytes_seed)
        with np.errstate(over="ignore"):
            if kind is int:
                try:
                    bits = np.array(values, dtype=np.int64).view(np.uint64)
                except OverflowError:  # some don't fit in 64 bits: those go the generic way
                    return self._split(values, lambda v: -(2**63) <= v < 2**63, self.int_keys)
                return _mix(bits ^ self.int_keys[0]), _mix(bits ^ self.int_keys[1]), set()
            if kind is float:
                bits = np.array(values, dtype=np.float64).view(np.uint64)
                return _mix(bits ^ self.float_keys[0]), _mix(bits ^ self.float_keys[1]), set()
            if kind is bool:
                bits = np.array(values, dtype=np.uint64)
                return _mix(bits ^ self.bool_keys[0]), _mix(bits ^ self.bool_keys[1]), set()
        return self._generic(values)

    def _xxh3(self, values: list[Any], seed: int) -> tuple[np.ndarray, np.ndarray, set[int]]:
        # The seed as a second iterable, not a partial's keyword: a keyword argument costs a dict a
        # call, which doubled the time to key a million short strings.
        data = map(str.encode, values) if type(values[0]) is str else values
        try:
            blob = b"".join(map(xxhash.xxh3_128_digest, data, itertools.repeat(seed)))
        except UnicodeEncodeError:  # lone surrogates: those strings go the generic way
            return self._split(values, _utf8_encodable, seed)
        both = np.frombuffer(blob, dtype="<u8").reshape(len(values), 2)
        return both[:, 0], both[:, 1], set()

    def _split(self, values: list[Any], fast: Any, keys: Any) -> tuple[np.ndarray, np.ndarray, set[int]]:
        """Hash the values ``fast`` accepts the vectorised way, the rest the generic way."""
        n = len(values)
        a = np.empty(n, dtype=np.uint64)
        b = np.empty(n, dtype=np.uint64)
        ok = np.fromiter((bool(fast(v)) for v in values), dtype=bool, count=n)
        good, rest = np.flatnonzero(ok), np.flatnonzero(~ok)
        if len(good):
            ga, gb, _ = self._typed(type(values[good[0]]), [values[i] for i in good])
            a[good], b[good] = ga, gb
        ra, rb, rbad = self._generic([values[i] for i in rest])
        a[rest], b[rest] = ra, rb
        return a, b, {int(rest[i]) for i in rbad}

    def _generic(self, values: list[Any]) -> tuple[np.ndarray, np.ndarray, set[int]]:
        n = len(values)
        lanes = bytearray(16 * n)
        bad: set[int] = set()
        key = self.generic_key
        for i, value in enumerate(values):
            data = _canonical_bytes(value)
            if data is None:
                bad.add(i)
                continue
            lanes[16 * i : 16 * i + 16] = blake2b(data, digest_size=16, key=key).digest()
        both = np.frombuffer(bytes(lanes), dtype="<u8").reshape(n, 2) if n else np.empty((0, 2), dtype=np.uint64)
        return both[:, 0].astype(np.uint64), both[:, 1].astype(np.uint64), bad


def key_list(packed: np.ndarray, bad: np.ndarray) -> list[bytes | None]:
    """Keys as one ``bytes`` each, ``None`` where ``bad`` says a row has none.

    Examples
    --------
    >>> keys = key_list(np.zeros((2, KEY_BYTES), dtype=np.uint8), np.array([False, True]))
    >>> keys[0] == bytes(KEY_BYTES), keys[1]
    (True, None)
    """
    keys: list[bytes | None] = np.ascontiguousarray(packed).view(f"V{KEY_BYTES}").ravel().tolist()
    for i in np.flatnonzero(bad).tolist():
        keys[i] = None
    return keys


def _items(packed: np.ndarray) -> np.ndarray:
    """``(n, KEY_BYTES)`` keys as ``n`` items of ``KEY_BYTES`` bytes, sharing their memory."""
    return packed.view(f"V{KEY_BYTES}").reshape(len(packed))


def take_keys(packed: np.ndarray, where: Any) -> np.ndarray:
    """``packed[where]`` for ``(n, KEY_BYTES)`` keys, a key moved as one item (numpy moves the rows
    of a 2-D uint8 array byte by byte: ten times slower).

    Examples
    --------
    >>> keys = np.arange(3 * KEY_BYTES, dtype=np.uint8).reshape(3, KEY_BYTES)
    >>> bool((take_keys(keys, [2, 0]) == keys[[2, 0]]).all()), take_keys(keys, np.array([True, False, True])).shape
    (True, (2, 16))
    """
    return _items(np.ascontiguousarray(packed, dtype=np.uint8))[where].view(np.uint8).reshape(-1, KEY_BYTES)


def put_keys(target: np.ndarray, where: Any, packed: np.ndarray) -> None:
    """``target[where] = packed`` for ``(n, KEY_BYTES)`` keys (``target`` C-contiguous), as :func:`take_keys`.

    Examples
    --------
    >>> target = np.zeros((3, KEY_BYTES), dtype=np.uint8)
    >>> put_keys(target, [2], np.ones((1, KEY_BYTES), dtype=np.uint8)); target[:, 0].tolist()
    [0, 0, 1]
    """
    _items(target)[where] = _items(np.ascontiguousarray(packed, dtype=np.uint8))


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _canonical_bytes(value: Any) -> bytes | None:
    """A type-tagged byte string for one value; ``None`` when the value can't be hashed faithfully.

    Containers are framed element by element so the result doesn't depend on which equal objects
    happen to be the same object (pickle's memo would), and sets are sorted so it doesn't depend on
    the process's string-hash seed. Leaves are pickled without a memo.
    """
    try:
        out = io.BytesIO()
        _write_canonical(value, out, 0)
        return out.getvalue()
    except Exception:  # unpicklable or self-referential: this row isn't cacheable
        return None


def _write_canonical(value: Any, out: io.BytesIO, depth: int) -> None:
    if depth > 50:
        raise RecursionError("nested too deeply to hash")
    kind = type(value)
    if kind is tuple or kind is list:
        out.write(b"T" if kind is tuple else b"L")
        out.write(len(value).to_bytes(8, "little"))
        for item in value:
            _write_canonical(item, out, depth + 1)
        return
    if kind is dict:
        out.write(b"D" + len(value).to_bytes(8, "little"))
        for key, item in value.items():
            _write_canonical(key, out, depth + 1)
            _write_canonical(item, out, depth + 1)
        return
    if kind is set or kind is frozenset:
        parts = sorted(_canonical_bytes_or_raise(item, depth + 1) for item in value)
        out.write((b"S" if kind is set else b"F") + len(parts).to_bytes(8, "little"))
        for part in parts:
            out.write(len(part).to_bytes(8, "little") + part)
        return
    tag = f"{kind.__module__}.{kind.__qualname__}".encode()
    sink = io.BytesIO()
    pickler = pickle.Pickler(sink, protocol=5)
    pickler.fast = True  # no memo: equal values give equal bytes, whatever their identity
    pickler.dump(value)
    data = sink.getvalue()
    out.write(b"V" + len(tag).to_bytes(2, "little") + tag + len(data).to_bytes(8, "little") + data)


def _canonical_bytes_or_raise(value: Any, depth: int) -> bytes:
    out = io.BytesIO()
    _write_canonical(value, out, depth)
    return out.getvalue()


def row_keys(fingerprint: str, rows: Sequence[Any], *, star: bool = False) -> list[bytes | None]:
    """One 16-byte key per row: a hash of ``fingerprint`` and the row's input value(s).

    ``rows`` holds one value per row, or with ``star=True`` one tuple of arguments per row. A row
    whose value can't be hashed faithfully (it can't be pickled, or refers to itself) gets ``None``:
    it isn't cacheable, and :meth:`~modal_magic.cache.RowCache.get_many` / :meth:`~modal_magic.cache.RowCache.put_many` skip it. Equal
    values of the same type get the same key in every process; values of different types never do.

    Examples
    --------
    >>> k = row_keys("fp", ["x", "y", "x", 1, 1.0])
    >>> len(k[0]), k[0] == k[2], k[0] == k[1], k[3] == k[4]
    (16, True, False, False)
    >>> row_keys("fp", [1]) == row_keys("another fp", [1])
    False
    """
    if not isinstance(rows, list):
        rows = rows.tolist() if hasattr(rows, "tolist") else list(rows)
    return RowKeyHasher(fingerprint).keys(rows, star)

