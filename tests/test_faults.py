"""Faults cost only their own rows: dying workers, stuck rows, flaky rows, and Ctrl-C."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import threading
import time

import pandas as pd
import psutil
import pytest

import modal_magic
from modal_magic import MapInterrupted
from modal_magic.backends import Runtime
from modal_magic.engine import map_frame
from modal_magic.options import MapOptions


def die_on_13(x):
    if x == 13:
        os._exit(3)
    return x + 1


def segfault_on_5(x):
    if x == 5:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x + 1


def oom_killed_on_4(x):
    if x == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer sends
    return x


def sleep_on_2(x):
    if x == 2:
        time.sleep(5)  # a thread can't be killed: the abandoned one must end before the suite does
    return x


def stuck_on_1(x):
    # Stuck where no signal handler can run (like a C extension that never returns to Python):
    # the alarm that enforces the timeout inside the worker is blocked.
    if x == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    return x


def slow(x):
    time.sleep(0.2)
    return x


def _worker_pids() -> set[int]:
    me = psutil.Process(os.getpid())
    return {p.pid for p in me.children(recursive=True) if "_worker.py" in " ".join(p.cmdline())}


class InTwoProcesses:
    """An ``async`` row function run in two worker processes, as an LLM run with processes=2 asks for."""

    __name__ = "where"

    async def __call__(self, x: int) -> int:
        if x == 7:
            os._exit(5)
        await asyncio.sleep(0.05)
        return os.getpid()


def in_two_processes(df: pd.DataFrame, **options) -> pd.DataFrame:
    """Map InTwoProcesses with a runtime asking for two worker processes, as llm_frame does."""
    return map_frame(df, InTwoProcesses(), columns=["x"], star=False, into=None,
                     options=MapOptions.create(**options), runtime=Runtime(worker_processes=2))


def test_an_async_function_that_asks_for_processes_runs_in_them_and_a_dying_one_costs_only_its_row():
    df = pd.DataFrame({"x": range(40)})
    out = in_two_processes(df, max_containers=8, progress=False)
    pids = set(out["where"].dropna())
    # Two worker processes, then the one that replaced the worker row 7 killed; never the kernel.
    assert len(pids) == 3 and os.getpid() not in pids
    assert out["where_error"].tolist()[7] == "WorkerCrashed: the worker process running this row exited with code 5"
    # Every other row came back, the ones that were in flight on the dead worker too.
    assert out["where_error"].notna().sum() == 1 and out["where"].notna().sum() == 39


def test_rows_in_flight_on_worker_processes_are_cancelled_by_stop():
    df = pd.DataFrame({"x": [0, 1, 2, 3, 4, 5, 6, 8, 9, 10] * 40})
    timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(MapInterrupted) as info:
        in_two_processes(df, max_containers=2, progress=False)
    assert time.monotonic() - started < 3.0
    out = info.value.result
    done = out["where"].notna()
    assert 2 <= done.sum() < len(df) and (done ^ out["where_error"].notna()).all()
    assert set(out.loc[~done, "where_error"].map(lambda e: e.type_name)) == {"Cancelled"}


def test_a_dying_worker_costs_only_its_row():
    df = pd.DataFrame({"x": range(40)})
    out = df.modal.map(die_on_13, column="x", backend="local", batch_size=8, progress=False)
    assert out["die_on_13"].tolist()[:13] == list(range(1, 14))
    assert out["die_on_13"].tolist()[14:] == list(range(15, 41))
    assert out["die_on_13_error"].tolist()[13] == (
        "WorkerCrashed: the worker process running this row exited with code 3"
    )
    assert out["die_on_13_error"].notna().sum() == 1
    # the pool recovered: the next run works on the same warm pool
    again = df.modal.map(die_on_13, column="x", backend="local", progress=False)
    assert again["die_on_13_error"].notna().sum() == 1


def test_a_segfault_is_reported_as_a_crash():
    df = pd.DataFrame({"x": range(10)})
    out = df.modal.map(segfault_on_5, column="x", backend="local", batch_size=4, retries=1, progress=False)
    assert out["segfault_on_5_error"].tolist()[5] == (
        "WorkerCrashed: the worker process running this row was killed by SIGSEGV"
    )
    errors = out.modal.errors()
    assert errors["attempts"].tolist() == [3]  # the batch, the isolated try, one retry
    assert out["segfault_on_5"].drop(index=5).tolist() == [x + 1 for x in range(10) if x != 5]


def test_an_oom_killed_worker_is_reported_and_replaced():
    df = pd.DataFrame({"x": range(12)})
    out = df.modal.map(oom_killed_on_4, column="x", backend="local", batch_size=6, progress=False)
    assert out["oom_killed_on_4_error"].tolist()[4] == (
        "WorkerCrashed: the worker process running this row was killed by SIGKILL"
    )
    assert out["oom_killed_on_4"].drop(index=4).tolist() == [x for x in range(12) if x != 4]


@pytest.mark.parametrize("backend", ["local", "threads"])
def test_timeout_fails_the_slow_row_only(backend):
    df = pd.DataFrame({"x": range(6)})
    started = time.monotonic()
    out = df.modal.map(sleep_on_2, column="x", backend=backend, timeout=0.5, progress=False)
    assert time.monotonic() - started < 10
    assert out["sleep_on_2_error"].tolist()[2] == "TimeoutError: the row ran longer than timeout=0.5s"
    assert out["sleep_on_2"].drop(index=2).tolist() == [0, 1, 3, 4, 5]


def test_a_worker_stuck_in_c_code_is_replaced():
    df = pd.DataFrame({"x": range(4)})
    before = _worker_pids()
    out = df.modal.map(stuck_on_1, column="x", backend="local", timeout=0.3, batch_size=1, progress=False)
    errors = out.modal.errors()
    assert errors.index.tolist() == [1]
    assert errors["type"].tolist() == ["TimeoutError"]
    assert "was replaced" in errors["message"].iloc[0]
    assert out["stuck_on_1"].drop(index=1).tolist() == [0, 2, 3]
    assert before - _worker_pids(), "the stuck worker was killed"


def test_retries_record_attempts(tmp_path):
    marker = tmp_path / "tries"

    def flaky(x):
        # fails twice per row, then succeeds: the count lives in files so worker processes share it
        path = marker.with_name(f"tries-{x}")
        n = int(path.read_text()) if path.exists() else 0
        path.write_text(str(n + 1))
        if n < 2:
            raise ConnectionError(f"try {n + 1}")
        return x

    df = pd.DataFrame({"x": range(3)})
    out = df.modal.map(flaky, column="x", backend="local", retries=2, progress=False)
    assert out["flaky"].tolist() == [0, 1, 2]
    out = df.assign(x=[10, 11, 12]).modal.map(flaky, column="x", backend="local", retries=1, progress=False)
    errors = out.modal.errors()
    assert errors["error"].tolist() == ["ConnectionError: try 2"] * 3
    assert errors["attempts"].tolist() == [2, 2, 2]


def test_retry_backoff_grows():
    from modal_magic.backends._worker import backoff_delay

    assert [backoff_delay(a) for a in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_delay(20) == 5.0


@pytest.mark.parametrize("backend", ["local", "threads", "sequential"])
def test_interrupt_stops_fast_and_keeps_finished_rows(backend):
    df = pd.DataFrame({"x": range(40)})
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(MapInterrupted, match=r"stopped after \d+ of 40 rows") as info:
        df.modal.map(slow, column="x", backend=backend, max_containers=2, batch_size=1, progress=False)
    stopped_in = time.monotonic() - started - 1.0
    assert stopped_in < 2.0
    out = info.value.result
    assert out is modal_magic.last_result()
    assert len(out) == 40
    done = out["slow"].notna()
    assert 2 <= done.sum() < 40
    assert (done ^ out["slow_error"].notna()).all(), "every row has a result or an error"
    assert set(out.loc[~done, "slow_error"].map(lambda e: e.type_name)) == {"Cancelled"}
    if backend == "local":
        busy_killed_pool_usable = df.modal.map(slow, column="x", backend="local", sample=4, progress=False)
        assert busy_killed_pool_usable["slow"].tolist() == [0, 1, 2, 3]
        assert len(_worker_pids()) <= os.cpu_count() + 2
