"""Persistent per-row results, so re-running a cell only computes the rows that aren't done yet.

A row's key is a hash of the function's fingerprint (:func:`function_fingerprint`) and the row's
input values (:func:`row_keys`); its value is the function's result, pickled. Results live in one
SQLite database in the user's cache directory (see :func:`default_cache_dir`), written in WAL mode
one transaction per :meth:`RowCache.put_many` call, so a process killed mid-write loses at most that
call's rows and never corrupts what was committed before.

Rows are stored in *chunks*, one SQLite row per ``put_many`` call (at most ``MAX_CHUNK_ROWS`` rows
and ``MAX_CHUNK_BYTES`` bytes each): the keys side by side in one blob, the values in one pickled
list, a format version, and a checksum over both. Writing 200,000 rows is then a few inserts instead
of 200,000 B-tree insertions (one SQLite row per result measured ~2 s per 200,000 rows on two cores,
ten times the cost of computing them), and a lookup reads the chunks of one function (keys start
with a 4-byte tag of the fingerprint, indexed) and matches keys in memory. A chunk whose checksum,
format or pickle doesn't hold up is never trusted: its rows count as misses and the chunk is deleted.
Keys are hashes; raw input values are never stored.

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
...     keys = cache.row_keys("fingerprint-of-my-function", ["a", "b", "c"])
...     print(cache.get_many(keys))
...     print(cache.put_many([(keys[0], 1), (keys[2], {"label": "pos"})]))
...     print(cache.get_many(keys))
{}
[]
{0: 1, 2: {'label': 'pos'}}
"""

from __future__ import annotations

import io
import os
import pickle
import sqlite3
import sys
import threading
import time
import warnings
from hashlib import blake2b
from itertools import repeat
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends._worker import dumps
from .fingerprint import function_fingerprint

__all__ = [
    "RowCache",
    "CacheWarning",
    "function_fingerprint",
    "row_keys",
    "default_cache",
    "default_cache_dir",
    "clear",
    "DB_NAME",
]

#: the database file inside the cache directory; the version in the name changes with the schema,
#: so two modal_magic versions sharing a directory never read each other's layout
DB_NAME = "rows-v1.sqlite3"
#: the format of one chunk (checksum framing + pickled list); a chunk of another format is a miss
CHUNK_FORMAT = 1
SCHEMA_VERSION = 1
APPLICATION_ID = 0x6D6D6331  # "mmc1": marks the file as ours
KEY_BYTES = 16
#: a value whose pickle is larger than this is reported and not stored
MAX_ENTRY_BYTES = 64 * 1024**2
MAX_CHUNK_BYTES = 64 * 1024**2
MAX_CHUNK_ROWS = 20_000
DEFAULT_SIZE_LIMIT = 2 * 1024**3
#: a hit refreshes its chunk's last-access time only when that is older than this (no write per read)
ATIME_RESOLUTION_S = 3600
#: eviction brings the database down to this fraction of the limit, so it doesn't run after every put
EVICT_TO = 0.8
BUSY_TIMEOUT_S = 10.0
#: tries to open a database that may be mid-creation by another process before calling it broken
OPEN_ATTEMPTS = 6
#: SQLite's default limit on ``?`` parameters is 999 before 3.32
_IN_CHUNK = 900
_CHECKSUM_PERSON = b"modal_magic-c1"

_SCHEMA = f"""
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,   -- grows with time: among chunks holding the same key, the newest wins
    part INTEGER NOT NULL,    -- the fingerprint's 4-byte tag, the first 4 bytes of every key
    atime INTEGER NOT NULL,   -- last write or (coarsely) last read, Unix seconds: LRU eviction
    fmt INTEGER NOT NULL,     -- CHUNK_FORMAT
    n INTEGER NOT NULL,       -- rows in the chunk
    checksum BLOB NOT NULL,   -- BLAKE2b over keys and value
    keys BLOB NOT NULL,       -- n keys of {KEY_BYTES} bytes
    value BLOB NOT NULL       -- pickled list of the n values
);
CREATE INDEX chunks_by_part ON chunks(part);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

# Connections inherited across a fork: closing one in the child could checkpoint and delete the WAL
# the parent is using, so the child opens its own and never touches these.
_inherited: list[sqlite3.Connection] = []


class CacheWarning(UserWarning):
    """The cache couldn't be read or written; the run goes on without it for the rows concerned."""


