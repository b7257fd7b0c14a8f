"""Background runs: ``wait=False`` / ``%%modal_map --background`` return a MapJob, on every backend.

What a user sees: the frame ``job.result()`` returns (the same as a foreground run's), ``done()``,
``state``, ``summary``, a cancelled job's kept rows, mistakes raised by the call itself, the
``--background`` magic filling its columns in place, and, in a real kernel (nbclient), a bar that
keeps updating in its own cell while the next cell runs and finishes first.
"""

from __future__ import annotations

import atexit
import threading
import time

import nbformat
import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import modal_magic
from modal_magic import MapInterrupted, MapJob
from tests.notebook_runner import execute_notebook


def tenfold(x):
    if x == 3:
        raise ValueError("three")
    return x * 10


def test_a_background_map_returns_the_same_frame_as_a_foreground_one(backend):
    df = pd.DataFrame({"x": [1, 2, 3, 4]}, index=list("abcd"))
    job = df.modal.map(tenfold, column="x", into="y", backend=backend, progress=False, wait=False)
    assert isinstance(job, MapJob)
    out = job.result(timeout=120)
    expected = df.modal.map(tenfold, column="x", into="y", backend=backend, progress=False, cache=False)
    pd.testing.assert_frame_equal(out, expected)
    assert out["y_error"].tolist() == [None, None, "ValueError: three", None]
    assert job.done() and job.state == "finished"
    assert (job.summary.total, job.summary.failed) == (4, 1)
    assert job not in modal_magic.jobs()
    assert modal_magic.attach(job.id) is job


def test_the_call_returns_while_the_rows_still_run_and_jobs_lists_it():
    gate = threading.Event()

    def held(x):
        gate.wait(30)
        return x + 1

    df = pd.DataFrame({"x": range(6)})
    started = time.monotonic()
    job = df.modal.map(held, column="x", backend="threads", progress=False, wait=False, cache=False)
    assert time.monotonic() - started < 5
    assert not job.done() and job.state == "running"
    assert job in modal_magic.jobs()
    assert "running, 0/6 rows" in repr(job)
    with pytest.raises(TimeoutError, match="still running after 0.1s"):
        job.result(timeout=0.1)
    gate.set()
    assert job.result(timeout=30)["held"].tolist() == [1, 2, 3, 4, 5, 6]
    assert job not in modal_magic.jobs()


def test_cancel_stops_the_run_and_keeps_the_finished_rows():
    def slow(x):
        time.sleep(0.05 if x < 3 else 5)
        return x

    df = pd.DataFrame({"x": range(12)})
    job = df.modal.map(slow, column="x", backend="threads", max_containers=1, progress=False, wait=False,
                       cache=False)
    deadline = time.monotonic() + 20
    while job.summary.succeeded < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    job.cancel()
    with pytest.raises(MapInterrupted) as stopped:
        job.result(timeout=30)
    out = stopped.value.result
    assert out["slow"].iloc[:3].tolist() == [0, 1, 2]
    assert out["slow_error"].iloc[3:].str.startswith("Cancelled").all()
    assert job.state == "cancelled" and job.summary.succeeded == 3


def test_mistakes_are_raised_by_the_call_not_later():
    df = pd.DataFrame({"x": [1]})
    with pytest.raises(KeyError, match="column 'nope' not found; the DataFrame has: 'x'"):
        df.modal.map(tenfold, column="nope", wait=False)
    with pytest.raises(modal_magic.FunctionError, match="can't take 1 positional argument"):
        df.modal.map(lambda a, b: a, column="x", wait=False)
    with pytest.raises(modal_magic.OptionsError, match="wait='no' is not valid: expected True or False"):
        df.modal.map(tenfold, column="x", wait="no")
    assert not [j for j in modal_magic.jobs() if j.title in ("tenfold", "<lambda>")]


def test_attach_names_the_jobs_it_knows():
    with pytest.raises(KeyError, match="no background job 'nope' in this kernel"):
        modal_magic.attach("nope")


def test_starmap_series_map_and_on_error_raise_in_the_background():
    df = pd.DataFrame({"a": [1, 2], "b": [10, 20]})
    assert df.modal.starmap(lambda a, b: a + b, columns=["a", "b"], into="t", backend="threads",
                            progress=False, wait=False).result()["t"].tolist() == [11, 22]
    assert df["a"].modal.map(lambda v: -v, into="n", backend="threads", progress=False,
                             wait=False).result()["n"].tolist() == [-1, -2]
    job = pd.DataFrame({"x": [1, 3]}).modal.map(tenfold, column="x", backend="sequential", progress=False,
                                                on_error="raise", wait=False)
    with pytest.raises(modal_magic.RowFailed):
        job.result(timeout=30)
    assert job.state == "failed"


