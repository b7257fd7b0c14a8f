"""Faults cost only their own rows: dying workers, stuck rows, flaky rows, hostile functions, and Ctrl-C.

Also what keeps the local pool healthy: no hang whatever the batch and result sizes, a pool sized
by what a run can use and reaped when idle, and no state carried from one run's function to the next.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pandas as pd
import psutil
import pytest

import modal_magic
from modal_magic import MapInterrupted
from modal_magic.backends import Runtime
from modal_magic.engine import map_frame
from modal_magic.backends import pool, processes
from modal_magic.options import MapOptions, OptionsError, process_ceiling


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
    return {p.pid for p in me.children(recursive=True) if "row_runner.py" in " ".join(p.cmdline())}


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


def test_rows_in_flight_on_worker_processes_are_cancelled_by_stop(sigint_raises):
    df = pd.DataFrame({"x": [0, 1, 2, 3, 4, 5, 6, 8, 9, 10] * 40})
    timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(MapInterrupted) as info:
        in_two_processes(df, max_containers=2, progress=False)
    # Uninterrupted the run takes ~10 s; Stop after 0.8 s must end it well before (slack for a busy CI machine).
    assert time.monotonic() - started < 6.0
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
    out = df.modal.map(sleep_on_2, column="x", backend=backend, timeout=0.5, progress=False)
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
    from modal_magic.backends.row_runner import backoff_s

    assert [backoff_s(a) for a in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_s(20) == 5.0


@pytest.mark.parametrize("backend", ["local", "threads", "sequential"])
def test_interrupt_stops_fast_and_keeps_finished_rows(backend, sigint_raises):
    df = pd.DataFrame({"x": range(40)})
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(MapInterrupted, match=r"stopped after \d+ of 40 rows") as info:
        df.modal.map(slow, column="x", backend=backend, max_containers=2, batch_size=1, progress=False)
    stopped_in = time.monotonic() - started - 1.0
    assert stopped_in < 2.5  # the rows left would take 3 s more: Stop must not wait for them
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


# --- no hangs whatever the sizes ----------------------------------------------------------------------


def _run_script(code: str, limit_s: float) -> str:
    """Run ``code`` in a fresh Python (a hang fails this test only); return its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=limit_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(120, method="thread")
def test_huge_batches_of_floats_finish_with_the_right_values():
    # Both directions carry megabytes at once: the kernel sends the next batch while a worker sends results.
    out = _run_script("""
        import pandas as pd, modal_magic
        df = pd.DataFrame({"x": [i / 4 for i in range(200_000)]})
        out = df.modal.map(lambda x: x * 2, column="x", into="y", batch_size=50_000, progress=False, cache=False)
        assert out["y"].tolist() == [i / 2 for i in range(200_000)]
        assert out["y_error"].isna().all()
        print("ok", len(out))
    """, 100)
    assert out.split() == ["ok", "200000"]


@pytest.mark.timeout(120, method="thread")
def test_a_run_of_large_results_in_big_batches_finishes():
    out = _run_script("""
        import pandas as pd, modal_magic
        df = pd.DataFrame({"x": range(600)})
        out = df.modal.map(lambda x: str(x % 10) * 100_000, column="x", into="y", batch_size=300,
                           max_containers=2, progress=False, cache=False)
        assert [len(v) for v in out["y"]] == [100_000] * 600
        assert out["y"].str[0].tolist() == [str(x % 10) for x in range(600)]
        print("ok")
    """, 100)
    assert out.split() == ["ok"]


def test_batches_are_bounded_in_bytes():
    backend = processes.ProcessBackend()
    rows = backend.max_batch_rows(["x" * 100_000] * 1000)
    assert rows is not None and rows * 100_000 <= processes.MAX_BATCH_BYTES
    assert backend.max_batch_rows(list(range(1000))) >= 100_000


# --- rows that raise what can't be printed, or BaseExceptions -----------------------------------------


class Unprintable(ValueError):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def unprintable_on_1(x):
    if x == 1:
        raise Unprintable()
    return x


def interrupt_on_1(x):
    if x == 1:
        raise KeyboardInterrupt("from the row")
    if x == 2:
        raise SystemExit(4)
    return x


