"""Never pay twice: the per-row cache through the accessor, resuming after a kill, retrying failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import modal_magic


def notebook_function(source: str, **namespace):
    """Define a function as a notebook cell does (in ``__main__``), so it is fingerprinted by value."""
    scope = {"__name__": "__main__", **namespace}
    exec(textwrap.dedent(source), scope)
    return scope[source.split("def ", 1)[1].split("(", 1)[0].strip()]


def counting(log: Path, body: str = "return x * 2", **namespace):
    """A row function that appends each row it runs to ``log`` (works from worker processes too)."""
    return notebook_function(
        f"""
        def work(x):
            with open({str(log)!r}, "a") as f:
                f.write(f"{{x}}\\n")
            if x % 7 == 3:
                raise ValueError("rate limited")
            {body}
        """,
        **namespace,
    )


def runs(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.mark.parametrize("backend", ["local", "threads", "sequential"])
def test_rerun_computes_only_the_failed_rows(tmp_path, backend):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(50)})
    first = df.modal.map(counting(log), column="x", backend=backend, progress=False)
    failed = [x for x in range(50) if x % 7 == 3]
    assert sorted(runs(log)) == list(range(50))
    assert modal_magic.last_run().cached == 0
    log.unlink()
    second = df.modal.map(counting(log), column="x", backend=backend, progress=False)  # the cell run again
    assert sorted(runs(log)) == failed, "only the failed rows ran again"
    summary = modal_magic.last_run()
    assert (summary.cached, summary.failed, summary.succeeded) == (50 - len(failed), len(failed), 0)
    pd.testing.assert_frame_equal(first, second)


def test_async_functions_are_cached_too(tmp_path):
    log = str(tmp_path / "runs")  # a side channel that isn't itself part of the function's identity

    async def fetch(x):
        with open(log, "a") as f:
            f.write(f"{x}\n")
        return x + 1

    df = pd.DataFrame({"x": range(5)})
    df.modal.map(fetch, column="x", progress=False)
    out = df.modal.map(fetch, column="x", progress=False)
    assert runs(tmp_path / "runs") == [0, 1, 2, 3, 4]
    assert out["fetch"].tolist() == [1, 2, 3, 4, 5]


def test_editing_the_function_reruns_everything(tmp_path):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(10)})
    df.modal.map(counting(log), column="x", backend="threads", progress=False)
    log.unlink()
    out = df.modal.map(counting(log, body="return x * 3"), column="x", backend="threads", progress=False)
    assert sorted(runs(log)) == list(range(10))
    assert out["work"].dropna().tolist() == [x * 3 for x in range(10) if x % 7 != 3]


def test_changing_a_closure_or_global_value_reruns(tmp_path):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(10)})
    df.modal.map(counting(log, body="return x * FACTOR", FACTOR=2), column="x", progress=False)
    log.unlink()
    out = df.modal.map(counting(log, body="return x * FACTOR", FACTOR=5), column="x", progress=False)
    assert sorted(runs(log)) == list(range(10)), "a global the function uses changed"
    assert out["work"].iloc[1] == 5

    def make(offset):
        def add(x):
            time.sleep(0.001)  # worth caching: rows cheaper than reading them back aren't stored
            return x + offset

        return add

    first = df.modal.map(make(1), column="x", backend="threads", progress=False)
    second = df.modal.map(make(100), column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 0, "a closure value changed"
    assert second["add"].iloc[0] == 100 and first["add"].iloc[0] == 1
    df.modal.map(make(100), column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 10, "the same closure value again: all cached"


def test_speed_options_do_not_rerun(tmp_path):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(20)})
    df.modal.map(counting(log), column="x", max_containers=2, progress=False)
    log.unlink()
    df.modal.map(counting(log), column="x", max_containers=1, batch_size=3, progress=True)
    assert sorted(runs(log)) == [x for x in range(20) if x % 7 == 3]


def test_cache_off_and_refresh(tmp_path):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(6)})
    df.modal.map(counting(log), column="x", backend="threads", cache=False, progress=False)
    log.unlink()
    df.modal.map(counting(log), column="x", backend="threads", progress=False)
    assert len(runs(log)) == 6, "cache=False stored nothing"
    log.unlink()
    df.modal.map(counting(log), column="x", backend="threads", cache="refresh", progress=False)
    assert len(runs(log)) == 6, "refresh recomputes every row"
    log.unlink()
    df.modal.map(counting(log), column="x", backend="threads", progress=False)
    assert runs(log) == [3], "and refresh stored what it computed"


def test_cache_clear(tmp_path):
    log = tmp_path / "runs"
    df = pd.DataFrame({"x": range(4)})
    df.modal.map(counting(log), column="x", backend="threads", progress=False)
    modal_magic.cache.clear()
    log.unlink()
    df.modal.map(counting(log), column="x", backend="threads", progress=False)
    assert len(runs(log)) == 4


def test_retry_failed_runs_just_the_failed_rows_with_new_options(tmp_path):
    state = tmp_path / "attempts"

    flaky = notebook_function(
        f"""
        def flaky(x):
            path = {str(tmp_path)!r} + f"/attempt-{{x}}"
            n = int(open(path).read()) if os.path.exists(path) else 0
            open(path, "w").write(str(n + 1))
            if x in (2, 5) and n < 2:
                raise TimeoutError("slow upstream")
            return x * 10
        """,
        os=os,
    )
    df = pd.DataFrame({"x": range(8)}, index=[f"r{i}" for i in range(8)])
    out = df.modal.map(flaky, column="x", backend="threads", progress=False)
    assert out["flaky_error"].notna().tolist() == [False, False, True, False, False, True, False, False]
    fixed = out.modal.retry_failed(retries=2, progress=False)
    assert fixed["flaky"].tolist() == [x * 10 for x in range(8)]
    assert str(fixed["flaky"].dtype) == "int64" or str(fixed["flaky"].dtype) == "Int64"
    assert fixed["flaky_error"].isna().all()
    assert fixed.index.tolist() == df.index.tolist()
    attempts = {p.name: int(p.read_text()) for p in tmp_path.glob("attempt-*")}
    assert attempts["attempt-0"] == 1, "rows that succeeded did not run again"
    assert attempts["attempt-2"] == 3
    assert state.exists() is False


def test_retry_failed_takes_a_fixed_function(tmp_path):
    log = tmp_path / "runs"
    out = pd.DataFrame({"x": range(10)}).modal.map(counting(log), column="x", into="y", backend="threads",
                                                   progress=False)
    log.unlink()
    fixed = out.modal.retry_failed(fn=notebook_function("def work(x):\n    return -x\n"), progress=False)
    assert fixed["y"].tolist() == [0, 2, 4, -3, 8, 10, 12, 14, 16, 18]
    assert fixed["y_error"].isna().all() and not log.exists(), "only the fixed function ran, on the failed row"


def test_the_accessor_replaces_the_columns_it_made_on_a_rerun(tmp_path):
    log = tmp_path / "runs"
    out = pd.DataFrame({"x": range(10)}).modal.map(counting(log), column="x", into="y", backend="threads",
                                                   progress=False)
    log.unlink()
    again = out.modal.map(counting(log), column="x", into="y", backend="threads", progress=False)
    assert again.columns.tolist() == ["x", "y", "y_error"]
    assert runs(log) == [3], "the cache answered the rest"
    mine = out.drop(columns=["y_error"]).assign(y_error=None)
    mine.attrs = {}  # a frame that doesn't say modal_magic made y: its columns are the user's
    with pytest.raises(modal_magic.OptionsError, match="already has a column 'y'; pass overwrite=True"):
        mine.modal.map(counting(log), column="x", into="y", backend="threads", progress=False)


def test_an_expanded_result_is_replaced_on_a_rerun():
    df = pd.DataFrame({"x": [1, 2, 3]})
    split = notebook_function("def split(x):\n    return {'half': x / 2, 'double': 2 * x}\n")
    out = df.modal.map(split, column="x", expand=True, backend="sequential", progress=False)
    again = out.modal.map(split, column="x", expand=True, backend="sequential", progress=False)
    assert again.columns.tolist() == ["x", "half", "double", "split_error"]
    assert again["double"].tolist() == [2, 4, 6]
    with pytest.raises(modal_magic.OptionsError, match="expand=True made a column 'half' that the DataFrame already"):
        df.assign(half=0).modal.map(split, column="x", expand=True, backend="sequential", progress=False)


def test_retry_failed_needs_a_map_result():
    with pytest.raises(ValueError, match="call retry_failed\\(\\) on the frame that df.modal.map"):
        pd.DataFrame({"x": [1]}).modal.retry_failed()


KERNEL_SCRIPT = """
import os, time, pandas as pd, modal_magic
def slow(x):
    with open(os.environ["SIDE_CHANNEL"], "a") as f:
        f.write(f"{x}\\n")
    while x >= 100 and os.path.exists(os.environ["HOLD"]):
        time.sleep(0.01)  # the first kernel is killed while its rows wait here: mid-run, however loaded the machine
    time.sleep(0.02)
    return x * x
