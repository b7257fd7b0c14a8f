"""The bar, the summary line, ``last_run()`` and ``errors()`` tell the same story on every path.

A seeded random generator builds runs that mix rows that succeed, fail, come from the cache,
succeed on a retry, press Stop (a real SIGINT to this process) or fail under ``on_error="raise"``,
and runs each on every backend (Modal against the local test server). What is compared is what a
user reads: the text bar's last counts line and the summary line (parsed from stderr), the
``RunSummary`` that ``modal_magic.last_run()`` returns, and ``errors()`` of the frame the run gave
back (the returned frame, the one a Stop carries, or ``modal_magic.last_result()`` after a raise).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import modal_magic
from modal_magic import MapInterrupted
from modal_magic.errors import RowFailed

pytestmark = pytest.mark.timeout(240)

KINDS = ("ok", "fail", "flaky", "cached")


def row(value: str) -> int:
    """One row of a generated run; ``value`` is ``"kind|index|pid|folder"``."""
    kind, index, pid, folder = value.split("|")
    time.sleep(0.002)  # slow enough for the cache to keep the row
    if kind == "fail":
        raise ValueError(f"row {index} fails")
    if kind == "flaky":  # fails on its first try only (the marker file survives the worker)
        marker = Path(folder) / f"tried-{index}"
        if not marker.exists():
            marker.touch()
            raise ConnectionError(f"row {index}: first try fails")
    if kind == "stop":
        os.kill(int(pid), signal.SIGINT)
        time.sleep(5)  # Stop reaches the run while this row still runs
    return int(index)


def _plan(rng: random.Random, stop: bool) -> list[str]:
    kinds = [rng.choice(KINDS) for _ in range(rng.randint(1, 30))]
    if stop:
        kinds[rng.randrange(len(kinds))] = "stop"
    return kinds


_COUNTS = re.compile(r"(?P<n>[\d,]+)/(?P<total>[\d,]+) rows \| (?P<done>[\d,]+) done, (?P<failed>[\d,]+) failed, "
                     r"(?P<cached>[\d,]+) cached")
_SUMMARY = re.compile(r"^(?P<verdict>Done|Done with failures|Aborted): (?P<total>[\d,]+) rows in \S+ \((?P<rate>[^)]*)\) "
                      r"\| (?P<succeeded>[\d,]+) succeeded, (?P<failed>[\d,]+) failed(?: \([^)]*\))?"
                      r"(?:, (?P<cancelled>[\d,]+) cancelled)?, (?P<cached>[\d,]+) cached", re.M)


def _number(text: str | None) -> int:
    return int(text.replace(",", "")) if text else 0


def _run_case(seed: int, backend: str, tmp_path: Path, capfd) -> None:
    rng = random.Random(seed)
    stop = backend != "modal" and rng.random() < 0.25  # a SIGINT can't come from Modal's containers
    raising = not stop and rng.random() < 0.25
    kinds = _plan(rng, stop)
    folder = tmp_path / f"case-{seed}"
    folder.mkdir()
    values = [f"{kind}|{i}|{os.getpid()}|{folder}" for i, kind in enumerate(kinds)]
    options = dict(backend=backend, retries=1, progress=True, max_containers=2)
    cached = [v for v, kind in zip(values, kinds) if kind == "cached"]
    if cached:  # run those rows once, so that the run below finds them in the cache
        pd.DataFrame({"v": cached}).modal.map(row, column="v", **{**options, "progress": False})
    capfd.readouterr()

    df = pd.DataFrame({"v": values})
    try:
        out = df.modal.map(row, column="v", **options, on_error="raise" if raising else "capture")
        ended = "finished"
    except MapInterrupted as stopped:
        out, ended = stopped.result, "stopped"
    except RowFailed:
        out, ended = modal_magic.last_result(), "raised"
    text = capfd.readouterr().err
    run = modal_magic.last_run()
    case = f"seed={seed} backend={backend} kinds={kinds} ended={ended}\n{text}"

    # Every row is counted once, and the summary line says what last_run() holds.
    assert run.total == len(kinds), case
    assert run.succeeded + run.failed + run.cached + run.cancelled == run.total, case
    [summary] = list(_SUMMARY.finditer(text)) or [None]
    assert summary is not None, case
    assert [_number(summary[k]) for k in ("total", "succeeded", "failed", "cancelled", "cached")] == [
        run.total, run.succeeded, run.failed, run.cancelled, run.cached], case
    assert (summary["verdict"] == "Aborted") == (ended != "finished"), case
    # rows/s counts the rows that ran, never the cached ones.
    assert (summary["rate"].endswith("rows/s")) == (run.succeeded + run.failed > 0), case

    # The bar's last line has the same counts (a run served from the cache alone shows a bar too).
    bar = list(_COUNTS.finditer(text))[-1]
    assert [_number(bar[k]) for k in ("done", "failed", "cached", "total")] == [
        run.succeeded, run.failed, run.cached, run.total], case
    assert _number(bar["n"]) == run.total - run.cancelled, case

    # errors() lists every failed and every cancelled row; the frame has every row.
    errors = out.modal.errors()
    assert len(out) == len(kinds) and len(errors) == run.failed + run.cancelled, case
    assert (errors["type"] == "Cancelled").sum() == run.cancelled, case
    assert sum(run.errors_by_type.values()) == run.failed, case
    assert out["row"].notna().sum() == run.succeeded + run.cached, case

    if ended == "finished":  # then the counts are known from the plan
        assert run.failed == kinds.count("fail") and run.cancelled == 0, case
        assert run.cached == kinds.count("cached"), case
        assert run.errors_by_type == ({"ValueError": run.failed} if run.failed else {}), case
    if ended == "raised":
        assert run.failed >= 1 and "ValueError" in run.errors_by_type, case
        assert "modal_magic.last_result().modal.errors()" in text, "the result was bound to no name"


@pytest.mark.parametrize("backend", ["sequential", "threads", "local"])
def test_counts_agree_on_random_runs(backend, tmp_path, capfd, sigint_raises):
    for seed in range(12):
        _run_case(seed, backend, tmp_path, capfd)


def test_counts_agree_on_random_runs_on_modal(modal_server, tmp_path, capfd):
    for seed in range(3):
        _run_case(100 + seed, "modal", tmp_path, capfd)


def test_cheap_rows_finished_in_the_kernel_are_counted_once(capfd):
    """Rows too cheap to ship run in the kernel's process; the batch measured before is not counted again."""
    df = pd.DataFrame({"x": range(3000)})
    df.modal.map(abs, column="x", backend="local", progress=True)
    text = capfd.readouterr().err
    assert "3,000/3,000 rows | 3,000 done, 0 failed, 0 cached" in text, text
    # nothing past 3,000 in any count the bar or the summary shows (rates are not counts: "363,005 rows/s")
    counts = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+)(?:/3,000 rows| done| rows in| succeeded)", text)]
    assert counts and max(counts) == 3000, text


def test_expand_counts_a_non_dict_row_as_failed_in_the_bar_too(capfd):
    df = pd.DataFrame({"x": [1, 2, 3]})
    out = df.modal.map(lambda x: {"a": x} if x != 2 else x, column="x", into="r", expand=True,
                       backend="sequential", progress=True)
    text = capfd.readouterr().err
    assert "3/3 rows | 2 done, 1 failed, 0 cached" in text, text
    assert "2 succeeded, 1 failed (1 TypeError)" in text, text
    assert modal_magic.last_run().failed == len(out.modal.errors()) == 1
