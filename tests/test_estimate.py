"""``df.modal.estimate``: a sample spread over the frame, its per-row time, projected time and dollars."""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest
from IPython.core.error import UsageError

import modal_magic
from modal_magic import OptionsError, costs
from modal_magic.estimate import CONTAINER_START_S, Estimate, spread_positions


@pytest.fixture
def ip(loaded_shell):
    return loaded_shell


@pytest.fixture
def round_rates(monkeypatch):
    """One CPU core costs $0.001 a second and memory nothing: dollars are container-seconds / 1000."""
    monkeypatch.setitem(costs.MODAL_RATES, "cpu_core", 0.001)
    monkeypatch.setitem(costs.MODAL_RATES, "memory_gib", 0.0)


def seen(x):
    time.sleep(0.001)  # rows under a few microseconds aren't cached at all
    if x % 25 == 0:
        raise ValueError(f"bad {x}")
    return x * 10


def test_sample_is_spread_over_the_whole_frame():
    df = pd.DataFrame({"x": range(1000)})
    est = df.modal.estimate(seen, column="x", sample=10, backend="sequential", progress=False)
    assert isinstance(est, Estimate)
    ran = est.result["x"].tolist()
    assert ran[0] == 0 and ran[-1] == 999 and len(ran) == 10
    assert max(ran) - min(ran) == 999  # not just the head
    assert est.rows == 1000 and est.sampled == 10 and est.timed == 10
    assert est.result.columns.tolist() == ["x", "seen", "seen_error", "seen_seconds"]


def test_repr_shows_time_values_and_errors_but_no_dollars_locally():
    df = pd.DataFrame({"x": range(1, 501)})
    est = df.modal.estimate(seen, column="x", sample=50, backend="threads", max_containers=4, progress=False)
    text = repr(est)
    assert text.startswith("Estimate for 500 rows on backend='threads', from a sample of 50")
    assert "per row: median" in text and "p10–p90" in text
    assert "at 4 rows at once" in text
    assert "sample returned: 10, 110, 210" in text
    # rows 25, 50, ... fail: those among the 50 spread positions
    failures = int(est.result["seen_error"].notna().sum())
    assert failures > 0
    assert f"errors: {failures} of 50 (ValueError ×{failures})" in text
    assert "cost" not in text and "$" not in text
    assert est.usd is None


def test_projection_scales_the_mean_row_time_to_the_frame():
    df = pd.DataFrame({"x": [0.02] * 400})
    est = df.modal.estimate(time.sleep, column="x", into="slept", sample=8, backend="threads",
                            max_containers=4, progress=False)
    low, likely, high = est.wall_s
    assert likely == pytest.approx(400 * est.mean_s / 4)
    assert low <= likely <= high
    assert est.median_s >= 0.02


def test_sample_results_are_cached_for_the_real_run():
    df = pd.DataFrame({"x": range(1, 101)})
    df.modal.estimate(seen, column="x", sample=10, backend="threads", progress=False)
    assert modal_magic.last_run().total == 10
    out = df.modal.map(seen, column="x", backend="threads", progress=False)
    assert out["seen"].iloc[:3].tolist() == [10, 20, 30]
    # the sample's successes were not run again (its failures, never cached, were)
    sample = df.iloc[[int(p) for p in spread_positions(100, 10)]]["x"]
    assert modal_magic.last_run().cached == int((sample % 25 != 0).sum()) > 0


def test_an_estimate_again_says_the_cached_sample_was_not_timed():
    df = pd.DataFrame({"x": range(100)})
    df.modal.estimate(seen, column="x", sample=20, backend="threads", progress=False)
    est = df.modal.estimate(seen, column="x", sample=20, backend="threads", progress=False)
    # only the failed rows (not cached) ran again
    assert est.timed == int(est.result["seen_error"].notna().sum())
    assert "came from the cache, untimed" in repr(est)
    assert "pass cache='refresh'" in repr(est)
    fresh = df.modal.estimate(seen, column="x", sample=20, backend="threads", progress=False, cache="refresh")
    assert fresh.timed == 20


def test_starmap_and_series_estimates():
    df = pd.DataFrame({"a": range(30), "b": range(30)})
    est = df.modal.estimate(lambda a, b: a + b, columns=["a", "b"], into="total", sample=3, backend="threads",
                            progress=False)
    assert est.values == (0, 28, 58)  # positions 0, 14, 29
    est = pd.Series(range(30), name="x").modal.estimate(str, sample=3, backend="threads", progress=False)
    assert est.values == ("0", "14", "29")


