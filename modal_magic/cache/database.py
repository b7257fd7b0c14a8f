"""Opening the cache's SQLite file: schema, WAL, private files, and what to do when it can't be written.

:func:`open_database` returns a connection and whether it is read-only. It refuses an unsafe place
(:class:`~modal_magic.cache.location.UnsafeCacheError`), waits out another process creating the
same database, moves a damaged file aside (it is never deleted: it may hold results someone wants
back) and falls back to reading when the file or its directory can't be written (a read-only
mount, a shared cache): hits are still returned and new results are not stored, with one warning.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
import warnings
from pathlib import Path
from urllib.parse import quote

from .keys import KEY_BYTES
from .location import CacheWarning, check_own_file, make_private_directory, make_private_file

__all__ = ["DB_NAME", "open_database", "move_aside", "rollback", "write_failure", "warn_once"]

#: the database file inside the cache directory; the version in the name changes with the schema,
#: so two modal_magic versions sharing a directory never read each other's layout
DB_NAME = "rows-v1.sqlite3"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x6D6D6331  # "mmc1": marks the file as ours
BUSY_TIMEOUT_S = 10.0
#: tries to open a database that may be mid-creation by another process before calling it broken
OPEN_ATTEMPTS = 6
_SQLITE_FULL = 13

SCHEMA = f"""
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,   -- grows with time: among chunks holding the same key, the newest wins
    part INTEGER NOT NULL,    -- the fingerprint's 4-byte tag, the first 4 bytes of every key
    atime INTEGER NOT NULL,   -- last write or (coarsely) last read, Unix seconds: LRU eviction
    fmt INTEGER NOT NULL,     -- CHUNK_FORMAT
    n INTEGER NOT NULL,       -- rows in the chunk
    checksum BLOB NOT NULL,   -- the keyed MAC over keys and value (chunks.chunk_mac)
    keys BLOB NOT NULL,       -- n keys of {KEY_BYTES} bytes
    value BLOB NOT NULL       -- pickled list of the n values
);
CREATE INDEX chunks_by_part ON chunks(part);
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
"""

#: the page size of a new cache database (SQLite's largest)
PAGE_SIZE = 65536
#: WAL bytes between automatic checkpoints
WAL_CHECKPOINT_BYTES = 16 * 1024**2

_warned: set[str] = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """A :class:`CacheWarning`, shown once per process: a cache trouble doesn't change between cells."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CacheWarning, stacklevel=stacklevel)


def open_database(directory: Path, path: Path) -> tuple[sqlite3.Connection, bool]:
    """Open (creating if needed) the cache database ``path`` in ``directory``; return it and whether read-only."""
    make_private_directory(directory)
    for suffix in ("", "-wal", "-shm"):
        check_own_file(Path(f"{path}{suffix}"))
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return connect_read_write(path), False
        except (sqlite3.OperationalError, PermissionError, OSError) as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e) and attempt + 1 < OPEN_ATTEMPTS:
                # Switching a new database to WAL can report "locked" at once, without waiting out the
                # busy timeout, while another process sets the same database up: look again.
                time.sleep(0.05 * (attempt + 1))
                continue
            if _cannot_write(e, directory) and path.exists():
                return _connect_read_only(path, e), True
            raise
        except sqlite3.DatabaseError as e:
            if type(e) is not sqlite3.DatabaseError:  # I/O and the like: not ours to fix by moving files
                raise
            if attempt + 1 < OPEN_ATTEMPTS and _maybe_being_created(path):
                # Another process may be creating the database this very moment; moving its files
                # now would pull the shared memory from under it (SIGBUS). Look again.
                time.sleep(0.05 * (attempt + 1))
                continue
            move_aside(path, e)
    return connect_read_write(path), False