async def interrupt_on_1_async(x):
    await asyncio.sleep(0)
    return interrupt_on_1(x)


ALL_PATHS = ["sequential", "local", "threads", "asyncio"]


def _map(fn, backend, **options):
    if backend == "asyncio":  # an async def function runs on the event-loop backend
        fn = {interrupt_on_1: interrupt_on_1_async}.get(fn, fn)
        if fn is unprintable_on_1:
            async def fn(x):  # noqa: F811 - the async twin
                return unprintable_on_1(x)
        backend = "local"
    df = pd.DataFrame({"x": range(4)})
    return df.modal.map(fn, column="x", into="y", backend=backend, progress=False, cache=False, **options)


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("backend", ALL_PATHS)
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_exception_that_cant_be_printed_is_that_rows_error(backend, timeout):
    out = _map(unprintable_on_1, backend, timeout=timeout)
    assert out["y_error"].tolist()[1] == "Unprintable: <unprintable Unprintable>"
    assert out["y"].drop(index=1).tolist() == [0, 2, 3]
    assert modal_magic.last_result() is out


@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("backend", ALL_PATHS)
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_a_row_raising_keyboard_interrupt_or_system_exit_is_that_rows_error(backend, timeout, sigint_raises):
    out = _map(interrupt_on_1, backend, timeout=timeout)
    assert out["y_error"].tolist()[1:3] == ["KeyboardInterrupt: from the row", "SystemExit: 4"]
    assert out["y"].drop(index=[1, 2]).tolist() == [0, 3]
    assert modal_magic.last_result() is out


@pytest.mark.timeout(60, method="thread")
def test_cheap_rows_run_in_the_kernel_keep_a_rows_keyboard_interrupt_as_its_error(sigint_raises):
    from modal_magic.backends.row_runner import run_rows

    values, errors = run_rows(interrupt_on_1, False, [0, 1, 2, 3])  # what the engine's in-kernel path calls
    assert values == [0, None, None, 3]
    assert [(e[0], e[1], e[2]) for e in errors] == [(1, "KeyboardInterrupt", "from the row"), (2, "SystemExit", "4")]
    df = pd.DataFrame({"x": [i % 1000 + 3 for i in range(300_000)]})
    df.loc[299_990, "x"] = 1
    out = df.modal.map(interrupt_on_1, column="x", into="y", progress=False, cache=False)
    assert out["y_error"].notna().sum() == 1
    assert out["y_error"].iloc[299_990] == "KeyboardInterrupt: from the row"


# --- the pool: sized by the run, capped, reaped ------------------------------------------------------


def _pool_size() -> int:
    return len(_worker_pids())