def test_mistakes_are_refused_before_any_row_runs():
    df = pd.DataFrame({"x": [1]})
    with pytest.raises(OptionsError, match="sample=0 is not valid"):
        df.modal.estimate(seen, column="x", sample=0)
    with pytest.raises(TypeError, match="needs column="):
        df.modal.estimate(seen)
    with pytest.raises(KeyError, match="column 'y' not found"):
        df.modal.estimate(seen, column="y")
    with pytest.raises(OptionsError, match="an estimate times each row where it runs, which the deployed function"):
        df.modal.estimate(None, column="x", backend="modal:app/fn")
    with pytest.raises(OptionsError, match="unknown option 'max_container'"):
        df.modal.estimate(seen, column="x", max_container=2)


def test_spread_positions_are_unique_and_sorted():
    positions = spread_positions(7, 5).tolist()
    assert positions == sorted(set(positions)) and positions[0] == 0 and positions[-1] == 6


def test_modal_estimate_projects_dollars_from_the_measured_seconds(modal_server, round_rates):
    df = pd.DataFrame({"x": [0.05] * 1000})
    est = df.modal.estimate(time.sleep, column="x", into="slept", sample=6, backend="modal", cpu=1.0,
                            max_containers=5, progress=False)
    seconds = est.result["slept_seconds"]
    assert seconds.notna().all() and (seconds >= 0.05).all()
    mean = seconds.mean()
    container_s = 1000 * mean + 5 * (CONTAINER_START_S + 300)  # each container's start, and keep_warm's idle
    assert est.container_seconds[1] == pytest.approx(container_s)
    assert est.usd[1] == pytest.approx(container_s * 0.001)
    assert est.usd[0] <= est.usd[1] <= est.usd[2]
    text = repr(est)
    assert "cost (estimate): ≈ $" in text
    assert f"1 CPU + 0.125 GiB; Modal's list prices as of {costs.AS_OF}" in text
    assert "at 5 containers" in text
    assert "≈2 s start and 300 s idle before scale-down (keep_warm)" in text


def test_gpu_fallbacks_are_priced_at_most(modal_server):
    df = pd.DataFrame({"x": range(20)})
    est = df.modal.estimate(seen, column="x", sample=2, backend="modal", gpu=["H100", "T4"], progress=False)
    assert est.rate is not None and est.rate.at_most
    assert "≈ at most $" in repr(est)


def test_magic_estimate_shows_the_projection_and_leaves_the_frame(ip):
    ip.user_ns["df"] = pd.DataFrame({"x": range(100)})
    est = ip.run_cell_magic("modal_map", "df.x --estimate --sample 5 --backend threads --no-progress",
                            "def twice(x):\n    return 2 * x\n")
    assert isinstance(est, Estimate) and est.sampled == 5 and est.values == (0, 50, 100)
    assert ip.user_ns["df"].columns.tolist() == ["x"]
    ip.run_cell_magic("modal_map", "df.x --estimate --backend threads --no-progress -o est", "def twice(x):\n"
                      "    return 2 * x\n")
    assert ip.user_ns["est"].sampled == 100
    with pytest.raises(UsageError, match="--estimate and --retry-failed"):
        ip.run_cell_magic("modal_map", "df.x --estimate --retry-failed", "def twice(x):\n    return 2 * x\n")


def test_empty_frame_estimates_nothing():
    est = pd.DataFrame({"x": []}).modal.estimate(seen, column="x", backend="threads", progress=False)
    assert est.rows == 0 and est.sampled == 0 and math.isnan(est.median_s)
    assert "not measured" in repr(est)


def test_expanded_results_are_shown_as_the_rows_dicts():
    est = pd.DataFrame({"x": range(10)}).modal.estimate(lambda v: {"a": v, "b": -v}, column="x", into="r", sample=2,
                                                       backend="threads", expand=True, progress=False)
    assert est.values == ({"a": 0, "b": 0}, {"a": 9, "b": -9})
    assert "sample returned: {'a': 0, 'b': 0}, {'a': 9, 'b': -9}" in repr(est)


def test_microsecond_rows_read_in_microseconds():
    est = pd.DataFrame({"x": range(10)}).modal.estimate(abs, column="x", sample=5, backend="sequential",
                                                       progress=False)
    assert " µs" in repr(est).splitlines()[1]