@pytest.fixture
def shell():
    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    ip.config.ModalMagic.backend = "threads"
    ip.config.ModalMagic.progress = False
    ip.run_line_magic("load_ext", "modal_magic")
    yield ip
    atexit.unregister(ip.atexit_operations)
    InteractiveShell.clear_instance()


def test_background_magic_fills_the_columns_in_place_when_the_job_ends(shell):
    shell.user_ns["df"] = pd.DataFrame({"x": [1, 2, 3]})
    job = shell.run_cell_magic("modal_map", "df.x --into y --background", "def f(x):\n    return 10 // (x - 1)\n")
    assert isinstance(job, MapJob)
    job.result(timeout=30)
    df = shell.user_ns["df"]
    assert df.columns.tolist() == ["x", "y", "y_error"]
    assert df["y"].tolist()[1:] == [10, 5]
    assert df["y_error"].iloc[0].startswith("ZeroDivisionError")


def test_background_magic_with_output_binds_a_new_frame_and_says_mistakes_at_once(shell):
    shell.user_ns["df"] = pd.DataFrame({"x": [1, 2]})
    job = shell.run_cell_magic("modal_map", "df.x --into y --background -o out", "def f(x):\n    return -x\n")
    job.result(timeout=30)
    assert shell.user_ns["out"]["y"].tolist() == [-1, -2]
    assert shell.user_ns["df"].columns.tolist() == ["x"]
    with pytest.raises(UsageError, match=r"f\(a, b\) can't take 1 positional argument"):
        shell.run_cell_magic("modal_map", "df.x --background", "def f(a, b):\n    return a\n")


BACKGROUND_NOTEBOOK = [
    "import time, pandas as pd, modal_magic\n"
    "df = pd.DataFrame({'x': range(16)})\n"
    "def slow(x):\n"
    "    time.sleep(0.25)\n"
    "    return x * 2\n"
    "job = df.modal.map(slow, column='x', backend='threads', max_containers=2, wait=False)",
    "print('second cell, job done:', job.done(), '| rows so far:', job.summary.succeeded)",
    "out = job.result()\nprint('result:', out['slow'].tolist()[:4], job.state)\n"
    "import ipywidgets\n"
    "bars = [w for w in ipywidgets.widgets.widget._instances.values() if 'modal-magic-bar' in getattr(w, '_dom_classes', ())]\n"
    "print('bars:', [(b.value, b.max, b.bar_style) for b in bars])",
]


@pytest.mark.slow
def test_in_a_kernel_the_next_cell_finishes_first_and_the_bar_keeps_updating(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in BACKGROUND_NOTEBOOK])
    path = tmp_path / "background.ipynb"
    nbformat.write(nb, path)
    executed, _ = execute_notebook(path, output_path=tmp_path / "out.ipynb", timeout=120)
    nb = nbformat.read(executed, as_version=4)
    texts = ["".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells]
    assert "second cell, job done: False" in texts[1]
    assert "result: [0, 2, 4, 6] finished" in texts[2]
    # The bar is shown in the cell that started the job (not in whichever cell runs when it appears)...
    [live] = [o for o in nb.cells[0].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert live["data"]["text/plain"].startswith("slow: running over 16 rows")
    assert not any("widget-view" in str(o.get("data", {})) for cell in nb.cells[1:] for o in cell.outputs)
    # ...and the job's thread drove it to the end while the other cells ran. (nbclient records only the
    # messages of the cell it is running, so neither the widget's updates nor the finished summary that
    # replaces it by display id reach the saved file here; JupyterLab routes both to the bar whatever
    # cell runs. The kernel's own widget is what to read.)
    assert "bars: [(16, 16, 'success')]" in texts[2]


def test_retry_failed_runs_in_the_background_too():
    df = pd.DataFrame({"x": [1, 3]})
    out = df.modal.map(tenfold, column="x", backend="threads", progress=False)
    job = out.modal.retry_failed(wait=False, progress=False)
    assert isinstance(job, MapJob)
    again = job.result(timeout=30)
    assert again["tenfold_error"].tolist() == [None, "ValueError: three"]  # it still fails, on its own retry
    with pytest.raises(ValueError, match="retry_failed"):
        pd.DataFrame({"x": [1]}).modal.retry_failed(wait=False)


def test_stop_while_result_waits_stops_the_waiting_not_the_job(sigint_raises):
    import os
    import signal

    gate = threading.Event()
    job = pd.DataFrame({"x": [1, 2]}).modal.map(lambda x: gate.wait(30) and x, column="x", backend="threads",
                                                 progress=False, wait=False, cache=False)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # what the Stop button sends the kernel
    with pytest.raises(KeyboardInterrupt):
        job.result()
    assert job.state == "running"
    gate.set()
    assert job.result(timeout=30)["result"].tolist() == [1, 2]
