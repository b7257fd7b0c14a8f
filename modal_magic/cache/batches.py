"""Records of the OpenAI batches a run submitted, in the cache database, so a restart picks them up.

``df.modal.llm(..., batch=True)`` uploads its requests and creates a batch at OpenAI, which may take
up to a day. The moment the file is uploaded, and again the moment the batch exists, its record is
written here (one small table, ``llm_batches``, in the same SQLite file as the row cache): which
rows it holds (their row keys, which the requests carry as ``custom_id``), what the requests were
and where they went (a hash of both, ``scope``), and what they may cost at worst. Running the cell
again, in this process or a new one, finds the record for its rows and collects the batch instead
of submitting them again. Once a run has its rows' answers (and so has cached them) they are marked
handed over, and a record whose rows all were is marked collected.
No values are stored here, so nothing is unpickled from it; the keys say which rows, never what
they hold.

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as directory:
...     records = BatchRecords(directory)
...     records.uploaded("scope-1", "file-1", [b"k" * 16], 0.5)
...     records.created("file-1", "batch-1")
...     [(r.batch_id, r.keys) for r in records.open("scope-1")]
...     records.handed("file-1", [b"k" * 16])
...     records.open("scope-1"), [r.collected is not None for r in records.all()]
[('batch-1', (b'kkkkkkkkkkkkkkkk',))]
([], [True])
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing as _closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .database import BUSY_TIMEOUT_S, DB_NAME, begin
from .keys import KEY_BYTES

__all__ = ["BatchRecord", "BatchRecords"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_batches (
    file_id TEXT PRIMARY KEY,   -- the uploaded input file: recorded before the batch exists
    batch_id TEXT,              -- NULL until batches.create answered
    scope TEXT NOT NULL,        -- hash of what the requests send and the endpoint (request_scope)
    created REAL NOT NULL,      -- Unix seconds
    collected REAL,             -- when its answers were handed to the run (NULL: still to collect)
    n INTEGER NOT NULL,         -- requests in the batch
    worst_usd REAL NOT NULL,    -- what its requests may cost at most, booked against budget_usd
    keys BLOB NOT NULL,         -- n row keys of KEY_BYTES bytes: the requests' custom_ids
    done BLOB NOT NULL DEFAULT x''  -- the keys whose answers (or errors) were handed to a run
);
CREATE INDEX IF NOT EXISTS llm_batches_by_scope ON llm_batches(scope, collected)
"""


@dataclass(frozen=True)
class BatchRecord:
    """One submitted (or half-submitted) batch, as recorded."""

    file_id: str
    batch_id: str | None
    scope: str
    created: float
    collected: float | None
    worst_usd: float
    keys: tuple[bytes, ...]  # the rows not yet handed to a run


class BatchRecords:
    """The ``llm_batches`` table of the cache database in ``directory``.

    Each call opens its own short-lived connection (batches are few, and it keeps the table usable
    from the thread that polls a batch while the row cache's connection serves the run).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / DB_NAME

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.executescript(_SCHEMA)
        return db

    def uploaded(self, scope: str, file_id: str, keys: Sequence[bytes], worst_usd: float) -> None:
        """Record an input file uploaded for ``keys``, before its batch is created."""
        blob = b"".join(keys)
        if len(blob) != KEY_BYTES * len(keys):
            raise ValueError(f"row keys must be {KEY_BYTES} bytes each")
        with _closing(self._connect()) as db:
            db.execute("INSERT OR REPLACE INTO llm_batches (file_id, batch_id, scope, created, collected, n, worst_usd, "
                       "keys) VALUES (?, NULL, ?, ?, NULL, ?, ?, ?)",
                       (file_id, scope, time.time(), len(keys), float(worst_usd), blob))

    def created(self, file_id: str, batch_id: str) -> None:
        """The batch for ``file_id`` exists: record its id."""
        with _closing(self._connect()) as db:
            db.execute("UPDATE llm_batches SET batch_id = ? WHERE file_id = ?", (batch_id, file_id))

    def handed(self, file_id: str, keys: Sequence[bytes]) -> None:
        """These rows' answers (or errors) from the batch were handed to a run, which cached the answers.

        A later run doesn't look for them here again (it submits what is still missing); once every
        row of the batch was handed over, the record is marked collected.
        """
        with _closing(self._connect()) as db:
            begin(db)
            row = db.execute("SELECT keys, done FROM llm_batches WHERE file_id = ?", (file_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return
            done = _split(row[1]) | set(keys)
            done &= _split(row[0])
            collected = time.time() if len(done) == len(_split(row[0])) else None
            db.execute("UPDATE llm_batches SET done = ?, collected = ? WHERE file_id = ?",
                       (b"".join(sorted(done)), collected, file_id))
            db.execute("COMMIT")

    def forget(self, file_id: str) -> None:
        """Drop the record of an upload whose batch was never created (it is submitted again)."""
        with _closing(self._connect()) as db:
            db.execute("DELETE FROM llm_batches WHERE file_id = ?", (file_id,))

    def open(self, scope: str) -> list[BatchRecord]:
        """The records of ``scope`` not yet collected, oldest first, with the keys not yet handed to a run."""
        return self._select("WHERE scope = ? AND collected IS NULL ORDER BY created", (scope,))

    def all(self) -> list[BatchRecord]:
        """Every record, oldest first."""
        return self._select("ORDER BY created", ())

    def _select(self, where: str, params: tuple[object, ...]) -> list[BatchRecord]:
        with _closing(self._connect()) as db:
            rows = db.execute(f"SELECT file_id, batch_id, scope, created, collected, worst_usd, keys, done "
                              f"FROM llm_batches {where}", params).fetchall()
        records = []
        for file_id, batch_id, scope, created, collected, worst_usd, keys, done in rows:
            handed = _split(done)
            records.append(BatchRecord(file_id, batch_id, scope, created, collected, worst_usd,
                                       tuple(k for k in _chunks(keys) if k not in handed)))
        return records


def _chunks(blob: bytes) -> list[bytes]:
    return [bytes(blob[i:i + KEY_BYTES]) for i in range(0, len(blob), KEY_BYTES)]


def _split(blob: bytes) -> set[bytes]:
    return set(_chunks(blob))
