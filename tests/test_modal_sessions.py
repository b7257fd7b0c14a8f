"""Warm Modal sessions, against the local Modal test server: what carries over from one cell to the next.

Each test counts what reached the server (apps created, functions created, containers started,
inputs) and reads what the run reported (``last_run().logs``, ``modal_magic.sessions()``), since
"no new app, no image build, no container start" is a count, not a timing.
"""

from __future__ import annotations

import os
import time

import pandas as pd
import pytest

import modal_magic


def plus_one(x):
    return x + 1


def plus_two(x):
    return x + 2


MODEL = None
LOADS = 0


def predict(x):
    """Loads its "model" into a module global on first use, as the README says to load weights once."""
    global MODEL, LOADS
    if MODEL is None:
        MODEL = os.getpid()
        LOADS += 1
    return (MODEL, LOADS)


def run(fn, n=8, **options):
    df = pd.DataFrame({"x": range(n)})
    options = {"backend": "modal", "progress": False, "cache": False, **options}
    return df.modal.map(fn, column="x", into="y", **options)


def test_five_cells_share_one_app_and_its_containers(modal_server):
    modal_server.container_start_delay_s = 0.5  # a cold start that only the first cell pays
    for cell in range(5):
        out = run(plus_one if cell % 2 == 0 else plus_two)
        assert out["y"].tolist() == [x + (1 if cell % 2 == 0 else 2) for x in range(8)]
        if cell == 0:
            started = modal_server.workers_started
            assert modal_magic.last_run().logs[0] == "starting a Modal app and its containers"
        else:
            assert modal_magic.last_run().logs[0].startswith("warm containers: reusing Modal app")
    assert modal_server.rpc_counts["AppCreate"] == 1
    assert modal_server.rpc_counts["FunctionCreate"] == 1, "an edited function needs no new Modal function"
    assert modal_server.workers_started == started, "containers started once, by the first cell"
    (session,) = modal_magic.sessions()
    assert (session["runs"], session["running"], session["keep_warm_s"]) == (5, 0, 300)
    assert session["app_id"] == modal_server.apps[0]["app_id"]


def test_module_state_loaded_once_per_container_survives_the_next_cell(modal_server):
    first = run(predict)["y"].tolist()
    second = run(predict)["y"].tolist()
    assert {loads for _, loads in first + second} == {1}, "each container loaded the model once"
    assert {pid for pid, _ in second} <= {pid for pid, _ in first}, "the second cell ran on the same containers"


def test_a_container_started_later_is_sent_the_function_it_asks_for(modal_server):
    assert run(plus_one, n=1, max_containers=2)["y"].tolist() == [1]  # one container knows plus_one
    assert modal_server.workers_started == 1
    received = modal_server.inputs_received
    out = run(plus_one, n=12, max_containers=2, batch_size=1)
    assert out["y"].tolist() == [x + 1 for x in range(12)]
    assert modal_server.workers_started == 2
    assert modal_server.inputs_received - received > 12, "the new container's first batch went again, with the function"


def test_a_changed_spec_starts_new_containers_and_says_why(modal_server):
    run(plus_one, env={"MODE": "fast"})
    out = run(plus_one, env={"MODE": "exact"}, memory=1024)
    assert out["y"].tolist() == [x + 1 for x in range(8)]
    assert modal_magic.last_run().logs[0] == (
        "new containers: memory none → 1024, env MODE=fast → MODE=exact")
    assert modal_server.rpc_counts["AppCreate"] == 2
    assert len(modal_magic.sessions()) == 2
    run(plus_one, env={"MODE": "fast"})
    assert modal_magic.last_run().logs[0].startswith("warm containers"), "the first pool is still warm"


def test_keep_warm_0_stops_the_app_with_the_run(modal_server):
    assert run(plus_one, keep_warm=0)["y"].tolist() == [x + 1 for x in range(8)]
    assert modal_magic.sessions() == []
    assert [d["app_id"] for d in modal_server.apps_disconnected] == [modal_server.apps[0]["app_id"]]
    assert modal_server.function("modal_magic_runner")["scaledown_window"] is None


def test_an_idle_session_stops_after_keep_warm_and_so_do_its_containers(modal_server):
    run(plus_one, keep_warm=2)
    assert modal_server.function("modal_magic_runner")["scaledown_window"] == 2
    assert len(modal_magic.sessions()) == 1 and modal_server.live_worker_pids()
    deadline = time.monotonic() + 15
    # The session leaves sessions() as its stop begins, and the server may scale the containers
    # down on the same clock: wait for the app's stop to reach the server too.
    while ((modal_magic.sessions() or modal_server.live_worker_pids() or not modal_server.apps_disconnected)
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert modal_magic.sessions() == []
    assert modal_server.apps_disconnected, "the idle app was stopped"
    assert modal_server.live_worker_pids() == []
    run(plus_one, keep_warm=2)
    assert modal_magic.last_run().logs[0] == "new containers: the warm ones had stopped (idle longer than keep_warm)"


def test_shutdown_stops_every_warm_app_and_container(modal_server):
    run(plus_one)
    run(plus_one, memory=512)
    assert len(modal_magic.sessions()) == 2
    modal_magic.shutdown()
    assert modal_magic.sessions() == []
    assert len(modal_server.apps_disconnected) == 2
    deadline = time.monotonic() + 5
    while modal_server.live_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert modal_server.live_worker_pids() == []


def test_a_warm_app_that_stopped_meanwhile_is_replaced_without_losing_a_row(modal_server):
    run(plus_one)
    modal_server.reset()  # the server forgets the app, as Modal does after a laptop slept past the heartbeats
    out = run(plus_two)
    assert out["y"].tolist() == [x + 2 for x in range(8)]
    assert out["y_error"].isna().all()
    assert modal_magic.last_run().logs[1].startswith("new containers: the warm Modal app had stopped; started ap-")


def test_keep_warm_is_checked_before_anything_starts():
    with pytest.raises(modal_magic.OptionsError, match="keep_warm=7200 is not valid: expected 0 .* or between 2 and 3600"):
        pd.DataFrame({"x": [1]}).modal.map(plus_one, column="x", backend="modal", keep_warm=7200)
    with pytest.raises(modal_magic.OptionsError, match="keep_warm=1 is not valid"):
        pd.DataFrame({"x": [1]}).modal.map(plus_one, column="x", backend="modal", keep_warm=1)


def test_a_kernel_that_exits_stops_its_warm_app(modal_server):
    import subprocess
    import sys

    script = ("import pandas as pd, modal_magic\n"
              "out = pd.DataFrame({'x': [1, 2]}).modal.map(lambda x: x + 1, column='x', backend='modal', progress=False)\n"
              "print(out['result'].tolist(), len(modal_magic.sessions()))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[2, 3] 1", done.stderr[-2000:]
    assert [d["app_id"] for d in modal_server.apps_disconnected] == [modal_server.apps[0]["app_id"]]
    deadline = time.monotonic() + 5
    while modal_server.live_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert modal_server.live_worker_pids() == []
