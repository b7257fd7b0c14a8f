"""Records of the Modal calls a run spawned, in the cache database, so a new kernel picks them up.

On ``backend="modal"`` each batch of rows is a spawned call on a detached app: it goes on running
if the kernel dies. The moment a call exists, its record is written here (one small table,
``modal_calls``, in the same SQLite file as the row cache): the call's id, the app it runs in, the
run it belongs to and the kernel that spawned it, and which rows it holds (their row keys, in the
batch's order, so its output lines up with them). ``job`` names what the rows are run with (the
function's fingerprint, which includes the options that change a result), so running the same cell
again, in any process, finds the calls for its rows (:meth:`CallRecords.open`) and collects them
instead of paying for those rows again. A record is deleted once its rows' outcomes were handed to
a run (which cached the successes). No values are stored, only keys.

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as directory:
...     records = CallRecords(directory)
...     records.spawned("fc-1", job="fp", run="r1", app_id="ap-1", function="embed", keys=[b"k" * 16, None])
...     [(r.call_id, r.keys) for r in records.open("fp")]
...     records.forget(["fc-1"])
...     records.open("fp")
[('fc-1', (b'kkkkkkkkkkkkkkkk', None))]
[]
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .database import BUSY_TIMEOUT_S, DB_NAME
from .keys import KEY_BYTES

__all__ = ["CallRecord", "CallRecords", "this_owner", "owner_gone"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS modal_calls (
    call_id TEXT PRIMARY KEY,   -- Modal's FunctionCall id
    job TEXT NOT NULL,          -- what the rows run with: the function's fingerprint (with its result options)
    run TEXT NOT NULL,          -- the run that spawned it (a job id for jobs() and attach())
    owner TEXT NOT NULL,        -- host:pid of the kernel that spawned it
    app_id TEXT NOT NULL,       -- the detached app it runs in
    function TEXT NOT NULL,     -- the user's function name, for jobs()
    created REAL NOT NULL,      -- Unix seconds
    keys BLOB NOT NULL          -- the batch's row keys, KEY_BYTES each, in order (all zero: a row without a key)
);
CREATE INDEX IF NOT EXISTS modal_calls_by_job ON modal_calls(job);
CREATE INDEX IF NOT EXISTS modal_calls_by_app ON modal_calls(app_id)
"""
_NO_KEY = bytes(KEY_BYTES)


@dataclass(frozen=True)
class CallRecord:
    """One spawned call, as recorded."""

    call_id: str
    job: str
    run: str
    owner: str
    app_id: str
    function: str
    created: float
    keys: tuple[bytes | None, ...]  # the batch's rows in order; None for a row that had no key


def this_owner() -> str:
    """How records name this process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(owner: str) -> bool:
    """Whether the process that spawned a call is known to have ended (same host, no such pid).

    A process on another host can't be looked at: it is not known to be gone.

    Examples
    --------
    >>> owner_gone(this_owner()), owner_gone(f"{socket.gethostname()}:999999999")
    (False, True)
    """
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return int(pid) > 0xFFFFFFFF
    return False


class CallRecords:
    """The ``modal_calls`` table of the cache database in ``directory``; one connection, shared by threads."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / DB_NAME
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous = NORMAL")  # as the row cache: a killed process loses nothing committed
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def spawned(self, call_id: str, *, job: str, run: str, app_id: str, function: str,
                keys: Sequence[bytes | None], owner: str | None = None) -> None:
        """Record a call the moment it exists."""
        blob = b"".join(_NO_KEY if k is None else bytes(k) for k in keys)
        if len(blob) != KEY_BYTES * len(keys):
            raise ValueError(f"row keys must be {KEY_BYTES} bytes each")
        with self._lock:
            self._connect().execute(
                "INSERT OR REPLACE INTO modal_calls (call_id, job, run, owner, app_id, function, created, keys) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (call_id, job, run, owner or this_owner(), app_id, function, time.time(), blob))

    def forget(self, call_ids: Sequence[str]) -> None:
        """Delete these records: their outcomes were handed to a run (or the calls were cancelled)."""
        if not call_ids:
            return
        with self._lock:
            self._connect().executemany("DELETE FROM modal_calls WHERE call_id = ?", [(c,) for c in call_ids])

    def open(self, job: str) -> list[CallRecord]:
        """The records of ``job``, oldest first."""
        return self._select("WHERE job = ? ORDER BY created", (job,))

    def all(self) -> list[CallRecord]:
        """Every record, oldest first."""
        return self._select("ORDER BY created", ())

    def of_app(self, app_id: str) -> int:
        """How many calls of ``app_id`` are still recorded."""
        with self._lock:
            return self._connect().execute("SELECT count(*) FROM modal_calls WHERE app_id = ?", (app_id,)).fetchone()[0]

    def has_job(self, job: str) -> bool:
        """Whether any call of ``job`` is recorded (a cheap look before keying every row)."""
        with self._lock:
            return self._connect().execute("SELECT 1 FROM modal_calls WHERE job = ? LIMIT 1", (job,)).fetchone() is not None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _select(self, where: str, params: tuple[object, ...]) -> list[CallRecord]:
        with self._lock:
            rows = self._connect().execute(
                f"SELECT call_id, job, run, owner, app_id, function, created, keys FROM modal_calls {where}",
                params).fetchall()
        return [CallRecord(call_id, job, run, owner, app_id, function, created,
                           tuple(None if k == _NO_KEY else k for k in _chunks(keys)))
                for call_id, job, run, owner, app_id, function, created, keys in rows]


def _chunks(blob: bytes) -> list[bytes]:
    return [bytes(blob[i:i + KEY_BYTES]) for i in range(0, len(blob), KEY_BYTES)]
