"""The engine through the accessors, on every local backend: values, columns, dtypes, index, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modal_magic
from modal_magic import OptionsError, RowFailed
from modal_magic.engine import BatchSizer


def double_plus_one(x):
    return x * 2 + 1


def inverse(x):
    return 10 // x


def words(text):
    if not text:
        raise ValueError("empty text")
    return len(text.split())


def add(a, b):
    return a + b


def scores(text):
    return {"length": len(text), "upper": text.upper()}


async def async_double(x):
    await asyncio.sleep(0.001)
    if x == 3:
        raise KeyError("three")
    return x * 2


def test_map_adds_result_and_error_columns(backend):
    df = pd.DataFrame({"text": ["a b", "", "c d e"], "other": [1, 2, 3]})
    out = df.modal.map(words, column="text", backend=backend, progress=False)
    assert out.columns.tolist() == ["text", "other", "words", "words_error"]
    assert out["words"].tolist() == [2, pd.NA, 3]
    assert str(out["words"].dtype) == "Int64"
    assert out["words_error"].tolist() == [None, "ValueError: empty text", None]
    assert df.columns.tolist() == ["text", "other"], "the input frame is never mutated"


def test_results_without_failures_keep_numpy_dtypes(backend):
    df = pd.DataFrame({"x": np.arange(1000)})
    out = df.modal.map(double_plus_one, column="x", backend=backend, progress=False)
    assert out["double_plus_one"].dtype == np.dtype("int64")
    assert out["double_plus_one"].tolist() == [x * 2 + 1 for x in range(1000)]
    assert out["double_plus_one_error"].isna().all()


@pytest.mark.parametrize(
    "values, fn, dtype",
    [
        ([1.0, 2.0, 0.0], lambda x: 1 / x, "float64"),
        ([True, False, None], lambda x: x ^ True, "boolean"),
        (["a", "b", None], lambda x: x.upper(), "str"),
    ],
)
def test_failed_rows_leave_nullable_holes(values, fn, dtype):
    out = pd.DataFrame({"v": values}).modal.map(fn, column="v", into="r", backend="sequential", progress=False)
    assert out["r_error"].notna().tolist() == [False, False, True]
    got = str(out["r"].dtype)
    assert got == dtype or (dtype == "str" and got in ("object", "string", "str")), got
    assert out["r"].isna().tolist() == [False, False, True]


def test_starmap_passes_one_argument_per_column(backend):
    df = pd.DataFrame({"a": [1, 2, 3], "b": [10, 20, 30]})
    out = df.modal.starmap(add, columns=["a", "b"], into="total", backend=backend, progress=False)
    assert out["total"].tolist() == [11, 22, 33]


def test_series_map_returns_a_frame():
    s = pd.Series(["x y", "z"], name="text", index=["r1", "r2"])
    out = s.modal.map(words, backend="threads", progress=False)
    assert out.columns.tolist() == ["text", "words", "words_error"]
    assert out.index.tolist() == ["r1", "r2"]
    assert out["words"].tolist() == [2, 1]
    unnamed = pd.Series([1, 2]).modal.map(double_plus_one, backend="sequential", progress=False)
    assert unnamed.columns.tolist() == ["value", "double_plus_one", "double_plus_one_error"]


@pytest.mark.parametrize(
    "index",
    [
        pd.Index(["b", "a", "b", "a"]),
        pd.MultiIndex.from_tuples([(1, "x"), (1, "x"), (0, "y"), (2, "z")], names=["k", "s"]),
        pd.Index([40, 30, 20, 10], name="id"),
    ],
    ids=["duplicate-labels", "multiindex", "non-default"],
)
def test_rows_keep_labels_and_positions(backend, index):
    df = pd.DataFrame({"x": [1, 0, 2, 0]}, index=index)
    out = df.modal.map(inverse, column="x", backend=backend, progress=False)
    assert out.index.equals(index)
    assert out["inverse"].tolist() == [10, pd.NA, 5, pd.NA]
    assert out["inverse_error"].notna().tolist() == [False, True, False, True]
    errors = out.modal.errors()
    assert errors.index.equals(index[[1, 3]])
    assert errors["type"].tolist() == ["ZeroDivisionError", "ZeroDivisionError"]


def test_empty_frame(backend):
    df = pd.DataFrame({"x": pd.Series([], dtype="int64")})
    out = df.modal.map(double_plus_one, column="x", backend=backend, progress=False)
    assert out.columns.tolist() == ["x", "double_plus_one", "double_plus_one_error"]
    assert len(out) == 0


def test_errors_frame_has_details(backend):
    df = pd.DataFrame({"text": ["ok", "", "fine"]}, index=["a", "b", "c"])
    out = df.modal.map(words, column="text", backend=backend, progress=False, retries=1)
    errors = out.modal.errors()
    assert errors.columns.tolist() == ["column", "error", "type", "message", "traceback", "attempts", "exception"]
    assert errors.index.tolist() == ["b"]
    row = errors.loc["b"]
    assert row["column"] == "words"
    assert row["type"] == "ValueError" and row["message"] == "empty text"
    assert "raise ValueError" in row["traceback"]
    assert row["attempts"] == 2
    assert isinstance(row["exception"], ValueError)


def test_errors_of_a_frame_without_failures_is_empty():
    out = pd.DataFrame({"x": [1]}).modal.map(double_plus_one, column="x", backend="sequential", progress=False)
    errors = out.modal.errors()
    assert len(errors) == 0
    assert "type" in errors.columns


def test_expand_turns_dicts_into_columns(backend):
    df = pd.DataFrame({"text": ["ab", "cde"]})
    out = df.modal.map(scores, column="text", backend=backend, expand=True, progress=False)
    assert out.columns.tolist() == ["text", "length", "upper", "scores_error"]
    assert out["length"].tolist() == [2, 3]
    assert out["upper"].tolist() == ["AB", "CDE"]


def test_expand_reports_non_dict_rows_as_errors():
    df = pd.DataFrame({"x": [1, 2]})
    out = df.modal.map(lambda x: {"a": x} if x == 1 else x, column="x", into="r", expand=True,
                       backend="sequential", progress=False)
    assert out["a"].tolist() == [1, pd.NA]
    assert out["r_error"].tolist()[1] == "TypeError: expand=True needs each row to return a dict, got int"


def test_into_clash_needs_overwrite():
    df = pd.DataFrame({"x": [1, 2], "y": [0, 0]})
    with pytest.raises(OptionsError, match="already has a column 'y'; pass overwrite=True"):
        df.modal.map(double_plus_one, column="x", into="y", backend="sequential")
    out = df.modal.map(double_plus_one, column="x", into="y", overwrite=True, backend="sequential", progress=False)
    assert out.columns.tolist() == ["x", "y", "y_error"]
    assert out["y"].tolist() == [3, 5]


def test_sample_runs_the_first_rows_only(backend):
    df = pd.DataFrame({"x": range(100)})
    out = df.modal.map(double_plus_one, column="x", sample=5, backend=backend, progress=False)
    assert out["double_plus_one"].tolist() == [1, 3, 5, 7, 9]
    assert out.index.tolist() == [0, 1, 2, 3, 4]


def test_on_error_raise_names_the_row(backend):
    df = pd.DataFrame({"x": [5, 2, 0, 1]}, index=["a", "b", "zero", "d"])
    with pytest.raises(RowFailed, match=r"row 'zero' \(position 2\) failed: ZeroDivisionError") as info:
        df.modal.map(inverse, column="x", on_error="raise", backend=backend, progress=False)
    assert info.value.label == "zero"
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("backend_name", ["local", "threads", "sequential"])
def test_async_functions_run_on_an_event_loop(backend_name):
    df = pd.DataFrame({"x": range(6)})
    out = df.modal.map(async_double, column="x", backend=backend_name, max_containers=4, progress=False)
    assert out["async_double"].tolist() == [0, 2, 4, pd.NA, 8, 10]
    assert out["async_double_error"].tolist()[3] == "KeyError: 'three'"


def test_async_concurrency_reaches_max_containers():
    running = {"now": 0, "peak": 0}

    async def track(x):
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await asyncio.sleep(0.02)
        running["now"] -= 1
        return x

    out = pd.DataFrame({"x": range(60)}).modal.map(track, column="x", max_containers=20, progress=False)
    assert out["track"].tolist() == list(range(60))
    assert running["peak"] == 20


def test_lambdas_and_closures_reach_worker_processes():
    offset = 100
    out = pd.DataFrame({"x": [1, 2]}).modal.map(lambda x: x + offset, column="x", backend="local", progress=False)
    assert out["result"].tolist() == [101, 102]


def test_fixed_batch_size_gives_same_result(backend):
    df = pd.DataFrame({"x": range(103)})
    out = df.modal.map(inverse, column="x", batch_size=7, backend=backend, progress=False)
    assert out["inverse"].tolist()[1:] == [10 // x for x in range(1, 103)]
    assert out["inverse_error"].notna().sum() == 1


def test_batch_sizer_grows_toward_the_target_and_balances_the_tail():
    sizer = BatchSizer(workers=2, fixed=None)
    assert sizer.next_size(200_000) == 1  # nothing measured yet
    sizer.observe(1, 1e-6)
    assert sizer.next_size(200_000) == 8  # grows at most 8x per measurement
    for rows in (8, 64, 512, 4096, 32768):
        sizer.observe(rows, rows * 1e-6)
    assert sizer.next_size(200_000) == 50_000  # capped so each worker gets at least two batches
    assert sizer.next_size(100) == 100  # 0.1 ms of work: one batch, not four round trips to balance it
    tail = BatchSizer(workers=2, fixed=None)
    for rows in (1, 8, 50):
        tail.observe(rows, rows * 1e-3)
    assert tail.next_size(100) == 25  # 100 ms of work left: four batches, so both workers finish together
    assert tail.next_size(20) == 6  # but none under an eighth of the target's work
    slow = BatchSizer(workers=2, fixed=None)
    slow.observe(1, 0.005)
    assert slow.next_size(2000) == 8
    slow.observe(8, 0.04)
    assert slow.next_size(2000) == 10  # 50 ms of 5 ms rows
    assert BatchSizer(workers=2, fixed=3).next_size(10) == 3


def test_last_run_summarises():
    pd.DataFrame({"x": [1, 0, 0]}).modal.map(inverse, column="x", backend="sequential", progress=False)
    summary = modal_magic.last_run()
    assert (summary.total, summary.succeeded, summary.failed) == (3, 1, 2)
    assert summary.errors_by_type == {"ZeroDivisionError": 2}


def _flaky_factory(fail_positions):
    fails = frozenset(fail_positions)

    def fn(x):
        if x in fails:
            raise RuntimeError(f"row {x}")
        return x * 3

    return fn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n=st.integers(min_value=0, max_value=40),
    backend_name=st.sampled_from(["local", "threads"]),
)
def test_every_row_gets_exactly_one_of_result_or_error(data, n, backend_name):
    fail = data.draw(st.sets(st.integers(min_value=0, max_value=max(n - 1, 0)), max_size=n))
    labels = data.draw(st.lists(st.sampled_from(["a", "b", "c", 1, 2]), min_size=n, max_size=n))
    df = pd.DataFrame({"x": range(n)}, index=pd.Index(labels, dtype=object))
    fn = _flaky_factory(fail)
    batch_size = data.draw(st.none() | st.integers(min_value=1, max_value=9))
    out = df.modal.map(fn, column="x", into="y", backend=backend_name, batch_size=batch_size, progress=False)
    reference = df.modal.map(fn, column="x", into="y", backend="sequential", progress=False)
    pd.testing.assert_frame_equal(out, reference)
    has_result = out["y"].notna()
    has_error = out["y_error"].notna()
    assert (has_result ^ has_error).all()
    assert set(np.flatnonzero(has_error.to_numpy())) == {x for x in fail if x < n}


def test_cheap_rows_finish_in_this_process_unless_batch_size_is_fixed():
    import os as _os

    df = pd.DataFrame({"x": range(50_000)})
    here = _os.getpid()
    where = lambda x: _os.getpid()  # noqa: E731  (cheap: well under 2 us a row)
    pids = df.modal.map(where, column="x", backend="local", progress=False, cache=False)["result"]
    assert pids.iloc[0] != here, "the first rows are measured in a worker"
    assert pids.iloc[-1] == here, "the rest, too cheap to ship, ran here"
    fixed = df.modal.map(where, column="x", backend="local", batch_size=5000, progress=False, cache=False)
    assert (fixed["result"] != here).all(), "a fixed batch_size keeps every row in the workers"


def test_threads_past_the_cap_are_capped_with_one_clear_warning():
    from modal_magic.options import MAX_THREADS

    df = pd.DataFrame({"x": range(3)})
    with pytest.warns(RuntimeWarning, match=rf"max_containers=100000 asks for more threads than this machine can use: "
                                            rf"using {MAX_THREADS} \({MAX_THREADS} at most; an async def function"):
        out = df.modal.map(double_plus_one, column="x", backend="threads", max_containers=100_000, progress=False,
                           cache=False)
    assert out["double_plus_one"].tolist() == [1, 3, 5]
