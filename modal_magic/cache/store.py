"""The SQLite store of per-row results: :class:`RowCache`.

A row's key is a hash of the function's fingerprint (:func:`function_fingerprint`) and the row's
input values (:func:`row_keys`); its value is the function's result, pickled. Results live in one
SQLite database in the user's cache directory (see :func:`default_cache_dir`), written in WAL mode
one transaction per :meth:`RowCache.put_many` call, so a process killed mid-write loses at most that
call's rows and never corrupts what was committed before.

Rows are stored in *chunks*, one SQLite row per ``put_many`` call (at most ``MAX_CHUNK_ROWS`` rows
and ``MAX_CHUNK_BYTES`` bytes each): the keys side by side in one blob, the values in one pickled
list, a format version, and a MAC over both keyed with the user's secret (:mod:`.chunks`). Writing 200,000 rows is then a few inserts instead
of 200,000 B-tree insertions (one SQLite row per result measured ~2 s per 200,000 rows on two cores,
ten times the cost of computing them), and a lookup reads the chunks of one function (keys start
with a 4-byte tag of the fingerprint, indexed) and matches keys in memory. A chunk whose MAC,
format or pickle doesn't hold up is never trusted (the MAC is checked before anything is unpickled):
its rows count as misses and the chunk is deleted. Opening the file (and refusing an unsafe one)
is :mod:`.database`'s job.
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

import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from typing import Any, Sequence

from .chunks import CHUNK_FORMAT, chunk_mac, join_keys, pack, part_number, unpack
from .database import DB_NAME, begin, move_aside, open_database, rollback, write_failure
from .keys import KEY_BYTES, row_keys, take_keys
from .location import CacheWarning, default_cache_dir, load_key
from .match import Found, InOrder, KeyMatcher, WriteLog

__all__ = ["RowCache", "DB_NAME"]

#: a value whose pickle is larger than this is reported and not stored
MAX_ENTRY_BYTES = 64 * 1024**2
MAX_CHUNK_BYTES = 64 * 1024**2
MAX_CHUNK_ROWS = 20_000
DEFAULT_SIZE_LIMIT = 2 * 1024**3
#: a hit refreshes its chunk's last-access time only when that is older than this (no write per read)
ATIME_RESOLUTION_S = 3600
#: eviction brings the database down to this fraction of the limit, so it doesn't run after every put
EVICT_TO = 0.8
#: SQLite's default limit on ``?`` parameters is 999 before 3.32
_IN_CHUNK = 900

# Connections inherited across a fork: closing one in the child could checkpoint and delete the WAL
# the parent is using, so the child opens its own and never touches these.
_inherited: list[sqlite3.Connection] = []


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
        self.read_only = False
        self._found: Found | None = None  # where the last lookup's hits were: a re-run of it matches nothing
        with self._lock:
            self._db()
            try:
                self._key = load_key(self.directory)  # the secret that signs and checks every chunk
            except BaseException:
                self.close()
                raise

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

        ``None`` keys are skipped. A chunk that fails its MAC, has another format, or doesn't
        unpickle to a list of its length is treated as a miss and deleted. Rows with equal keys get
        equal values, each its own object unless immutable.
        """
        packed, bad = _pack_keys(keys)
        rows, values = self.lookup(packed, bad)
        return dict(zip(rows.tolist(), values))

    def lookup(self, packed: np.ndarray, bad: np.ndarray | None = None) -> tuple[np.ndarray, list[Any]]:
        """:meth:`get_many` for keys in one array: the indexes of the rows the cache holds, and their values.

        Parameters
        ----------
        packed : numpy.ndarray
            ``(n, KEY_BYTES)`` uint8, one key per row (:meth:`RowKeyHasher.key_array`).
        bad : numpy.ndarray, optional
            ``n`` bools: rows that have no key (skipped).

        Examples
        --------
        >>> import tempfile
        >>> from modal_magic.cache import RowKeyHasher
        >>> with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
        ...     packed, bad = RowKeyHasher("fp").key_array(["a", "b", "c"], star=False)
        ...     cache.put_packed(packed[[0, 2]], ["A", "C"])
        ...     rows, values = cache.lookup(packed, bad)
        ...     rows.tolist(), values
        []
        ([0, 2], ['A', 'C'])
        """
        asked = np.flatnonzero(~bad) if bad is not None and bad.any() else None
        keys = packed if asked is None else take_keys(packed, asked)
        if len(keys) == 0:
            return np.empty(0, dtype=np.intp), []
        try:
            with self._lock:
                rows, values = self._read(np.ascontiguousarray(keys, dtype=np.uint8))
        except sqlite3.Error as e:
            self._recover_if_corrupt(e)
            warnings.warn(f"modal_magic couldn't read its cache at {self.path}: {e}; those rows will run",
                          CacheWarning, stacklevel=2)
            return np.empty(0, dtype=np.intp), []
        return (rows if asked is None else asked[rows]), values

    def holds_part(self, part: bytes) -> bool:
        """Whether any chunk is filed under this fingerprint tag (the first 4 bytes of its keys).

        A function never cached before (or whose rows were all too cheap to store) has none, and a
        run of it skips keying its rows up front.

        Examples
        --------
        >>> import tempfile
        >>> from modal_magic.cache import RowKeyHasher
        >>> with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
        ...     hasher = RowKeyHasher("fp")
        ...     before = cache.holds_part(hasher.part)
        ...     _ = cache.put_packed(hasher.key_array([1], star=False)[0], ["one"])
        ...     before, cache.holds_part(hasher.part), cache.holds_part(RowKeyHasher("other").part)
        (False, True, False)
        """
        try:
            with self._lock:
                row = self._db().execute("SELECT 1 FROM chunks WHERE part = ? LIMIT 1",
                                         (part_number(part),)).fetchone()
        except sqlite3.Error as e:
            self._recover_if_corrupt(e)
            return False
        return row is not None

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
        packed, _ = _pack_keys(keys)
        return self.put_packed(packed, values)

    def put_packed(self, packed: np.ndarray, values: Sequence[Any], *,
                   written: list[tuple[int, int]] | None = None) -> list[tuple[bytes, str]]:
        """:meth:`put_many` for keys in one ``(n, KEY_BYTES)`` uint8 array (every row with a key).

        ``written`` (a list) gets ``(chunk id, rows)`` of the chunks made, in the order of
        ``values``, when every value was stored in that order (else nothing). See :meth:`lookup`
        for an example.
        """
        values = values if isinstance(values, list) else list(values)
        if len(packed) != len(values):
            raise ValueError(f"{len(packed)} keys for {len(values)} values; give one key per value")
        if not len(packed) or self.read_only:  # read-only was said once, when the database was opened
            return []
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        rejected: list[tuple[bytes, str]] = []
        records: list[tuple[Any, ...]] = []
        now = int(self._clock())
        tags = np.ascontiguousarray(packed[:, :4]).view(">u4").ravel()
        if (tags == tags[0]).all():
            groups: list[tuple[np.ndarray, list[Any]]] = [(packed, values)]
        else:
            groups = []
            for tag in np.unique(tags):
                where = np.flatnonzero(tags == tag)
                groups.append((take_keys(packed, where), [values[i] for i in where.tolist()]))
        for group_keys, group_values in groups:
            part = int(np.ascontiguousarray(group_keys[:1, :4]).view(">u4")[0, 0])
            for start in range(0, len(group_keys), MAX_CHUNK_ROWS):
                stop = start + MAX_CHUNK_ROWS
                for keys_blob, n, value_blob in pack(group_keys[start:stop].tobytes(), group_values[start:stop],
                                                     rejected, self.max_entry_bytes, MAX_CHUNK_BYTES):
                    mac = chunk_mac(self._key, keys_blob, value_blob)
                    records.append((part, now, CHUNK_FORMAT, n, mac, keys_blob, value_blob))
        if not records:
            return rejected
        try:
            with self._lock:
                db = self._db()
                begin(db)
                try:
                    ids = [db.execute("INSERT INTO chunks (part, atime, fmt, n, checksum, keys, value) "
                                      "VALUES (?, ?, ?, ?, ?, ?, ?)", record).lastrowid for record in records]
                    db.execute("COMMIT")
                except BaseException:
                    rollback(db)
                    raise
        except sqlite3.Error as e:
            self._recover_if_corrupt(e)
            stored = {key for key, _ in rejected}
            reason = write_failure(e, self.path)
            return rejected + [(key, reason) for key in packed.view(f"V{KEY_BYTES}").ravel().tolist()
                               if key not in stored]
        if written is not None and not rejected and len(groups) == 1:
            written.extend(zip(ids, (record[3] for record in records)))
        try:
            with self._lock:
                self._evict_if_needed()
        except sqlite3.Error as e:  # the rows are stored; only the trimming failed
            warnings.warn(f"modal_magic couldn't trim its cache at {self.path}: {e}", CacheWarning, stacklevel=2)
        return rejected

    def stored_all(self, log: WriteLog) -> None:
        """A run stored every one of its rows once, as ``log`` says where: remember it as a lookup's
        :class:`Found`, so re-running it matches nothing."""
        ours = [chunk_id for chunk_id, _ in log.written]
        with self._lock:
            db = self._db()
            (part,) = db.execute("SELECT part FROM chunks WHERE id = ?", (ours[0],)).fetchone() or (None,)
            ids = [chunk_id for (chunk_id,) in db.execute("SELECT id FROM chunks WHERE part = ? ORDER BY id", (part,))]
            # Only while these chunks are the function's newest: another writer's later copy would win a lookup
            if ids and ids[-1] == max(ours) and set(ours) <= set(ids):
                self._found = Found.of_writes(log, ids)

    def clear(self) -> None:
        """Delete every cached result and give the space back to the file system."""
        if self.read_only:
            warnings.warn(f"modal_magic's cache at {self.path} can't be written, so it can't be cleared",
                          CacheWarning, stacklevel=2)
            return
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

    def _read(self, keys: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        db = self._db()
        now = int(self._clock())
        tags = np.ascontiguousarray(keys[:, :4]).view(">u4").ravel()
        parts = [int(tags[0])] if (tags == tags[0]).all() else np.unique(tags).tolist()
        stale_atime: list[int] = []
        broken: list[int] = []
        loaded: dict[int, list[Any]] = {}
        begin(db, immediate=False)
        try:
            stored = []
            for part in parts:
                stored += db.execute("SELECT id, n, atime, keys FROM chunks WHERE part = ?", (part,)).fetchall()
            if not stored:  # a function never cached before: no need to index the keys
                return np.empty(0, dtype=np.intp), []
            stored.sort()
            broken += [chunk_id for chunk_id, n, _, keys_blob in stored if len(keys_blob) != KEY_BYTES * n]
            chunks = [(chunk_id, keys_blob) for chunk_id, n, _, keys_blob in stored if len(keys_blob) == KEY_BYTES * n]
            atimes = {chunk_id: atime for chunk_id, _, atime, _ in stored}
            matcher: KeyMatcher | InOrder | Found
            if self._found is not None and self._found.fits(keys, chunks):  # the last lookup again: a re-run
                matcher = self._found
                wanted = dict(matcher.needed(chunks))
            elif InOrder.fits(keys, [blob for _, blob in chunks]):  # stored in the order asked
                matcher = InOrder(chunks)
                wanted = dict(chunks)
            else:  # Pass 1, keys only: which chunk holds the newest copy of each key asked for.
                matcher = KeyMatcher(keys)
                wanted = dict(matcher.match(chunks))
            # Pass 2: load, verify and unpickle the chunks that hold hits.
            ids = list(wanted)
            for start in range(0, len(ids), _IN_CHUNK):
                batch = ids[start : start + _IN_CHUNK]
                query = ("SELECT id, fmt, n, checksum, keys, value FROM chunks "
                         f"WHERE id IN ({','.join('?' * len(batch))})")
                for chunk_id, fmt, n, mac, keys_blob, value_blob in db.execute(query, batch):
                    values = unpack(fmt, n, mac, keys_blob, value_blob, wanted[chunk_id], self._key)
                    if values is None:
                        broken.append(chunk_id)
                    else:
                        loaded[chunk_id] = values
                        if atimes[chunk_id] < now - ATIME_RESOLUTION_S:
                            stale_atime.append(chunk_id)
        finally:
            db.execute("COMMIT")
        # A row whose newest chunk is broken stays a miss, even if an older chunk holds it: it reruns.
        self._touch_and_drop(stale_atime, broken, now)
        rows, values = matcher.assemble(loaded)
        if isinstance(matcher, KeyMatcher):
            self._found = matcher.found
        return rows, values

    def _touch_and_drop(self, touch: list[int], drop: list[int], now: int) -> None:
        """Best effort: refresh last-access times and delete broken chunks; skipped when busy or read-only."""
        if (not touch and not drop) or self.read_only:
            return
        db = self._db()
        try:
            begin(db)
        except sqlite3.OperationalError:
            return
        try:
            for start in range(0, len(touch), _IN_CHUNK):
                batch = touch[start : start + _IN_CHUNK]
                db.execute(f"UPDATE chunks SET atime = ? WHERE id IN ({','.join('?' * len(batch))})", [now, *batch])
            _delete_chunks(db, drop)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise

    # --- writing ----------------------------------------------------------------------------------

    def _evict_if_needed(self) -> None:
        """Remove least recently used chunks until the database is under ``EVICT_TO`` of the limit."""
        if self.read_only:
            return
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
            begin(db)
            try:
                _delete_chunks(db, victims)
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise

    # --- the connection ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if self._conn is not None:  # we are a forked child: leave the parent's connection alone
            _inherited.append(self._conn)
        self._conn, self.read_only = open_database(self.directory, self.path)
        self._pid = os.getpid()
        return self._conn

    def _recover_if_corrupt(self, error: sqlite3.Error) -> None:
        """After "file is not a database" / "disk image is malformed", move the database aside."""
        if type(error) is not sqlite3.DatabaseError:
            return
        with self._lock:
            self.close()
            move_aside(self.path, error)


def _pack_keys(keys: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """Keys given as ``bytes`` (``None`` for a row without one) as :meth:`RowCache.lookup` takes them."""
    joined = join_keys(keys)
    if joined is None:
        return np.empty((len(keys), KEY_BYTES), dtype=np.uint8), np.ones(len(keys), dtype=bool)
    if len(joined) == KEY_BYTES * len(keys):
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, KEY_BYTES), None
    bad = np.fromiter((key is None for key in keys), dtype=bool, count=len(keys))
    packed = np.zeros((len(keys), KEY_BYTES), dtype=np.uint8)
    packed[~bad] = np.frombuffer(joined, dtype=np.uint8).reshape(-1, KEY_BYTES)
    return packed, bad


def _delete_chunks(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete chunks by id, in statements under SQLite's limit on bound variables."""
    for start in range(0, len(ids), _IN_CHUNK):
        batch = ids[start : start + _IN_CHUNK]
        db.execute(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(batch))})", batch)