out = pd.DataFrame({"x": range(200)}).modal.map(slow, column="x", backend="threads", max_containers=2,
                                                batch_size=5, progress=False)
out.to_pickle(os.environ["RESULT"])
"""


def test_a_killed_kernel_resumes_where_it_stopped(tmp_path):
    """SIGKILL a real kernel mid-run, start a new one, run the cell again: done rows aren't recomputed."""
    from jupyter_client.manager import start_new_kernel

    side = tmp_path / "side"
    hold = tmp_path / "hold"
    hold.touch()
    # The same environment for both kernels: the function reads it, so it is part of what the cache keys.
    env = {**os.environ, "SIDE_CHANNEL": str(side), "RESULT": str(tmp_path / "out.pkl"), "HOLD": str(hold)}
    km, kc = start_new_kernel(kernel_name="python3", env=env, extra_arguments=[])
    try:
        kc.execute(KERNEL_SCRIPT)
        deadline = time.monotonic() + 60
        while len(runs(side)) < 100 and time.monotonic() < deadline:  # rows 0-99 ran, the next ones wait
            time.sleep(0.05)
        os.kill(km.provisioner.process.pid, signal.SIGKILL)
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    before_kill = runs(side)
    assert 80 <= len(before_kill) < 200, "killed mid-run"
    side.unlink()
    hold.unlink()
    km, kc = start_new_kernel(kernel_name="python3", env=env, extra_arguments=[])
    try:
        reply = kc.execute_interactive(KERNEL_SCRIPT, timeout=120)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    rerun = set(runs(side))
    # every row that finished before the kill is cached; at most the batches in flight ran twice
    finished_before = set(before_kill) - rerun
    assert len(finished_before) >= len(before_kill) - 2 * 5 * 2
    assert rerun | set(before_kill) == set(range(200))
    out = pd.read_pickle(tmp_path / "out.pkl")
    assert out["slow"].tolist() == [x * x for x in range(200)], "the same frame as an uninterrupted run"


