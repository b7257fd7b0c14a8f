"""Reattaching to a Modal run from a new kernel, against the local Modal test server.

A "kernel" here is a fresh Python process running a Modal map; it is SIGKILLed halfway, as a
crashed kernel dies: no exit hook runs, its detached app and spawned calls are left on the server.
The same map then runs again in another process (a subprocess, or this test process). What it must
not do is pay for a row twice: each row appends its value to a log file as it runs (the test
server's containers are local processes), and the server's ``executions`` counter counts the
batches containers were handed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import modal_magic
from modal_magic.cache.calls import CallRecords

ROWS = 20
BATCH = 2
SCRIPT = """
import json, sys
sys.path.insert(0, {directory!r})
import pandas as pd, modal_magic
from reattach_rows import slow
out = pd.DataFrame({{"x": range({rows})}}).modal.map(slow, column="x", backend="modal", batch_size={batch},
                                                  max_containers=2, progress=False)
print(json.dumps({{"values": out["slow"].tolist(), "logs": modal_magic.last_run().logs}}))
"""

pytestmark = pytest.mark.timeout(180)  # a reattach that waits on a call that never ends must fail, not hang


@pytest.fixture
def rows_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module with the row function, importable by every process; each run of a row is logged."""
    log = tmp_path / "ran.txt"
    (tmp_path / "reattach_rows.py").write_text(
        "import time\n"
        "def slow(x):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(f'{x}\\n')\n"
        "    time.sleep(0.4)\n"
        "    return x * 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "reattach_rows", raising=False)  # an earlier test's, with its own log
    return tmp_path


def ran(directory: Path) -> Counter:
    path = directory / "ran.txt"
    return Counter(int(line) for line in path.read_text().split()) if path.exists() else Counter()


def start_kernel(directory: Path) -> subprocess.Popen:
    script = SCRIPT.format(directory=str(directory), rows=ROWS, batch=BATCH)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_halfway(modal_server, directory: Path) -> dict:
    """Start a kernel, SIGKILL it once some batches are back and others still run; what it left behind."""
    kernel = start_kernel(directory)
    deadline = time.monotonic() + 90
    while modal_server.outputs_sent < 3 and time.monotonic() < deadline and kernel.poll() is None:
        time.sleep(0.02)
    assert kernel.poll() is None, kernel.communicate()[1][-3000:]
    # Mid-batch, not in the instant a batch is spawned on an output's heels (rows take 0.4 s): a call
    # killed between its spawn and its record is the one thing a new kernel can't find.
    time.sleep(0.2)
    kernel.send_signal(signal.SIGKILL)
    kernel.wait(timeout=30)
    spawned = len(modal_server.function_calls)
    records = CallRecords(os.environ["MODAL_MAGIC_CACHE_DIR"]).all()
    assert records, "the dead kernel left recorded calls"
    assert 0 < spawned < ROWS // BATCH, "killed halfway: some batches never spawned"
    return {"executions": modal_server.executions, "spawned": spawned, "records": records,
            "app_id": modal_server.apps[0]["app_id"]}


def wait_until(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_killed_kernels_run_is_finished_by_the_next_without_paying_a_row_twice(modal_server, rows_module):
    left = kill_halfway(modal_server, rows_module)
    second = start_kernel(rows_module)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["values"] == [x * 10 for x in range(ROWS)]
    assert any(line.startswith(f"reattached to {len(left['records'])} Modal calls") for line in report["logs"]), report["logs"]
    # Only the batches the first kernel never spawned ran again (plus at most one spawned in the
    # instant before its record was written).
    never_spawned = ROWS // BATCH - left["spawned"]
    assert modal_server.executions - left["executions"] <= never_spawned + 1
    twice = [x for x, n in ran(rows_module).items() if n > 1]
    assert len(twice) <= BATCH, f"rows that ran twice: {twice}"
    assert set(ran(rows_module)) == set(range(ROWS))
    assert CallRecords(os.environ["MODAL_MAGIC_CACHE_DIR"]).all() == [], "every record was collected and deleted"
    # The dead kernel's detached app is stopped once nothing is left on it; the second kernel's app
    # stopped when that kernel exited.
    assert wait_until(lambda: all(app["stopped"] for app in modal_server.apps)), modal_server.apps
    assert wait_until(lambda: modal_server.live_worker_pids() == [])


def test_expired_results_are_run_again_and_said_so(modal_server, rows_module):
    from reattach_rows import slow

    left = kill_halfway(modal_server, rows_module)
    assert wait_until(lambda: all(c.num_unfinished == 0 for c in modal_server._calls.values()), 30)
    expired = modal_server.expire_outputs()
    recorded = {r.call_id for r in left["records"]}
    assert recorded <= set(expired) or recorded & set(expired)
    executions = modal_server.executions
    out = pd.DataFrame({"x": range(ROWS)}).modal.map(slow, column="x", backend="modal", batch_size=BATCH,
                                                     max_containers=2, progress=False)
    assert out["slow"].tolist() == [x * 10 for x in range(ROWS)]
    assert out["slow_error"].isna().all()
    n = len(left["records"])
    assert f"results of {n} batches had expired on Modal; running those rows again" in modal_magic.last_run().logs
    # The expired batches ran again, and the ones never spawned; nothing the cache already had.
    assert modal_server.executions - executions <= n + ROWS // BATCH - left["spawned"] + 1
    assert modal_server.apps[0]["stopped"], "the dead kernel's app was stopped"
    assert f"stopped Modal app {left['app_id']}: the kernel that ran it is gone and nothing is left on it" in \
        modal_magic.last_run().logs


def test_jobs_lists_a_dead_kernels_run_and_attach_collects_it_into_the_cache(modal_server, rows_module):
    from reattach_rows import slow

    left = kill_halfway(modal_server, rows_module)
    (job,) = [j for j in modal_magic.jobs() if isinstance(j, modal_magic.backends.modal.reattach.RecordedJob)]
    assert job.function == "slow" and job.app_ids == (left["app_id"],)
    assert job.rows_pending == BATCH * len(left["records"]) and job.calls == len(left["records"])
    assert job.age_s >= 0 and f"modal_magic.attach({job.id!r})" in repr(job)
    attached = modal_magic.attach(job.id)
    frame = attached.result(timeout=60)
    assert list(frame.columns) == ["key", "result", "error"]
    assert len(frame) == job.rows_pending and frame["error"].isna().all()
    assert set(frame["result"]) <= {x * 10 for x in range(ROWS)} and frame["result"].is_unique
    assert attached.done() and attached.summary.succeeded == len(frame)
    assert [j for j in modal_magic.jobs() if not isinstance(j, modal_magic.MapJob)] == []
    assert wait_until(lambda: modal_server.apps[0]["stopped"]), "attach stopped the dead kernel's app"
    # Running the cell again: the attached rows come from the cache, only the rest run.
    executions = modal_server.executions
    out = pd.DataFrame({"x": range(ROWS)}).modal.map(slow, column="x", backend="modal", batch_size=BATCH,
                                                     max_containers=2, progress=False)
    assert out["slow"].tolist() == [x * 10 for x in range(ROWS)]
    assert modal_magic.last_run().cached >= len(frame)
    assert modal_server.executions - executions <= ROWS // BATCH - left["spawned"] + 1
    with pytest.raises(KeyError, match="no background job 'nope'"):
        modal_magic.attach("nope")


def test_without_the_cache_nothing_is_recorded(modal_server, rows_module):
    from reattach_rows import slow

    out = pd.DataFrame({"x": range(4)}).modal.map(slow, column="x", backend="modal", cache=False, progress=False)
    assert out["slow"].tolist() == [0, 10, 20, 30]
    assert CallRecords(os.environ["MODAL_MAGIC_CACHE_DIR"]).all() == []


def test_a_kernel_that_exits_with_a_background_run_out_leaves_it_to_the_next(modal_server, rows_module):
    """A normal exit (a kernel restart) stops idle apps, but not one whose background run is still out."""
    from reattach_rows import slow

    script = ("import sys, time\n"
              f"sys.path.insert(0, {str(rows_module)!r})\n"
              "import pandas as pd, modal_magic\n"
              "from reattach_rows import slow\n"
              f"job = pd.DataFrame({{'x': range({ROWS})}}).modal.map(slow, column='x', backend='modal', "
              f"batch_size={BATCH}, max_containers=2, progress=False, wait=False)\n"
              "while job.summary.succeeded < 4:\n"
              "    time.sleep(0.05)\n"
              "time.sleep(0.2)\n"
              "print(job.summary.succeeded)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = CallRecords(os.environ["MODAL_MAGIC_CACHE_DIR"]).all()
    assert recorded, "the exiting kernel's calls are still recorded"
    # Its calls ran to the end (none was cancelled); then the detached app, with nothing left, stopped.
    assert wait_until(lambda: all(c.num_unfinished == 0 for c in modal_server._calls.values()))
    statuses = {o.result.status for c in modal_server._calls.values() for o in c.latest.values()}
    assert statuses == {1}, statuses  # GENERIC_STATUS_SUCCESS
    spawned, executions = len(modal_server.function_calls), modal_server.executions
    out = pd.DataFrame({"x": range(ROWS)}).modal.map(slow, column="x", backend="modal", batch_size=BATCH,
                                                     max_containers=2, progress=False)
    assert out["slow"].tolist() == [x * 10 for x in range(ROWS)]
    assert modal_server.executions - executions <= ROWS // BATCH - spawned + 1
    assert wait_until(lambda: modal_server.apps[0]["stopped"])


def test_a_record_whose_rows_are_already_cached_is_forgotten(modal_server, rows_module):
    """A kernel killed between caching a call's rows and deleting its record leaves a record of
    nothing to collect: the next run of those rows drops it instead of listing it forever."""
    from reattach_rows import slow

    from modal_magic.backends.modal.reattach import job_key
    from modal_magic.cache.keys import RowKeyHasher
    from modal_magic.cache.rows import result_options
    from modal_magic.fingerprint import function_fingerprint
    from modal_magic.options import MapOptions

    run = dict(column="x", backend="modal", batch_size=BATCH, max_containers=2, progress=False)
    pd.DataFrame({"x": range(4)}).modal.map(slow, **run)
    fingerprint = function_fingerprint(slow, star=False, result_options=result_options(MapOptions.create(**{
        k: v for k, v in run.items() if k != "column"})))
    records = CallRecords(os.environ["MODAL_MAGIC_CACHE_DIR"])
    records.spawned("fc-gone", job=job_key(fingerprint), run="dead-1", app_id="ap-gone", function="slow",
                    keys=RowKeyHasher(fingerprint).keys([0, 1], star=False), owner="elsewhere:1")
    assert [j.id for j in modal_magic.jobs()] == ["dead-1"]
    out = pd.DataFrame({"x": range(5)}).modal.map(slow, **run)
    assert out["slow"].tolist() == [0, 10, 20, 30, 40] and modal_magic.last_run().cached == 4
    assert records.all() == [] and modal_magic.jobs() == []