# --- where -----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The directory the cache lives in unless told otherwise.

    ``$MODAL_MAGIC_CACHE_DIR`` if set; else ``$XDG_CACHE_HOME/modal_magic`` (when that is an
    absolute path); else ``%LOCALAPPDATA%\\modal_magic\\Cache`` on Windows; else
    ``~/.cache/modal_magic``.

    Examples
    --------
    >>> default_cache_dir().name in ("modal_magic", "Cache") or "MODAL_MAGIC_CACHE_DIR" in os.environ
    True
    """
    explicit = os.environ.get("MODAL_MAGIC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "modal_magic"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "modal_magic" / "Cache"
    return Path.home() / ".cache" / "modal_magic"


# --- keys ------------------------------------------------------------------------------------------

_U64 = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array: a bijection that scatters every input bit."""
    z = z ^ (z >> _U64(30))
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


class _RowHasher:
    """Turns row values into two 64-bit lanes keyed by the fingerprint, vectorised per value type.

    ``str`` and ``bytes`` go through pandas' SipHash-2-4 (a keyed PRF, in C) with two keys; ``int``
    (within int64), ``float`` and ``bool`` through a keyed SplitMix64 of their bits (a bijection, so
    two different numbers never collide); anything else through BLAKE2b of a type tag and a
    memo-free pickle, row by row. Each type has its own keys, so ``1``, ``1.0``, ``True``, ``"1"``
    and ``b"1"`` all differ. A value's lanes depend only on the value and the fingerprint, never on
    its neighbours, so the same row gets the same key whatever else is in the column.
    """

    def __init__(self, fingerprint: str) -> None:
        seed = blake2b(fingerprint.encode("utf-8", "surrogatepass"), digest_size=64, person=b"mm-rowkey-v1").digest()
        self.part = seed[:4]
        more = blake2b(seed, digest_size=64, person=b"mm-rowkey-v1b").digest()
        words = np.frombuffer(more, dtype="<u8")
        self.int_keys = (words[0], words[1])
        self.float_keys = (words[2], words[3])
        self.bool_keys = (words[4], words[5])
        self.column_keys = (words[6], words[7])
        self.str_keys = (seed[4:12].hex(), seed[12:20].hex())
        self.bytes_keys = (seed[20:28].hex(), seed[28:36].hex())
        self.generic_key = seed[36:64]

    def keys(self, rows: Sequence[Any], star: bool) -> list[bytes | None]:
        n = len(rows)
        if n == 0:
            return []
        if star:
            a, b, bad = self._star(rows)
        else:
            a, b, bad = self._column(rows)
        packed = np.empty((n, KEY_BYTES), dtype=np.uint8)
        packed[:, :4] = np.frombuffer(self.part, dtype=np.uint8)
        packed[:, 4:12] = a.astype("<u8").view(np.uint8).reshape(n, 8)
        packed[:, 12:16] = b.astype("<u8").view(np.uint8).reshape(n, 8)[:, :4]
        keys: list[bytes | None] = packed.view(f"V{KEY_BYTES}").ravel().tolist()
        for i in bad:
            keys[i] = None
        return keys

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
        types_ = list(map(type, values))
        kinds = set(types_)
        if len(kinds) == 1:
            groups = [(types_[0], None)]
        else:
            codes = {kind: code for code, kind in enumerate(kinds)}
            code_array = np.fromiter(map(codes.__getitem__, types_), dtype=np.int32, count=n)
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
            return self._sip(values, self.str_keys if kind is str else self.bytes_keys)
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

    def _sip(self, values: list[Any], keys: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, set[int]]:
        from pandas.util import hash_array

        array = np.empty(len(values), dtype=object)
        array[:] = values
        try:
            return (hash_array(array, hash_key=keys[0], categorize=False),
                    hash_array(array, hash_key=keys[1], categorize=False), set())
        except UnicodeEncodeError:  # lone surrogates: those strings go the generic way
            return self._split(values, _utf8_encodable, keys)

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
    it isn't cacheable, and :meth:`RowCache.get_many` / :meth:`RowCache.put_many` skip it. Equal
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
    return _RowHasher(fingerprint).keys(rows, star)