def test_result_frames_still_save_and_load(tmp_path):
    out = pd.DataFrame({"x": [1, 0]}).modal.map(lambda x: 1 // x, column="x", backend="threads", progress=False)
    json.dumps(out.attrs)  # what to_parquet does with attrs: they must stay plain data
    out.to_pickle(tmp_path / "out.pkl")
    loaded = subprocess.run(
        [sys.executable, "-c", f"import pandas as pd; print(pd.read_pickle({str(tmp_path / 'out.pkl')!r})"
                               "['result_error'].tolist()[1])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert loaded == "ZeroDivisionError: integer division or modulo by zero", "another process can load it"
    with pytest.raises(ValueError, match="happened in another Python process"):
        _foreign(tmp_path / "out.pkl")


def _foreign(path):
    """The loaded frame as another process sees it: the run's id isn't known there."""
    frame = pd.read_pickle(path)
    frame.attrs["modal_magic_runs"] = {"result": "run-from-elsewhere"}
    return frame.modal.retry_failed()


def test_rows_cheaper_than_reading_them_back_are_not_stored():
    df = pd.DataFrame({"x": range(1000)})
    df.modal.map(lambda x: x + 1, column="x", progress=False)
    df.modal.map(lambda x: x + 1, column="x", progress=False)
    # x + 1 is recomputed faster than it is read back (only the first, one-row batches, which pay
    # the worker's first-call costs, may look expensive enough to keep)
    assert modal_magic.last_run().cached < 10

    def slow(x):
        time.sleep(0.0005)
        return x + 1

    df.head(20).modal.map(slow, column="x", backend="threads", progress=False)
    df.head(20).modal.map(slow, column="x", backend="threads", progress=False)
    assert modal_magic.last_run().cached == 20
