"""The cache only trusts what this user wrote, only lives where nobody else can write, and fails loudly.

Stored values are pickles, and unpickling runs code: a value is unpickled only when its keyed MAC
(the per-user secret key) holds; a directory or file someone else could write is refused with one
warning and the run goes on uncached. A damaged database is moved aside, a read-only one is still
read, a full disk says so, and rows that share a key never share a mutable result object.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import stat
import subprocess
import time
import warnings
from hashlib import blake2b
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

import modal_magic
from modal_magic.cache import DB_NAME, CacheWarning, RowCache
from modal_magic.cache import database as database_module
from modal_magic.cache.location import KEY_NAME


def slow_double(x):
    time.sleep(0.001)  # costly enough to be cached
    return 2 * x


def _map(df, **options):
    return df.modal.map(slow_double, column="x", backend="sequential", progress=False, **options)


class _Payload:
    """Unpickling this writes a marker file: proof of code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_value_rewritten_with_a_recomputed_unkeyed_checksum_is_recomputed_not_unpickled(tmp_path):
    df = pd.DataFrame({"x": [1, 2, 3]})
    _map(df)
    cache_dir = modal_magic.cache.default_cache_dir()
    marker = tmp_path / "marker"
    evil = pickle.dumps([_Payload(str(marker))] * 3)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists(), "the payload does run code when unpickled"
    with sqlite3.connect(cache_dir / DB_NAME) as db:
        (keys_blob,) = db.execute("SELECT keys FROM chunks").fetchone()
        # What the old format's check was: BLAKE2b without a key, which anyone can recompute.
        h = blake2b(digest_size=16, person=b"modal_magic-c1")
        h.update(len(keys_blob).to_bytes(8, "little") + keys_blob + evil)
        db.execute("UPDATE chunks SET value = ?, checksum = ?", (evil, h.digest()))
    out = _map(df)
    assert not marker.exists(), "a value the user's key didn't sign was unpickled"
    assert modal_magic.last_run().cached == 0
    assert out["slow_double"].tolist() == [2, 4, 6]


def test_the_key_file_is_private_and_reused(tmp_path):
    with RowCache(tmp_path / "c") as cache:
        key = cache._key
    path = tmp_path / "c" / KEY_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_bytes()) == 32
    with RowCache(tmp_path / "c") as again:
        assert again._key == key


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_directory_others_can_write_turns_the_cache_off_with_one_warning(tmp_path, monkeypatch, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(shared))
    database_module._warned.clear()
    df = pd.DataFrame({"x": [1, 2]})
    with pytest.warns(CacheWarning, match=r"cache is off: .*writable by other users.*chmod 700"):
        assert _map(df)["slow_double"].tolist() == [2, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # once is enough
        _map(df)
    assert modal_magic.last_run().cached == 0
    assert not (shared / DB_NAME).exists() and not (shared / KEY_NAME).exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(theirs))
    database_module._warned.clear()
    with pytest.warns(CacheWarning, match="belongs to another user"):
        _map(pd.DataFrame({"x": [1]}))
    assert not (theirs / DB_NAME).exists()


@pytest.mark.parametrize("name", [DB_NAME, DB_NAME + "-wal", KEY_NAME])
def test_a_symlink_planted_in_the_cache_is_refused(tmp_path, monkeypatch, name):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (directory / name).symlink_to(target)
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(directory))
    database_module._warned.clear()
    with pytest.warns(CacheWarning, match="is a symlink"):
        assert _map(pd.DataFrame({"x": [1]}))["slow_double"].tolist() == [2]
    assert target.read_bytes() == b"", "the symlink was followed"


def test_a_damaged_database_is_moved_aside_not_deleted(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    (directory / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.warns(CacheWarning, match=r"moved to .*\.damaged-"):
        cache = RowCache(directory)
    aside = [p for p in directory.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not sqlite" * 100
    keys = cache.row_keys("fp", [1])
    cache.put_many([(keys[0], 1)])
    assert cache.get_many(keys) == {0: 1}
    cache.close()


def test_a_cache_that_cannot_be_written_is_still_read(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    with RowCache(directory) as cache:
        keys = cache.row_keys("fp", [1, 2])
        cache.put_many([(keys[0], "one")])

    def refuse(path):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(database_module, "connect_read_write", refuse)
    database_module._warned.clear()
    with pytest.warns(CacheWarning, match="can't be written .*readonly.*cached results are used"):
        cache = RowCache(directory)
    assert cache.read_only
    assert cache.get_many(keys) == {0: "one"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writes are skipped quietly: the one warning was enough
        assert cache.put_many([(keys[1], "two")]) == []
    assert cache.get_many(keys) == {0: "one"}
    cache.close()


@contextlib.contextmanager
def _tiny_disk(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mount`` while the block runs (the test is skipped where that can't be done)."""
    mount.mkdir(mode=0o700)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_says_so(tmp_path):
    with _tiny_disk(tmp_path / "tiny", "1m") as mount:
        with RowCache(mount / "cache") as cache:
            keys = cache.row_keys("fp", list(range(50)))
            problems = cache.put_many([(k, os.urandom(40_000)) for k in keys])
            assert problems, "1 MiB can't hold 2 MB"
            assert "the result cache's disk is full" in problems[0][1]
            assert "no transaction is active" not in problems[0][1]
            small = cache.row_keys("fp2", [1])
            cache.put_many([(small[0], 1)])  # and it still works for what fits


def test_a_disk_too_full_to_make_the_cache_says_so_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(database_module, "_warned", set())
    with _tiny_disk(tmp_path / "tinier", "64k") as mount:
        monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(mount / "cache"))
        with pytest.warns(CacheWarning, match=r"result cache is off: the disk holding .*tinier/cache is full .*"
                                              r"free some space or point MODAL_MAGIC_CACHE_DIR elsewhere"):
            out = pd.DataFrame({"x": [1, 2]}).modal.map(lambda x: x * 2, column="x", backend="sequential",
                                                        progress=False)
        assert out["result"].tolist() == [2, 4]


def test_rows_with_equal_inputs_get_their_own_result_objects_from_the_cache():
    df = pd.DataFrame({"x": [1, 1, 2, 1]})

    def listed(x):
        time.sleep(0.001)
        return [x]

    first = df.modal.map(listed, column="x", backend="sequential", progress=False)["listed"].tolist()
    again = df.modal.map(listed, column="x", backend="sequential", progress=False)["listed"].tolist()
    assert modal_magic.last_run().cached == 4
    assert again == first == [[1], [1], [2], [1]]
    again[0].append("mine")
    assert again[1] == [1] and again[3] == [1], "appending to one row's list changed another's"


def test_a_write_interrupted_inside_its_transaction_doesnt_stop_later_writes(tmp_path):
    # A Stop landing between BEGIN and the try that rolls back left the connection in a transaction:
    # every later write of the kernel failed ("cannot start a transaction within a transaction").
    with RowCache(tmp_path / "cache") as cache:
        keys = cache.row_keys("fp", [1, 2])
        assert cache.put_many([(keys[0], "one")]) == []
        cache._db().execute("BEGIN IMMEDIATE")  # as the interrupted write left it
        assert cache.put_many([(keys[1], "two")]) == []
        assert cache.get_many(keys) == {0: "one", 1: "two"}
