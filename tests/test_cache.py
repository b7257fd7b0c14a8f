"""The row cache: keys, storage round trips, and that a damaged, killed or full cache is never trusted."""

from __future__ import annotations

import math
import os
import pickle
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modal_magic
from modal_magic import cache as cache_module
from modal_magic.cache import chunks as chunks_module, database as database_module, store as store_module
from modal_magic.cache import DB_NAME, CacheWarning, RowCache, row_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path):
    with RowCache(tmp_path / "cache") as opened:
        yield opened


def stored_chunks(cache: RowCache) -> int:
    with sqlite3.connect(cache.path) as db:
        return db.execute("SELECT count(*) FROM chunks").fetchone()[0]


# --- keys --------------------------------------------------------------------------------------------


def test_keys_are_16_bytes_deterministic_and_depend_on_the_fingerprint():
    rows = ["a", "b", "a", 7, 2.5, None, ("t", 1), b"a"]
    keys = row_keys("fp-1", rows)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert keys == row_keys("fp-1", list(rows))
    assert keys[0] == keys[2] and len(set(keys)) == len(rows) - 1
    assert set(keys).isdisjoint(row_keys("fp-2", rows))


def test_a_row_gets_the_same_key_whatever_else_is_in_the_column():
    alone = row_keys("fp", ["text", 5, 1.5, True, 2**70, "lone \ud800 surrogate"])
    mixed = [row_keys("fp", [value, None, {"other": 1}, "x", 3])[0]
             for value in ["text", 5, 1.5, True, 2**70, "lone \ud800 surrogate"]]
    assert alone == mixed


def test_values_of_different_types_never_share_a_key():
    keys = row_keys("fp", [1, 1.0, True, "1", b"1", (1,), [1], np.int64(1)])
    assert len(set(keys)) == len(keys)


def test_starmap_rows_hash_by_argument_position():
    keys = row_keys("fp", [("a", "b"), ("b", "a"), ("a", "b"), ("ab", ""), ("a", 1)], star=True)
    assert keys[0] == keys[2]
    assert len({keys[0], keys[1], keys[3], keys[4]}) == 4


def test_equal_containers_get_equal_keys_whatever_their_identity():
    shared = "word"
    one = [shared, shared]
    two = ["".join(["wo", "rd"]), "".join(["wo", "rd"])]
    assert row_keys("fp", [one, {"k": one}]) == row_keys("fp", [two, {"k": two}])


def test_a_row_that_cannot_be_hashed_faithfully_gets_no_key():
    looped: list = []
    looped.append(looped)
    keys = row_keys("fp", ["ok", threading.Lock(), looped, lambda: 1])
    assert keys[0] is not None
    assert keys[1:] == [None, None, None]


def test_keys_accept_a_series_like_a_list():
    series = pd.Series([1, 2, 3])
    assert row_keys("fp", series) == row_keys("fp", [1, 2, 3])


# --- storage -----------------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise TypeError("not today")


def test_round_trip_of_many_kinds_of_value(cache):
    notebook = {"__name__": "__main__"}
    exec(textwrap.dedent("""
        class Label:
            def __init__(self, name, score):
                self.name, self.score = name, score
            def __eq__(self, other):
                return (self.name, self.score) == (other.name, other.score)
    """), notebook)
    values = [1, None, {"label": "pos", "scores": [0.1, 0.9]}, math.nan, "text", (1, "a"),
              np.arange(6, dtype=np.float32).reshape(2, 3), pd.Timestamp("2024-05-01 12:00", tz="UTC"),
              notebook["Label"]("pos", 0.75), lambda x: x + 1]
    keys = cache.row_keys("round-trip", list(range(len(values))))
    assert cache.put_many(list(zip(keys, values))) == []
    # a fresh connection, as after a kernel restart
    cache.close()
    got = RowCache(cache.directory).get_many(keys)
    assert sorted(got) == list(range(len(values)))
    assert got[0] == 1 and got[1] is None and got[2] == values[2] and math.isnan(got[3])
    assert got[4] == "text" and got[5] == (1, "a")
    np.testing.assert_array_equal(got[6], values[6])
    assert got[6].dtype == np.float32
    assert got[7] == values[7] and got[7].tz is not None
    assert got[8] == values[8] and type(got[8]).__name__ == "Label"
    assert got[9](1) == 2


