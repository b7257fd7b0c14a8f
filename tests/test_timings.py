"""``timings=True``: each row's wall time where it ran, as ``<into>_seconds``, on every backend."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

import modal_magic
from modal_magic import OptionsError


@pytest.fixture
def ip(loaded_shell):
    return loaded_shell


def nap(x):
    time.sleep(x)
    if x > 0.15:
        raise ValueError("too slow")
    return x


def test_seconds_column_holds_each_rows_time(backend):
    df = pd.DataFrame({"x": [0.0, 0.2, 0.05, 0.0]})
    out = df.modal.map(nap, column="x", backend=backend, timings=True, progress=False, batch_size=2)
    assert out.columns.tolist() == ["x", "nap", "nap_error", "nap_seconds"]
    assert out["nap_seconds"].dtype == np.float64
    seconds = out["nap_seconds"].tolist()
    # a failed row ran too: its time is there; each row's time is at least what it slept
    assert seconds[1] >= 0.2 and seconds[2] >= 0.05
    assert all(s < 5 for s in seconds)
    assert seconds[1] > seconds[0] and seconds[1] > seconds[3]
    assert str(out["nap_error"].iloc[1]) == "ValueError: too slow"


def test_without_timings_there_is_no_seconds_column():
    out = pd.DataFrame({"x": [0.0]}).modal.map(nap, column="x", backend="sequential", progress=False)
    assert "nap_seconds" not in out.columns


@pytest.mark.parametrize("backend_name", ["threads", "local"])
def test_async_functions_are_timed(backend_name):
    async def wait(x):
        import asyncio

        await asyncio.sleep(x)
        return x

    out = pd.DataFrame({"x": [0.1, 0.0]}).modal.map(wait, column="x", backend=backend_name, timings=True,
                                                   progress=False)
    assert out["wait_seconds"].iloc[0] >= 0.1
    assert out["wait_seconds"].iloc[1] < 0.1


def test_cached_rows_are_nan():
    df = pd.DataFrame({"x": [0.0, 0.01]})
    df.modal.map(nap, column="x", backend="threads", progress=False, timings=True)
    df2 = pd.DataFrame({"x": [0.0, 0.01, 0.02]})
    out = df2.modal.map(nap, column="x", backend="threads", progress=False, timings=True)
    seconds = out["nap_seconds"].tolist()
    assert math.isnan(seconds[0]) and math.isnan(seconds[1])
    assert seconds[2] >= 0.02


def test_retries_count_in_the_rows_time():
    tries = {"n": 0}

    def flaky(x):
        tries["n"] += 1
        if tries["n"] < 3:
            raise RuntimeError("not yet")
        return x

    out = pd.DataFrame({"x": [1]}).modal.map(flaky, column="x", backend="sequential", retries=2, timings=True,
                                            progress=False)
    assert out["flaky"].tolist() == [1]
    # two backoffs (0.1 s and 0.2 s) happened inside the row's time
    assert out["flaky_seconds"].iloc[0] >= 0.3


def test_tiny_rows_run_in_the_kernel_are_timed_too():
    # the local backend finishes very cheap rows inline: those rows must be timed as well
    df = pd.DataFrame({"x": range(20_000)})
    out = df.modal.map(lambda v: v + 1, column="x", into="y", timings=True, progress=False)
    assert out["y"].iloc[-1] == 20_000
    assert not out["y_seconds"].isna().any()


def test_seconds_column_clash_needs_overwrite():
    df = pd.DataFrame({"x": [0.0], "nap_seconds": [1.0]})
    with pytest.raises(OptionsError, match="already has a column 'nap_seconds'"):
        df.modal.map(nap, column="x", backend="sequential", timings=True, progress=False)
    # without timings the column is the user's and stays
    out = df.modal.map(nap, column="x", backend="sequential", progress=False)
    assert out["nap_seconds"].tolist() == [1.0]


def test_timings_on_a_deployed_function_is_refused():
    with pytest.raises(OptionsError, match="deployed function that doesn't report it"):
        pd.DataFrame({"x": [1]}).modal.map(None, column="x", backend="modal:app/fn", timings=True)


def test_timings_must_be_true_or_false():
    with pytest.raises(OptionsError, match="timings=1 is not valid: expected True or False"):
        pd.DataFrame({"x": [1]}).modal.map(nap, column="x", timings=1)


def test_magic_flag_adds_the_seconds_column(ip):
    ip.user_ns["df"] = pd.DataFrame({"x": [0.0, 0.05]})
    ip.run_cell_magic("modal_map", "df.x --backend threads --timings --no-progress", "def nap(x):\n"
                      "    import time; time.sleep(x); return x\n")
    df = ip.user_ns["df"]
    assert df.columns.tolist() == ["x", "nap", "nap_error", "nap_seconds"]
    assert df["nap_seconds"].iloc[1] >= 0.05


def test_retry_failed_replaces_the_failed_tries_time():
    state = {"failed": False}

    def once(x):
        if x == 2 and not state["failed"]:
            state["failed"] = True
            raise ValueError("once")
        time.sleep(0.1 if x == 2 else 0.0)
        return x

    out = pd.DataFrame({"x": [1, 2, 3]}).modal.map(once, column="x", backend="threads", timings=True,
                                                  progress=False)
    assert out["once_seconds"].iloc[1] < 0.1
    again = out.modal.retry_failed()
    assert again["once"].tolist() == [1, 2, 3]
    assert again["once_seconds"].iloc[1] >= 0.1
    assert again["once_seconds"].iloc[0] == out["once_seconds"].iloc[0]
    assert again["once_seconds"].dtype == np.float64


def test_warm_workers_start_timing_when_a_run_asks():
    # the local workers keep the last function they were sent: timings must reach them anyway
    df = pd.DataFrame({"x": [0.01, 0.02]})
    plain = df.modal.map(nap, column="x", backend="local", progress=False, cache=False)
    assert "nap_seconds" not in plain.columns
    timed = df.modal.map(nap, column="x", backend="local", progress=False, cache=False, timings=True)
    assert not timed["nap_seconds"].isna().any()
    assert timed["nap_seconds"].iloc[1] >= 0.02