# --- storage ---------------------------------------------------------------------------------------


class RowCache:
    """Results by row key, in one SQLite database under ``path`` (a directory).

    Safe to share between threads (one connection, behind a lock) and between processes (WAL mode
    and a busy timeout). Reads and writes never raise for the cache's own troubles: an unreadable
    chunk is a miss, a value that can't be stored is reported by :meth:`put_many`, and a database
    that can't be used at all is reported with a :class:`CacheWarning`.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The directory holding the database, created with mode 0o700 when missing. Default:
        :func:`default_cache_dir`.
    size_limit_bytes : int
        When the database grows past this, the least recently used chunks are removed until it is
        back under ``EVICT_TO`` of it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 size_limit_bytes: int = DEFAULT_SIZE_LIMIT) -> None:
        self.directory = Path(path).expanduser() if path is not None else default_cache_dir()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"path={str(path)!r} is a file; RowCache wants a directory to keep its database in")
        self.path = self.directory / DB_NAME
        self.size_limit_bytes = int(size_limit_bytes)
        self.max_entry_bytes = MAX_ENTRY_BYTES
        self._clock = time.time
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        with self._lock:
            self._db()

    def __repr__(self) -> str:
        return f"RowCache({str(self.directory)!r}, size_limit_bytes={self.size_limit_bytes})"

    def __enter__(self) -> RowCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the public operations --------------------------------------------------------------------

    def row_keys(self, fingerprint: str, rows: Sequence[Any], *, star: bool = False) -> list[bytes | None]:
        """See :func:`row_keys`."""
        return row_keys(fingerprint, rows, star=star)

    def get_many(self, keys: Sequence[bytes | None]) -> dict[int, Any]:
        """Return ``{index in keys: cached value}`` for the keys the cache holds.

        ``None`` keys are skipped. A chunk that fails its checksum, has another format, or doesn't
        unpickle to a list of its length is treated as a miss and deleted. Rows with equal keys get
        the same value object.
        """
        out: dict[int, Any] = {}
        joined = _join_keys(keys)
        if joined is None:
            return out
        try:
            with self._lock:
                self._read(keys, joined, out)
        except sqlite3.Error as e:
            self._recover_if_corrupt(e)
            warnings.warn(f"modal_magic couldn't read its cache at {self.path}: {e}; those rows will run",
                          CacheWarning, stacklevel=2)
        return out

    def put_many(self, items: Sequence[tuple[bytes | None, Any]]) -> list[tuple[bytes, str]]:
        """Store ``(key, value)`` pairs in one transaction; return ``(key, reason)`` for those not stored.

        A value that can't be pickled, or whose pickle is larger than ``max_entry_bytes``, is
        reported, as is every value when the database can't be written (e.g. the disk is full).
        Items whose key is ``None`` (an input that can't be hashed) are skipped silently. Never raises
        for a value.
        """
        return self.put_columns([item[0] for item in items], [item[1] for item in items])

    def put_columns(self, keys: Sequence[bytes | None], values: Sequence[Any]) -> list[tuple[bytes, str]]:
        """:meth:`put_many` for keys and values in two parallel lists (no pair per row to build).

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
        ...     keys = cache.row_keys("fp", [1, 2])
        ...     cache.put_columns(keys, ["one", "two"])
        ...     cache.get_many(keys)
        []
        {0: 'one', 1: 'two'}
        """
        keys, values = list(keys), list(values)
        if None in keys:
            values = [value for key, value in zip(keys, values) if key is not None]
            keys = [key for key in keys if key is not None]
        joined = _join_keys(keys)
        if joined is None:
            return []
        rejected: list[tuple[bytes, str]] = []
        records: list[tuple[Any, ...]] = []
        now = int(self._clock())
        parts = _parts(joined)
        if len(parts) == 1:
            groups = [(keys, values, joined)]
        else:
            by_part: dict[bytes, tuple[list[bytes], list[Any]]] = {}
            for key, value in zip(keys, values):
                group = by_part.setdefault(key[:4], ([], []))
                group[0].append(key)
                group[1].append(value)
            groups = [(k, v, b"".join(k)) for k, v in by_part.values()]
        for group_keys, group_values, group_blob in groups:
            part = _part_number(group_blob[:4])
            for start in range(0, len(group_keys), MAX_CHUNK_ROWS):
                stop = start + MAX_CHUNK_ROWS
                packed = self._pack(group_keys[start:stop], group_values[start:stop],
                                    group_blob[KEY_BYTES * start : KEY_BYTES * stop], rejected)
                for keys_blob, n, value_blob in packed:
                    checksum = _checksum(keys_blob, value_blob)
                    records.append((part, now, CHUNK_FORMAT, n, checksum, keys_blob, value_blob))
        if not records:
            return rejected
        try:
            with self._lock:
                db = self._db()
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("INSERT INTO chunks (part, atime, fmt, n, checksum, keys, value) "
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)", records)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as e:
            self._recover_if_corrupt(e)
            stored = {key for key, _ in rejected}
            reason = f"the cache at {self.path} couldn't be written: {e}"
            return rejected + [(key, reason) for key in keys if key not in stored]
        try:
            with self._lock:
                self._evict_if_needed()
        except sqlite3.Error as e:  # the rows are stored; only the trimming failed
            warnings.warn(f"modal_magic couldn't trim its cache at {self.path}: {e}", CacheWarning, stacklevel=2)
        return rejected

    def clear(self) -> None:
        """Delete every cached result and give the space back to the file system."""
        with self._lock:
            db = self._db()
            db.execute("DELETE FROM chunks")
            try:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:  # another process is reading: the space is reused instead
                pass

    def size_bytes(self) -> int:
        """Bytes the database's live pages take (free pages, kept for reuse, don't count)."""
        with self._lock:
            db = self._db()
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * page_size

    def close(self) -> None:
        """Close the connection; the next operation reopens it."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # --- reading ----------------------------------------------------------------------------------

    def _read(self, keys: Sequence[bytes | None], joined: bytes, out: dict[int, Any]) -> None:
        db = self._db()
        now = int(self._clock())
        located: list[_Located] = []
        stale_atime: list[int] = []
        broken: list[int] = []
        db.execute("BEGIN")
        try:
            stored = []
            for part in _parts(joined):
                stored += db.execute("SELECT id, n, atime, keys FROM chunks WHERE part = ? ORDER BY id",
                                     (_part_number(part),)).fetchall()
            if not stored:  # a function never cached before: no need to index the keys
                return
            index: dict[bytes | None, int] = dict(zip(keys, range(len(keys))))
            index.pop(None, None)
            duplicates: dict[bytes, list[int]] = {}
            aligned = len(joined) == KEY_BYTES * len(keys)  # no None keys: offsets in ``joined`` are indexes
            if len(index) + keys.count(None) < len(keys):
                for i, key in enumerate(keys):
                    if key is not None and index[key] != i:
                        duplicates.setdefault(key, []).append(i)
            # Pass 1: which chunk holds each requested key (the newest, when several do).
            for chunk_id, n, atime, keys_blob in sorted(stored):
                if len(keys_blob) != KEY_BYTES * n:
                    broken.append(chunk_id)
                    continue
                first = index.get(keys_blob[:KEY_BYTES]) if aligned and n else None
                if first is not None and joined[KEY_BYTES * first : KEY_BYTES * (first + n)] == keys_blob:
                    # The usual re-run: the chunk is a run of the keys asked for, in order.
                    located.append((chunk_id, keys_blob, range(n), range(first, first + n)))
                else:
                    found = list(map(index.get, np.frombuffer(keys_blob, dtype=f"V{KEY_BYTES}").tolist()))
                    positions = [j for j, i in enumerate(found) if i is not None]
                    if not positions:
                        continue
                    located.append((chunk_id, keys_blob, positions, [found[j] for j in positions]))
                if atime < now - ATIME_RESOLUTION_S:
                    stale_atime.append(chunk_id)
            located = _newest_wins(located)
            # Pass 2: load, verify and unpickle the chunks that hold hits.
            wanted = {chunk_id: (keys_blob, positions, indexes) for chunk_id, keys_blob, positions, indexes in located}
            ids = list(wanted)
            for start in range(0, len(ids), _IN_CHUNK):
                batch = ids[start : start + _IN_CHUNK]
                query = ("SELECT id, fmt, n, checksum, keys, value FROM chunks "
                         f"WHERE id IN ({','.join('?' * len(batch))})")
                for chunk_id, fmt, n, checksum, keys_blob, value_blob in db.execute(query, batch):
                    expected_keys, positions, indexes = wanted[chunk_id]
                    values = _unpack(fmt, n, checksum, keys_blob, value_blob, expected_keys)
                    if values is None:
                        broken.append(chunk_id)
                        continue
                    if type(positions) is range:
                        out.update(zip(indexes, values))
                    else:
                        out.update(zip(indexes, map(values.__getitem__, positions)))
                    if duplicates:
                        for j, i in zip(positions, indexes):
                            for extra in duplicates.get(keys_blob[KEY_BYTES * j : KEY_BYTES * (j + 1)], ()):
                                out[extra] = values[j]
        finally:
            db.execute("COMMIT")
        # A row whose newest chunk is broken stays a miss, even if an older chunk holds it: it reruns.
        self._touch_and_drop([c for c in stale_atime if c not in broken], broken, now)

    def _touch_and_drop(self, touch: list[int], drop: list[int], now: int) -> None:
        """Best effort: refresh last-access times and delete broken chunks; skipped when busy."""
        if not touch and not drop:
            return
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return
        try:
            for start in range(0, len(touch), _IN_CHUNK):
                batch = touch[start : start + _IN_CHUNK]
                db.execute(f"UPDATE chunks SET atime = ? WHERE id IN ({','.join('?' * len(batch))})", [now, *batch])
            _delete_chunks(db, drop)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- writing ----------------------------------------------------------------------------------

    def _pack(self, keys: list[bytes], values: list[Any], keys_blob: bytes,
              rejected: list[tuple[bytes, str]]) -> list[tuple[bytes, int, bytes]]:
        """Pickle values into chunks of ``(keys blob, n, pickled list)``; report the ones that can't go."""
        try:
            blob = dumps(values)
        except Exception:
            blob = None
        if blob is not None and len(blob) <= min(MAX_CHUNK_BYTES, self.max_entry_bytes):
            return [(keys_blob, len(keys), blob)]
        # Slow path: find the values that can't be pickled or are too large, group the rest by size.
        sized: list[tuple[bytes, Any, int]] = []
        for key, value in zip(keys, values):
            try:
                size = len(dumps(value))
            except Exception as e:
                rejected.append((key, f"the result can't be pickled: {type(e).__name__}: {e}"))
                continue
            if size > self.max_entry_bytes:
                rejected.append((key, f"the result is too large to cache: {size / 2**20:.1f} MiB pickled, "
                                      f"over the {self.max_entry_bytes / 2**20:.0f} MiB per-row limit"))
                continue
            sized.append((key, value, size))
        chunks: list[tuple[bytes, int, bytes]] = []
        group: list[tuple[bytes, Any, int]] = []
        total = 0
        for entry in sized + [None]:  # type: ignore[list-item]
            if group and (entry is None or total + entry[2] > MAX_CHUNK_BYTES):
                try:
                    chunks.append((b"".join(k for k, _, _ in group), len(group), dumps([v for _, v, _ in group])))
                except Exception as e:  # pickled one by one but not together: report, don't guess
                    rejected += [(k, f"the result can't be pickled: {type(e).__name__}: {e}") for k, _, _ in group]
                group, total = [], 0
            if entry is not None:
                group.append(entry)
                total += entry[2]
        return chunks

    def _evict_if_needed(self) -> None:
        """Remove least recently used chunks until the database is under ``EVICT_TO`` of the limit."""
        for _ in range(4):  # page accounting is approximate; a few rounds settle it
            used = self.size_bytes()
            if used <= self.size_limit_bytes:
                return
            target = int(self.size_limit_bytes * EVICT_TO)
            db = self._db()
            victims: list[int] = []
            freed = 0
            for chunk_id, size in db.execute("SELECT id, length(keys) + length(value) + 64 FROM chunks "
                                             "ORDER BY atime, id"):
                victims.append(chunk_id)
                freed += size
                if used - freed <= target:
                    break
            if not victims:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                _delete_chunks(db, victims)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # --- the connection ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # we are a forked child: leave the parent's connection alone
            _inherited.append(self._conn)
        for attempt in range(OPEN_ATTEMPTS):
            try:
                self._conn = self._connect()
                break
            except sqlite3.OperationalError as e:
                # Switching a new database to WAL can report "locked" at once, without waiting out the
                # busy timeout, while another process sets the same database up: look again.
                if "locked" not in str(e) or attempt + 1 == OPEN_ATTEMPTS:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except sqlite3.DatabaseError as e:
                if type(e) is not sqlite3.DatabaseError:  # I/O, permissions: not ours to fix by deleting
                    raise
                if attempt + 1 < OPEN_ATTEMPTS and self._maybe_being_created():
                    # Another process may be creating the database this very moment; deleting its
                    # files now would pull the shared memory from under it (SIGBUS). Look again.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                # Not a database (truncated, overwritten, foreign): it's only a cache, start afresh.
                self._remove_files(e)
                self._conn = self._connect()
                break
        self._pid = os.getpid()
        return self._conn

    def _maybe_being_created(self) -> bool:
        """An empty file, or one with SQLite's header: possibly a database another process is setting up."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
        except OSError:
            return True
        return head == b"" or head == b"SQLite format 3\x00"

    def _recover_if_corrupt(self, error: sqlite3.Error) -> None:
        """After "file is not a database" / "disk image is malformed", replace the database."""
        if type(error) is not sqlite3.DatabaseError:
            return
        with self._lock:
            self.close()
            self._remove_files(error)

    def _remove_files(self, error: Exception) -> None:
        warnings.warn(f"modal_magic's cache at {self.path} was unreadable ({error}); starting a new one",
                      CacheWarning, stacklevel=4)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def _connect(self) -> sqlite3.Connection:
        _make_private_directory(self.directory)
        _make_private_file(self.path)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the last commits,
            # never the database.
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(f"PRAGMA journal_size_limit = {64 * 1024**2}")
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if application_id == 0 and version == 0:
                db.execute("BEGIN IMMEDIATE")
                try:
                    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                    if tables == 0:
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                db.execute(statement)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
            if (application_id, version) != (APPLICATION_ID, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(
                    f"not a modal_magic cache (application_id={application_id:#x}, user_version={version})")
        except BaseException:
            db.close()
            raise
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; make sure
            _make_private_file(Path(f"{self.path}{suffix}"), create=False)
        return db


def _delete_chunks(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete chunks by id, in statements under SQLite's limit on bound variables."""
    for start in range(0, len(ids), _IN_CHUNK):
        batch = ids[start : start + _IN_CHUNK]
        db.execute(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(batch))})", batch)