def connect_read_write(path: Path) -> sqlite3.Connection:
    """Connect to ``path`` for reading and writing, creating the schema in a new file."""
    make_private_file(path)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        # Chunks are blobs of hundreds of KB: big pages take a third of the CPU time to write them
        # (4 KiB pages cut each into a hundred overflow pages). Only a new file takes this size.
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("PRAGMA journal_mode = WAL")
        # Checkpoint (copy the log into the file) every WAL_CHECKPOINT_BYTES, not every 4 MiB.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint = {max(64, WAL_CHECKPOINT_BYTES // page_size)}")
        # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the last commits,
        # never the database.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA journal_size_limit = {64 * 1024**2}")
        if _identity(db) == (0, 0):
            begin(db)
            try:
                if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
        _check_identity(db)
    except BaseException:
        db.close()
        raise
    for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; make sure
        make_private_file(Path(f"{path}{suffix}"), create=False)
    return db


def _connect_read_only(path: Path, why: BaseException) -> sqlite3.Connection:
    """Read an existing database that can't be written; ``immutable`` when even WAL's shared memory can't be made."""
    last: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        try:
            db = sqlite3.connect(f"file:{quote(str(path))}?{mode}", uri=True, timeout=BUSY_TIMEOUT_S,
                                 isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            last = e
            continue
        try:
            _check_identity(db)
        except sqlite3.Error as e:
            db.close()
            last = e
            continue
        warn_once(f"modal_magic's result cache at {path} can't be written ({why}): cached results are used, "
                  "new results are not stored", stacklevel=5)
        return db
    assert last is not None
    raise last


def _identity(db: sqlite3.Connection) -> tuple[int, int]:
    return (db.execute("PRAGMA application_id").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0])


def _check_identity(db: sqlite3.Connection) -> None:
    application_id, version = _identity(db)
    if (application_id, version) != (APPLICATION_ID, SCHEMA_VERSION):
        raise sqlite3.DatabaseError(
            f"not a modal_magic cache (application_id={application_id:#x}, user_version={version})")


def _cannot_write(error: BaseException, directory: Path) -> bool:
    """Whether opening failed because the file or its directory can't be written (not because it's broken)."""
    if isinstance(error, sqlite3.OperationalError):
        text = str(error)
        return ("readonly" in text or "read-only" in text
                or ("unable to open" in text and not os.access(directory, os.W_OK)))
    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def _maybe_being_created(path: Path) -> bool:
    """An empty file, or one with SQLite's header: possibly a database another process is setting up."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return True
    return head == b"" or head == b"SQLite format 3\x00"


def move_aside(path: Path, error: BaseException) -> Path:
    """Move a damaged database (and its WAL files) to ``<name>.damaged-<time>``, say where, and return that.

    Never deleted: it holds every function's results, and ``sqlite3 .recover`` may get them back.
    """
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.replace(f"{path}{suffix}", f"{target}{suffix}")
        except FileNotFoundError:
            pass
    warnings.warn(f"modal_magic's cache at {path} was unreadable ({error}); it was moved to {target} and a new "
                  "one started (delete that file once you don't need its results)", CacheWarning, stacklevel=5)
    return target


def begin(db: sqlite3.Connection, *, immediate: bool = True) -> None:
    """Start a transaction (``IMMEDIATE``: take the write lock now), first rolling back one left open.

    A Stop (``KeyboardInterrupt``) can land between a ``BEGIN`` and the ``try`` whose ``except``
    would roll it back; the connection then stays inside that transaction, and every later write
    of the process would fail with "cannot start a transaction within a transaction".
    """
    rollback(db)
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


def rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: SQLite ends one itself on some errors (a full disk),
    and a ROLLBACK then would raise "no transaction is active" over the real error."""
    if db.in_transaction:
        db.execute("ROLLBACK")


def write_failure(error: sqlite3.Error, path: Path) -> str:
    """Why results couldn't be written, in words that say what to do.

    Examples
    --------
    >>> write_failure(sqlite3.OperationalError("database or disk is full"), Path("/c/rows.sqlite3"))
    "the result cache's disk is full (/c/rows.sqlite3: database or disk is full); results are in the frame but not cached: free some space or point MODAL_MAGIC_CACHE_DIR elsewhere"
    """
    if getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in str(error):
        return (f"the result cache's disk is full ({path}: {error}); results are in the frame but not cached: "
                "free some space or point MODAL_MAGIC_CACHE_DIR elsewhere")
    return f"the cache at {path} couldn't be written: {error}"