@pytest.mark.timeout(120, method="thread")
def test_a_run_starts_no_more_workers_than_it_has_rows_and_huge_max_containers_is_capped(monkeypatch):
    modal_magic.shutdown()
    df = pd.DataFrame({"x": range(3)})
    with pytest.warns(RuntimeWarning, match=r"max_containers=120 asks for more worker processes than this "
                                            rf"machine can use: using {process_ceiling()}"):
        out = df.modal.map(slow, column="x", max_containers=120, progress=False, cache=False)
    assert out["slow"].tolist() == [0, 1, 2]
    assert 1 <= _pool_size() <= 3
    many = pd.DataFrame({"x": range(40)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        many.modal.map(slow, column="x", max_containers=10**6, batch_size=1, progress=False, cache=False)
        many.modal.map(slow, column="x", max_containers=10**6, batch_size=1, progress=False, cache=False)
    capped = [w for w in caught if "max_containers=1000000" in str(w.message)]
    assert len(capped) == 1, "the cap is said once"
    assert _pool_size() == process_ceiling()


@pytest.mark.timeout(120, method="thread")
def test_idle_workers_are_reaped_and_a_smaller_run_uses_only_what_it_needs(monkeypatch):
    modal_magic.shutdown()
    df = pd.DataFrame({"x": range(8)})
    df.modal.map(slow, column="x", max_containers=3, batch_size=1, progress=False, cache=False)
    assert _pool_size() == 3
    # Three rows are enough for the smaller runs (one worker: eight would take 1.6 s each).
    out = df.head(3).modal.map(slow, column="x", max_containers=1, batch_size=1, progress=False, cache=False)
    assert out["slow"].tolist() == [0, 1, 2] and _pool_size() == 3  # warm workers stay until idle too long...
    monkeypatch.setattr(pool, "IDLE_TIMEOUT_S", 0.5)
    time.sleep(0.6)
    df.head(3).modal.map(slow, column="x", max_containers=1, batch_size=1, progress=False, cache=False)
    assert _pool_size() == 1  # ...then the next run's start stops the idle ones
    deadline = time.monotonic() + 10
    while _pool_size() and time.monotonic() < deadline:  # and a timer stops the last one
        time.sleep(0.2)
    assert _pool_size() == 0


# --- runs don't leak into each other ---------------------------------------------------------------------


def litter(x):
    os.chdir("/")
    os.environ["MODAL_MAGIC_TEST_LITTER"] = "left behind"
    return x


def look(x):
    time.sleep(0.05)
    return (os.getcwd(), os.environ.get("MODAL_MAGIC_TEST_LITTER"), os.environ.get("MODAL_MAGIC_TEST_KERNEL"))


@pytest.mark.timeout(60, method="thread")
def test_a_function_changing_cwd_or_environment_does_not_change_the_next_run(monkeypatch, tmp_path):
    df = pd.DataFrame({"x": range(6)})
    df.modal.map(litter, column="x", max_containers=2, batch_size=1, progress=False, cache=False)
    monkeypatch.chdir(tmp_path)  # the kernel's own cwd and environment may change: the workers follow
    monkeypatch.setenv("MODAL_MAGIC_TEST_KERNEL", "now")
    out = df.modal.map(look, column="x", max_containers=2, batch_size=1, progress=False, cache=False)
    assert set(out["look"]) == {(str(tmp_path), None, "now")}


def fork_on_1(x):
    if x == 1:
        os.fork()  # the child is never told to exit
    return x * 2


@pytest.mark.timeout(60, method="thread")
def test_a_function_that_forks_does_not_break_the_pool():
    df = pd.DataFrame({"x": range(6)})
    out = df.modal.map(fork_on_1, column="x", max_containers=2, batch_size=2, progress=False, cache=False)
    assert out["fork_on_1"].tolist() == [0, 2, 4, 6, 8, 10]
    again = df.modal.map(slow, column="x", max_containers=2, progress=False, cache=False)
    assert again["slow"].tolist() == list(range(6)) and again["slow_error"].isna().all()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_a_timeout_must_be_a_finite_positive_number(bad):
    with pytest.raises(OptionsError, match=r"timeout=(inf|nan|-1\.0) is not valid: expected a (finite )?number of "
                                           r"seconds greater than 0"):
        pd.DataFrame({"x": [1]}).modal.map(slow, column="x", timeout=bad)
    assert math.isfinite(modal_magic.options.MapOptions.create(timeout=1e9).timeout)


def sleepy_after_start(x):
    time.sleep(0.05)
    return x


@pytest.mark.timeout(120, method="thread")
def test_a_rows_timeout_does_not_count_worker_start_up(monkeypatch):
    modal_magic.shutdown()
    # Workers that take 1.5 s to start (as under load, or importing a heavy library) with a 0.3 s row timeout.
    real = pool.WorkerProcess.__init__

    def slow_start(self, messages):
        real(self, messages)
        self.send(("fn", __import__("cloudpickle").dumps(lambda x: time.sleep(1.5)), False, 0, None, False, False))
        self.send(("batch", 2**62, 1, __import__("pickle").dumps([0])))

    monkeypatch.setattr(pool.WorkerProcess, "__init__", slow_start)
    monkeypatch.setattr(processes, "_STUCK_GRACE_S", 0.2)
    df = pd.DataFrame({"x": range(4)})
    out = df.modal.map(sleepy_after_start, column="x", timeout=0.3, max_containers=2, batch_size=1,
                       progress=False, cache=False)
    assert out["sleepy_after_start_error"].isna().all(), out["sleepy_after_start_error"].tolist()
    assert out["sleepy_after_start"].tolist() == [0, 1, 2, 3]
    modal_magic.shutdown()