def _join_keys(keys: Sequence[bytes | None]) -> bytes | None:
    """All keys end to end (``None`` ones left out); ``None`` when there are none."""
    try:
        joined = b"".join(keys)  # type: ignore[arg-type]
    except TypeError:
        joined = b"".join(key for key in keys if key is not None)
    if len(joined) % KEY_BYTES:
        raise ValueError(f"cache keys are {KEY_BYTES} bytes long; use row_keys() to make them")
    return joined or None


def _parts(joined: bytes) -> list[bytes]:
    """The distinct 4-byte fingerprint tags among keys joined end to end (usually just one)."""
    tags = np.frombuffer(joined, dtype="<u4")[:: KEY_BYTES // 4]
    if (tags == tags[0]).all():
        return [joined[:4]]
    return [int(t).to_bytes(4, "little") for t in np.unique(tags)]


def _part_number(part: bytes) -> int:
    return int.from_bytes(part, "big")


def _checksum(keys_blob: bytes, value_blob: bytes) -> bytes:
    h = blake2b(digest_size=16, person=_CHECKSUM_PERSON)
    h.update(len(keys_blob).to_bytes(8, "little"))
    h.update(keys_blob)
    h.update(value_blob)
    return h.digest()


def _unpack(fmt: int, n: int, checksum: bytes, keys_blob: bytes, value_blob: bytes,
            expected_keys: bytes) -> list[Any] | None:
    """The chunk's values, or ``None`` when anything about it doesn't hold up."""
    if fmt != CHUNK_FORMAT or keys_blob != expected_keys or len(keys_blob) != KEY_BYTES * n:
        return None
    if not isinstance(checksum, bytes) or _checksum(keys_blob, value_blob) != checksum:
        return None
    try:
        values = pickle.loads(value_blob)
    except Exception:  # e.g. a class this kernel hasn't defined (yet)
        return None
    if type(values) is not list or len(values) != n:
        return None
    return values


_Located = tuple[int, bytes, Sequence[int], Sequence[int]]  # (chunk id, keys blob, positions in it, indexes asked)


def _newest_wins(located: list[_Located]) -> list[_Located]:
    """Drop hits that a newer chunk (a refresh, a retry) also holds; ``located`` is in id order."""
    spans = sorted((indexes.start, indexes.stop) for _, _, _, indexes in located if type(indexes) is range)
    if len(spans) == len(located) and all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:])):
        return located  # disjoint runs of the keys asked for: nothing is shadowed
    total = sum(len(indexes) for _, _, _, indexes in located)
    owner: dict[int, int] = {}
    for chunk_id, _, _, indexes in located:
        owner.update(zip(indexes, repeat(chunk_id)))
    if len(owner) == total:
        return located
    kept = []
    for chunk_id, keys_blob, positions, indexes in located:
        pairs = [(j, i) for j, i in zip(positions, indexes) if owner[i] == chunk_id]
        if pairs:
            kept.append((chunk_id, keys_blob, [j for j, _ in pairs], [i for _, i in pairs]))
    return kept


def _make_private_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # the mode passed to makedirs is masked by the umask


def _make_private_file(path: Path, create: bool = True) -> None:
    """Make ``path`` readable by its owner only (creating it empty if asked and missing).

    Never opens a file that may already exist: closing any descriptor of a file drops every POSIX
    lock this process holds on it, and SQLite's locks on the database and its ``-shm`` file are
    exactly that; losing them lets another process reset the shared memory under us (SIGBUS).
    """
    if create:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            return
        except FileExistsError:
            pass
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        return


# --- the process-wide cache ------------------------------------------------------------------------

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
    ...         print(cache.get_many(row_keys("fp", [1])))
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