def test_only_the_keys_asked_for_are_hits_with_duplicates_and_none(cache):
    keys = cache.row_keys("fp", ["a", "b", "c"])
    cache.put_many([(keys[0], "A"), (keys[2], "C")])
    asked = [keys[2], None, keys[1], keys[0], keys[2]]
    assert cache.get_many(asked) == {0: "C", 3: "A", 4: "C"}
    assert cache.get_many([]) == {} and cache.get_many([None]) == {}


def test_the_newest_value_for_a_key_wins(cache):
    keys = cache.row_keys("fp", ["a", "b"])
    cache.put_many([(keys[0], "old"), (keys[1], "kept")])
    cache.put_many([(keys[0], "refreshed")])
    assert cache.get_many(keys) == {0: "refreshed", 1: "kept"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(puts=st.lists(st.lists(st.integers(0, 30), max_size=12), max_size=5),
       asked=st.lists(st.one_of(st.none(), st.integers(0, 30)), max_size=40),
       in_order=st.booleans())
def test_get_many_returns_the_latest_put_of_every_key_asked_for(tmp_path_factory, puts, asked, in_order):
    """Any layout of chunks (runs, scattered, overlapping refreshes) against a plain dict."""
    with RowCache(tmp_path_factory.mktemp("prop")) as cache:
        universe = cache.row_keys("prop", list(range(31)))
        latest = {}
        for version, rows in enumerate(puts):
            cache.put_many([(universe[r], (r, version)) for r in rows])
            latest.update({r: (r, version) for r in rows})
        if in_order:  # the usual re-run: all rows in order, so chunks are runs of the request
            asked = list(range(31)) + asked
        keys = [None if r is None else universe[r] for r in asked]
        expected = {i: latest[r] for i, r in enumerate(asked) if r is not None and r in latest}
        assert cache.get_many(keys) == expected


def test_unpicklable_and_oversized_values_are_reported_and_the_rest_stored(cache):
    cache.max_entry_bytes = 10_000
    keys = cache.row_keys("fp", [1, 2, 3, 4])
    rejected = cache.put_many([(keys[0], "fine"), (keys[1], Unpicklable()), (keys[2], b"x" * 20_000),
                               (keys[3], threading.Lock())])
    reasons = dict(rejected)
    assert set(reasons) == {keys[1], keys[2], keys[3]}
    assert "can't be pickled" in reasons[keys[1]] and "not today" in reasons[keys[1]]
    assert "too large" in reasons[keys[2]]
    assert "can't be pickled" in reasons[keys[3]]
    assert cache.get_many(keys) == {0: "fine"}
    assert cache.put_many([(None, "no key")]) == []


def test_a_large_put_is_split_into_chunks_that_all_come_back(cache, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_CHUNK_BYTES", 50_000)
    keys = cache.row_keys("fp", list(range(12)))
    values = [os.urandom(20_000) for _ in keys]
    assert cache.put_many(list(zip(keys, values))) == []
    assert stored_chunks(cache) >= 5
    assert cache.get_many(keys) == dict(enumerate(values))


def test_input_values_never_reach_the_disk(cache):
    secret = "sk-SECRET-INPUT-0123456789"
    keys = cache.row_keys("fp", [secret])
    cache.put_many([(keys[0], "result")])
    cache.close()
    on_disk = b"".join(p.read_bytes() for p in cache.directory.iterdir())
    assert secret.encode() not in on_disk
    assert b"result" in on_disk


def _tamper(cache: RowCache, sql: str, *params) -> None:
    with sqlite3.connect(cache.path) as db:
        db.execute(sql, params)


def _valid_checksum(key: bytes, keys_blob: bytes, value_blob: bytes) -> bytes:
    return chunks_module.chunk_mac(key, keys_blob, value_blob)


@pytest.mark.parametrize("damage", ["garbage value", "flipped byte", "wrong checksum", "other format",
                                    "foreign pickle with a valid checksum", "truncated keys"])
def test_a_damaged_or_foreign_chunk_is_a_miss_and_is_deleted(cache, damage):
    keys = cache.row_keys("fp", ["a", "b"])
    cache.put_many([(keys[0], "A"), (keys[1], "B")])
    with sqlite3.connect(cache.path) as db:
        keys_blob, value_blob = db.execute("SELECT keys, value FROM chunks").fetchone()
    if damage == "garbage value":
        _tamper(cache, "UPDATE chunks SET value = ?", b"garbage")
    elif damage == "flipped byte":
        flipped = bytearray(value_blob)
        flipped[len(flipped) // 2] ^= 0xFF
        _tamper(cache, "UPDATE chunks SET value = ?", bytes(flipped))
    elif damage == "wrong checksum":
        _tamper(cache, "UPDATE chunks SET checksum = ?", b"\0" * 16)
    elif damage == "other format":
        _tamper(cache, "UPDATE chunks SET fmt = 99")
    elif damage == "foreign pickle with a valid checksum":
        foreign = pickle.dumps({"not": "a list"})
        _tamper(cache, "UPDATE chunks SET value = ?, checksum = ?", foreign, _valid_checksum(cache._key, keys_blob, foreign))
    elif damage == "truncated keys":
        _tamper(cache, "UPDATE chunks SET keys = ?", keys_blob[:20])
    assert cache.get_many(keys) == {}
    assert stored_chunks(cache) == 0
    cache.put_many([(keys[0], "A again")])  # and the cache still works
    assert cache.get_many(keys) == {0: "A again"}


def test_a_file_that_is_not_a_database_is_replaced_with_a_warning(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.warns(CacheWarning, match="unreadable"):
        cache = RowCache(directory)
    keys = cache.row_keys("fp", [1])
    cache.put_many([(keys[0], 1)])
    assert cache.get_many(keys) == {0: 1}
    cache.close()


def test_directory_and_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with RowCache(tmp_path / "deep" / "cache") as cache:
            cache.put_many([(cache.row_keys("fp", [1])[0], 1)])
            files = [cache.path, *(cache.path.with_name(DB_NAME + s) for s in ("-wal", "-shm"))]
            assert stat.S_IMODE(os.stat(cache.directory).st_mode) == 0o700
            for path in files:
                if path.exists():
                    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
            assert cache.path.with_name(DB_NAME + "-wal").exists()
    finally:
        os.umask(old)


def test_clear_empties_the_cache_and_gives_the_space_back(cache):
    keys = cache.row_keys("fp", list(range(1000)))
    cache.put_many([(k, os.urandom(1000)) for k in keys])
    full = cache.size_bytes()
    assert full > 1_000_000
    cache.clear()
    assert cache.get_many(keys) == {}
    empty = 4 * database_module.PAGE_SIZE  # the schema's few pages
    assert cache.size_bytes() <= empty and os.path.getsize(cache.path) <= empty


def test_module_level_clear_takes_a_path(tmp_path):
    with RowCache(tmp_path) as cache:
        keys = cache.row_keys("fp", [1, 2])
        cache.put_many([(keys[0], "one"), (keys[1], "two")])
    cache_module.clear(tmp_path)
    with RowCache(tmp_path) as cache:
        assert cache.get_many(keys) == {}
    cache_module.clear(tmp_path / "never-created")  # nothing to clear is fine
    assert not (tmp_path / "never-created").exists()


def test_the_size_limit_evicts_the_least_recently_used(tmp_path):
    now = [1_000_000.0]
    cache = RowCache(tmp_path, size_limit_bytes=1_200_000)  # three chunks and the schema's pages fit, not four
    cache._clock = lambda: now[0]
    chunk = {}
    for name in "ABC":
        chunk[name] = cache.row_keys(name, list(range(3)))
        cache.put_many([(k, os.urandom(100_000)) for k in chunk[name]])  # ~300 kB each
        now[0] += 100
    now[0] += 2 * store_module.ATIME_RESOLUTION_S
    assert len(cache.get_many(chunk["A"])) == 3  # A is now the most recently used
    now[0] += 1
    chunk["D"] = cache.row_keys("D", list(range(3)))
    cache.put_many([(k, os.urandom(100_000)) for k in chunk["D"]])
    hits = {name: len(cache.get_many(keys)) for name, keys in chunk.items()}
    assert hits == {"A": 3, "B": 0, "C": 0, "D": 3}
    assert cache.size_bytes() <= 1_200_000
    cache.close()


def test_threads_share_one_cache(cache):
    def work(t):
        for b in range(20):
            keys = cache.row_keys(f"thread-{t}", list(range(b * 50, (b + 1) * 50)))
            assert cache.put_many([(k, (t, b, i)) for i, k in enumerate(keys)]) == []
            assert len(cache.get_many(keys)) == 50

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t in range(4):
        got = cache.get_many(cache.row_keys(f"thread-{t}", list(range(1000))))
        assert got == {i: (t, i // 50, i % 50) for i in range(1000)}


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MODAL_MAGIC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.default_cache_dir() == tmp_path / "xdg" / "modal_magic"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_module.default_cache_dir() == tmp_path / "home" / ".cache" / "modal_magic"
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(tmp_path / "explicit"))
    first = cache_module.default_cache()
    assert first.directory == tmp_path / "explicit" and cache_module.default_cache() is first
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(tmp_path / "moved"))
    assert cache_module.default_cache().directory == tmp_path / "moved"
    cache_module.default_cache().close()


WRITER = """
import sys
from modal_magic.cache import RowCache, row_keys

cache = RowCache(sys.argv[1])
for batch in range(40):
    keys = row_keys(sys.argv[2], list(range(batch * 100, (batch + 1) * 100)))
    assert cache.put_many([(k, (sys.argv[2], batch * 100 + i)) for i, k in enumerate(keys)]) == []
    assert len(cache.get_many(keys)) == 100
"""


def test_two_processes_write_at_once(tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for name in ("one", "two")]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    with RowCache(tmp_path) as cache:
        for name in ("one", "two"):
            got = cache.get_many(row_keys(name, list(range(4000))))
            assert got == {i: (name, i) for i in range(4000)}


CHILD = """
import sys, time
from modal_magic.cache import RowCache, row_keys

cache = RowCache(sys.argv[1])
for batch in range(int(sys.argv[2]), 10_000):
    keys = row_keys("killed", list(range(batch * 200, (batch + 1) * 200)))
    print("writing", batch, time.monotonic(), flush=True)
    assert cache.put_many([(k, str(batch * 200 + i) * 3000) for i, k in enumerate(keys)]) == []
    print("committed", batch, time.monotonic(), flush=True)
"""


def _batch_rows(cache: RowCache, batch: int) -> dict:
    return cache.get_many(row_keys("killed", list(range(batch * 200, (batch + 1) * 200))))


def test_a_writer_killed_mid_write_leaves_every_committed_batch(tmp_path):
    """Three writers in turn, each SIGKILLed at a different point of a ~2.5 MB put_many."""
    committed: list[int] = []
    in_flight: list[int] = []
    for fraction in (0.2, 0.5, 0.8):
        start = committed[-1] + 2 if committed else 0  # a batch killed in flight is never rewritten
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(start)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        durations: list[float] = []
        began = 0.0
        try:
            for line in child.stdout:
                kind, batch, at = line.split()
                if kind == "committed":
                    committed.append(int(batch))
                    durations.append(float(at) - began)
                    continue
                began = float(at)
                if len(durations) >= 6:  # kill it part-way through this put, by the time the last ones took
                    time.sleep(max(0.0, began + fraction * sorted(durations)[3] - time.monotonic()))
                    os.kill(child.pid, signal.SIGKILL)
                    in_flight.append(int(batch))
                    break
        finally:
            child.kill()
            child.wait(timeout=30)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
    assert len(committed) >= 18
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean reopen: no "unreadable" warning
        cache = RowCache(tmp_path)
    for batch in committed:
        assert _batch_rows(cache, batch) == {i: str(batch * 200 + i) * 3000 for i in range(200)}, batch
    for batch in in_flight:
        assert len(_batch_rows(cache, batch)) in (0, 200)  # all or nothing
    cache.close()


def test_processes_creating_the_cache_at_the_same_moment_all_succeed(tmp_path):
    """Two kernels opening a new cache together: no SIGBUS, no 'locked', every write lands.

    Opening and closing the database (or its -shm file) to fix permissions used to drop SQLite's
    POSIX locks in that process, letting another reset the shared memory under it (SIGBUS).
    """
    for round_ in range(4):
        directory = tmp_path / f"round-{round_}"
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(directory), f"w{i}"], cwd=ROOT,
                                    stderr=subprocess.PIPE, text=True) for i in range(5)]
        for writer in writers:
            _, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err[-2000:]


def test_a_hit_matches_the_whole_key_not_only_the_half_that_is_indexed(cache):
    # Lookups index the keys' last 8 bytes: a stored key that shares them with the key asked for,
    # but not its first 8, must never answer for it.
    key = cache.row_keys("fp", ["a"])[0]
    twin = key[:4] + bytes(b ^ 0xFF for b in key[4:8]) + key[8:]
    assert cache.put_many([(key, "A")]) == []
    assert cache.get_many([twin]) == {}
    assert cache.put_many([(twin, "T")]) == []
    assert cache.get_many([key]) == {0: "A"} and cache.get_many([twin]) == {0: "T"}
    both = cache.get_many([key, twin, key])
    assert both[0] == "A" and both[2] == "A" and both.get(1, "T") == "T"


def test_lookup_takes_keys_as_one_array_and_skips_rows_without_a_key(cache):
    hasher = cache_module.RowKeyHasher("fp")
    lock = threading.Lock()
    packed, bad = hasher.key_array(["a", lock, "b", "a"], star=False)
    assert bad.tolist() == [False, True, False, False]
    assert cache.put_packed(packed[[0]], [["first"]]) == []
    rows, values = cache.lookup(packed, bad)
    assert rows.tolist() == [0, 3] and values == [["first"], ["first"]]
    assert values[0] is not values[1], "equal keys get their own objects"
    assert [bytes(k) for k in packed[[0, 2]]] == cache.row_keys("fp", ["a", "b"])


def test_a_map_too_cheap_to_store_keys_no_row_and_stores_nothing(monkeypatch):
    hashed = []
    real = cache_module.RowKeyHasher.key_array

    def counting(self, rows, star):
        hashed.append(len(rows))
        return real(self, rows, star)

    monkeypatch.setattr(cache_module.RowKeyHasher, "key_array", counting)
    df = pd.DataFrame({"x": range(50_000)})
    for _ in range(2):
        out = df.modal.map(lambda x: x + 1, column="x", backend="sequential", progress=False)
        assert out["result"].iloc[-1] == 50_000 and modal_magic.last_run().cached == 0
    assert sum(hashed) == 0, f"{sum(hashed):,} rows were keyed for a cache that stores none of them"


def test_rows_keyed_as_they_are_stored_are_found_by_a_rerun_that_keys_them_all():
    # The first run keys only the rows it stores, batch by batch; the re-run keys every row up front.
    # Mixed types, a failing row and an input that can't be hashed: the keys must agree.
    lock = threading.Lock()
    df = pd.DataFrame({"x": [1, "1", 2.5, None, (1, 2), lock, 0, b"1", 1, "1"]})

    def slow(x):
        time.sleep(0.002)
        return 1 / x if x == 0 else repr(x)

    first = df.modal.map(slow, column="x", backend="threads", progress=False)
    again = df.modal.map(slow, column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 8, "every row but the failed one and the lock comes from the cache"
    assert again["slow"].tolist()[:5] == first["slow"].tolist()[:5] == ["1", "'1'", "2.5", "None", "(1, 2)"]
    assert again["slow_error"].notna().tolist() == [False] * 6 + [True] + [False] * 3


def test_a_run_of_mostly_cheap_rows_stores_only_rows_far_too_slow_for_noise(cache):
    # Batch times are wall time: a warm-up or a busy machine makes some batches of cheap rows look
    # costly. Those must not be stored (one stored row makes every later run key all its rows),
    # while a row that really took long (it called a model) must be.
    from modal_magic.cache.rows import RunCache

    args = list(range(3000))
    hasher = cache_module.RowKeyHasher("fp")
    run = RunCache(cache, hasher, args, star=False, refresh=False)
    run.save(range(0, 1), [0], [], 0.2)  # a first one-row batch: a worker's warm-up, or a model loading
    run.save(range(1, 1001), list(range(1, 1001)), [], 200e-6)  # 0.2 µs a row
    run.save(range(1001, 1003), ["slow", "slower"], [], 0.05)  # two rows that called a model
    run.save(range(1003, 1100), list(range(1003, 1100)), [], 0.004)  # 40 µs a row: a hiccup
    run.save(range(1100, 3000), list(range(1100, 3000)), [], 400e-6)
    run.flush()
    rows, values = cache.lookup(*hasher.key_array(args, star=False))
    assert rows.tolist() == [1001, 1002] and values == ["slow", "slower"]

    llm = RunCache(cache, hasher, args, star=False, refresh=False)
    llm.save(range(2999, 3000), ["answer"], [], 0.8)  # a run of one-row batches of slow rows: stored at once
    rows, values = cache.lookup(*hasher.key_array(args, star=False))
    assert rows.tolist() == [1001, 1002, 2999] and values[-1] == "answer"

    costly = RunCache(cache, hasher, args, star=False, refresh=False)
    costly.save(range(0, 2000), [f"v{i}" for i in range(2000)], [5], 0.01)  # 5 µs a row, row 5 failed
    costly.save(range(2000, 3000), list(range(2000, 3000)), [], 1e-4)  # a fast-looking batch
    costly.flush()
    rows, values = cache.lookup(*hasher.key_array(args, star=False))
    assert rows.tolist() == [i for i in range(2000) if i != 5] + [2999]
    assert values[:6] == ["v0", "v1", "v2", "v3", "v4", "v6"]


# --- keys remembered within the kernel (cache/key_memo.py) ------------------------------------------


def _counting_key_array(monkeypatch) -> list[int]:
    hashed: list[int] = []
    real = cache_module.RowKeyHasher.key_array

    def counting(self, rows, star):
        hashed.append(len(rows))
        return real(self, rows, star)

    monkeypatch.setattr(cache_module.RowKeyHasher, "key_array", counting)
    return hashed


def _slowish(text):
    time.sleep(0.0001)
    return text.upper()


def test_rerunning_a_cell_hashes_only_the_rows_whose_objects_changed(monkeypatch):
    hashed = _counting_key_array(monkeypatch)
    df = pd.DataFrame({"x": [f"row {i}" for i in range(300)]})
    df.modal.map(_slowish, column="x", backend="threads", progress=False)
    first = sum(hashed)
    assert first == 300, "the first run keys the rows it stores"
    out = df.modal.map(_slowish, column="x", backend="threads", progress=False)
    assert sum(hashed) == first and modal_magic.last_run().cached == 300, "the same objects are not hashed again"
    # A value replaced twice: the second object may be given the address the first one had, were
    # the first one freed; the memo holds it, so that can't happen and row 7 is seen as changed.
    df.loc[7, "x"] = "new " + "a" * 50
    df.loc[7, "x"] = "new " + "b" * 50
    out = df.modal.map(_slowish, column="x", backend="threads", progress=False)
    assert sum(hashed) == first + 1, "only the changed row is hashed"
    assert out.loc[7, "_slowish"] == "NEW " + "B" * 50 and out.loc[8, "_slowish"] == "ROW 8"
    assert modal_magic.last_run().cached == 299


def test_keys_are_not_remembered_for_rows_that_can_change_in_place(monkeypatch):
    df = pd.DataFrame({"x": [[1, 2], [3]]})
    total = lambda row: (time.sleep(0.001), sum(row))[1]  # noqa: E731
    assert df.modal.map(total, column="x", backend="threads", progress=False)["result"].tolist() == [3, 3]
    df.loc[0, "x"].append(10)  # the same list object, now another value
    assert df.modal.map(total, column="x", backend="threads", progress=False)["result"].tolist() == [13, 3]
    assert modal_magic.last_run().cached == 1


def test_remembered_keys_belong_to_one_function(monkeypatch):
    df = pd.DataFrame({"x": [f"r{i}" for i in range(50)]})
    df.modal.map(_slowish, column="x", backend="threads", progress=False)
    out = df.modal.map(lambda s: (time.sleep(0.0001), s * 2)[1], column="x", backend="threads", progress=False)
    assert out["result"].iloc[3] == "r3r3" and modal_magic.last_run().cached == 0


def test_remembered_keys_go_when_the_frames_they_came_from_do():
    import gc

    from modal_magic.cache.key_memo import KEY_MEMO

    df = pd.DataFrame({"x": [f"text {i}" for i in range(100)]})
    out = df.modal.map(_slowish, column="x", backend="threads", progress=False)
    assert KEY_MEMO.current is not None and KEY_MEMO.current.rows[5] is df["x"].iloc[5]
    modal_magic.runs.set_last_result(None)
    del df, out
    gc.collect()
    assert KEY_MEMO.current is None, "the memo kept a deleted frame's rows alive"


def test_nothing_is_remembered_for_columns_that_hand_out_new_objects_each_time():
    # int64 (and Arrow-backed strings) make new objects on every tolist(): a memo of them would
    # never be used and would keep a copy of the column alive.
    from modal_magic.cache.key_memo import KEY_MEMO

    KEY_MEMO.forget()
    df = pd.DataFrame({"x": range(1000, 1200)})
    slow = lambda x: (time.sleep(0.0001), x + 1)[1]  # noqa: E731
    df.modal.map(slow, column="x", backend="threads", progress=False)
    out = df.modal.map(slow, column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 200 and out["result"].iloc[-1] == 1200
    assert KEY_MEMO.current is None


# --- a re-run of the last lookup, or of a run that stored every row, matches nothing (match.Found) --


def _counting_matchers(monkeypatch) -> list[int]:
    from modal_magic.cache import match

    made: list[int] = []
    real = match.KeyMatcher.__init__

    def counting(self, keys):
        made.append(len(keys))
        real(self, keys)

    monkeypatch.setattr(match.KeyMatcher, "__init__", counting)
    return made


def test_a_rerun_of_a_run_that_stored_every_row_reads_them_where_they_were(monkeypatch):
    made = _counting_matchers(monkeypatch)
    df = pd.DataFrame({"x": [f"row {i % 40}" for i in range(400)]})  # repeated inputs too
    first = df.modal.map(lambda s: (time.sleep(0.0001), [s])[1], column="x", backend="threads", progress=False)
    again = df.modal.map(lambda s: (time.sleep(0.0001), [s])[1], column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 400 and made == [], "the re-run matched keys it didn't need to"
    assert again["result"].tolist() == first["result"].tolist()
    assert again["result"].iloc[0] is not again["result"].iloc[40], "equal rows share one list"


def test_rows_stored_out_of_order_are_read_back_where_they_went(cache, monkeypatch):
    # Batches come back in any order: the record of where each row went (kept as they are
    # written) must send every row of the re-run to its own value, without matching keys.
    from modal_magic.cache.rows import RunCache

    made = _counting_matchers(monkeypatch)
    monkeypatch.setattr(store_module, "MAX_CHUNK_ROWS", 700)
    args = [f"row {i}" for i in range(5000)]
    hasher = cache_module.RowKeyHasher("fp")
    run = RunCache(cache, hasher, args, star=False, refresh=False)
    batches = [range(start, min(start + 900, len(args))) for start in range(0, len(args), 900)]
    for batch in random.Random(3).sample(batches, len(batches)):
        run.save(batch, [[args[p], p] for p in batch], [], 0.001 * len(batch))
        run.flush()
    run.report()
    assert cache._found is not None
    rows, values = RunCache(cache, hasher, args, star=False, refresh=False).hits()
    assert made == [], "the re-run matched keys instead of reading where the rows went"
    assert rows.tolist() == list(range(5000)) and values == [[a, p] for p, a in enumerate(args)]


def test_what_was_found_is_not_reused_once_the_stored_chunks_change(monkeypatch):
    made = _counting_matchers(monkeypatch)

    def stamp(s):  # a new value each run: which run's copy a lookup returns shows
        time.sleep(0.0001)
        return f"{s}:{time.perf_counter_ns()}"

    df = pd.DataFrame({"x": [f"v{i}" for i in range(300)]})
    df.modal.map(stamp, column="x", backend="sequential", progress=False)
    newer = df.modal.map(stamp, column="x", backend="sequential", progress=False, cache="refresh")
    assert made == []
    out = df.modal.map(stamp, column="x", backend="sequential", progress=False)
    assert out["stamp"].tolist() == newer["stamp"].tolist(), "an older copy won over the refresh's"
    # another frame of the same function adds a chunk: the next lookup matches keys again
    pd.DataFrame({"x": ["other"]}).modal.map(stamp, column="x", backend="sequential", progress=False)
    out = df.modal.map(stamp, column="x", backend="sequential", progress=False)
    assert out["stamp"].tolist() == newer["stamp"].tolist() and made == [1, 300], made


def test_a_damaged_chunk_under_a_remembered_lookup_makes_only_its_rows_run_again(monkeypatch):
    from modal_magic.cache.default import default_cache

    df = pd.DataFrame({"x": [f"d{i}" for i in range(3000)]})
    slowish = lambda s: (time.sleep(0.00002), s + "!")[1]  # noqa: E731
    monkeypatch.setattr(store_module, "MAX_CHUNK_ROWS", 1000)
    df.modal.map(slowish, column="x", backend="sequential", progress=False)
    df.modal.map(slowish, column="x", backend="sequential", progress=False)  # served by what was remembered
    assert default_cache()._found is not None
    with sqlite3.connect(default_cache().path) as db:
        chunk_id = db.execute("SELECT min(id) FROM chunks").fetchone()[0]
        db.execute("UPDATE chunks SET value = ? WHERE id = ?", (pickle.dumps(["forged"] * 1000), chunk_id))
    out = df.modal.map(slowish, column="x", backend="sequential", progress=False)
    assert "forged" not in set(out["result"]) and out["result"].iloc[-1] == "d2999!"
    assert modal_magic.last_run().cached == 2000
