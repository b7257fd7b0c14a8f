"""Container time as Modal bills it: start to scale-down, keep_warm idle included, split among runs.

The rule itself (:class:`~modal_magic.backends.modal.container_time.ContainerClock`) is checked
with fake time; then runs on the local Modal test server, whose containers have known lifetimes (a
set cold start, rows of a set length, a scale-down after the function's ``scaledown_window``, i.e.
``keep_warm``), check the dollars against the figure worked out by hand from those lifetimes and
a user's own rates.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest

import modal_magic
from modal_magic import costs
from modal_magic.backends.modal.container_time import ContainerClock

LOADING, IDLE, COMPLETED, QUEUED = 3, 8, 5, 1  # modal_proto TaskState values


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def one_container(keep_warm: float) -> tuple[FakeTime, ContainerClock]:
    """A clock at 0 s where run "a" has begun and container ta-1 is loading."""
    now = FakeTime()
    clock = ContainerClock(keep_warm=keep_warm, now=now)
    clock.begin("a")
    clock.task_state("ta-1", LOADING)
    return now, clock


def test_a_run_pays_from_container_start_to_scale_down_projected_then_exact():
    now = FakeTime()
    clock = ContainerClock(keep_warm=60, now=now)
    clock.begin("a")
    now.t = 1.0
    clock.task_state("ta-1", QUEUED)  # queued: no worker, nothing billed yet
    now.t = 2.0
    clock.task_state("ta-1", LOADING)  # the cold start counts
    now.t = 5.0
    clock.task_state("ta-1", IDLE)
    assert clock.run_seconds("a") == 3.0  # so far, while the run goes on
    now.t = 12.0
    clock.end("a")
    assert clock.run_seconds("a") == 70.0  # 10 s so far + keep_warm projected: the container is up
    now.t = 71.0
    clock.task_state("ta-1", COMPLETED)  # Modal scaled it down 59 s after the run
    now.t = 500.0
    assert clock.run_seconds("a") == 69.0  # exact: 2 s to 71 s
    assert clock.total_seconds() == 69.0


def test_overlapping_runs_split_a_second_and_the_idle_tail_is_the_last_runs():
    now, clock = one_container(keep_warm=30)
    clock.task_state("ta-2", LOADING)
    now.t = 10.0
    clock.begin("b")  # b shares the session with a from here
    now.t = 20.0
    clock.end("a")
    now.t = 25.0
    clock.end("b")  # b finished last: the idle tail is b's
    now.t = 40.0
    clock.task_state("ta-1", COMPLETED)
    now.t = 55.0
    clock.close()  # the session stopped its app: ta-2 stops here
    # 2 containers: 0-10 s a alone (20 s), 10-20 s shared (20 s, 10 each), 20 s-end b alone
    assert clock.run_seconds("a") == pytest.approx(30.0)
    assert clock.run_seconds("b") == pytest.approx(10.0 + (40 - 20) + (55 - 20))
    assert clock.run_seconds("a") + clock.run_seconds("b") == pytest.approx(clock.total_seconds())


def test_a_new_run_ends_the_previous_runs_idle_tail():
    now, clock = one_container(keep_warm=300)
    now.t = 10.0
    clock.end("a")
    now.t = 50.0
    clock.begin("b")  # a's tail ends: from here the warm container is b's
    now.t = 60.0
    assert clock.run_seconds("a") == 50.0
    assert clock.run_seconds("b") == 10.0
    clock.end("b")
    assert clock.run_seconds("b") == 310.0  # its own tail, projected to keep_warm


def test_states_of_a_stopped_container_or_after_the_app_stopped_bill_nothing():
    now, clock = one_container(keep_warm=60)
    now.t = 4.0
    clock.task_state("ta-1", COMPLETED)
    now.t = 6.0
    clock.task_state("ta-1", IDLE)  # a late state of a stopped container doesn't start it again
    clock.close()
    clock.task_state("ta-2", LOADING)
    now.t = 9.0
    assert clock.total_seconds() == 4.0
    assert clock.containers_seen == 1


# --- on the local Modal test server ------------------------------------------------------------------

#: a workspace's own rates, as a user sets them: $ per second per T4, per CPU core, per GiB
RATES = {"T4": 0.01, "cpu_core": 0.001, "memory_gib": 0.0005}
RATE = 0.01 + 2 * 0.001 + 2 * 0.0005  # gpu="T4", cpu=2, memory=2048 MiB: $0.013 per container-second
COLD_START_S = 1.0
KEEP_WARM_S = 2
ROW_S = 0.25
#: container-seconds a figure may exceed the hand-computed one by: the worker's own start, the inputs'
#: round trips and the log stream's latency (under 0.1 s on a quiet machine; room for a loaded one)
OVER_S = 0.8
#: ... and fall short of it by (the client hears of a start a little after it happened)
UNDER_S = 0.1


@pytest.fixture
def workspace_rates(monkeypatch):
    for name, rate in RATES.items():
        monkeypatch.setitem(costs.MODAL_RATES, name, rate)


def nap(x):
    time.sleep(x)
    return x


def run(n_rows, **options):
    df = pd.DataFrame({"x": [ROW_S] * n_rows})
    options = {"backend": "modal", "gpu": "T4", "cpu": 2.0, "memory": 2048, "max_containers": 1,
               "batch_size": 1, "keep_warm": KEEP_WARM_S, "cache": False, "progress": False, **options}
    return df.modal.map(nap, column="x", **options)


def wait_until_stopped(server, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lifetimes = server.container_lifetimes()
        if lifetimes and all(stop is not None for _, stop in lifetimes) and not modal_magic.sessions():
            return lifetimes
        time.sleep(0.1)
    raise AssertionError(f"containers still up after {timeout_s} s: {server.container_lifetimes()}")


def test_dollars_match_the_hand_computed_container_lifetime(modal_server, workspace_rates):
    modal_server.container_start_delay_s = COLD_START_S
    out = run(4)
    assert out["nap"].tolist() == [ROW_S] * 4
    # By hand: one container, 1 s cold start + 4 rows × 0.25 s + 2 s idle before it scales down
    # = 4.0 s at $0.013/s = $0.052, within OVER_S / UNDER_S container-seconds.
    by_hand = (COLD_START_S + 4 * ROW_S + KEEP_WARM_S) * RATE
    projected = modal_magic.last_run().compute_usd  # the container is still up: its tail projected
    assert by_hand - UNDER_S * RATE <= projected <= by_hand + OVER_S * RATE
    lifetimes = wait_until_stopped(modal_server)
    assert len(lifetimes) == 1
    exact = modal_magic.last_run().compute_usd  # once it stopped: what it lived, as Modal reported it
    assert by_hand - UNDER_S * RATE <= exact <= by_hand + OVER_S * RATE
    (start, stop), = lifetimes
    assert exact == pytest.approx((stop - start) * RATE, abs=0.25 * RATE)  # the server's own record


def test_the_summary_line_labels_the_figure_an_estimate(modal_server, workspace_rates, capsys):
    run(1, progress=True)
    text = capsys.readouterr().err + capsys.readouterr().out
    assert "Modal compute (estimate)" in text, text


def test_two_cells_on_one_warm_session_share_its_containers_time(modal_server, workspace_rates):
    modal_server.container_start_delay_s = COLD_START_S
    run(2)
    first_projected = modal_magic.last_run().compute_usd
    time.sleep(0.5)  # the first run's idle tail, until the second cell starts
    second = run(2)
    assert second["nap"].notna().all()
    lifetimes = wait_until_stopped(modal_server)
    assert len(lifetimes) == 1, "the second cell ran on the first one's warm container"
    (start, stop), = lifetimes
    # the first run, as it ended: cold start + 2 rows + keep_warm projected (the container was up)
    assert first_projected == pytest.approx((COLD_START_S + 2 * ROW_S + KEEP_WARM_S) * RATE, abs=OVER_S * RATE)
    # the second run: no cold start, 2 rows, then the idle tail until the container stopped
    second_usd = modal_magic.last_run().compute_usd
    assert second_usd == pytest.approx((2 * ROW_S + KEEP_WARM_S) * RATE, abs=OVER_S * RATE)
    # every second of the container's life is billed to one run: what is not the second's is the
    # first's, its cold start, rows and 0.5 s of idle until the second cell started
    assert (stop - start) * RATE - second_usd == pytest.approx((COLD_START_S + 2 * ROW_S + 0.5) * RATE,
                                                                abs=OVER_S * RATE)


def test_sessions_show_the_dollars_so_far_idle_included(modal_server, workspace_rates):
    modal_server.container_start_delay_s = COLD_START_S
    run(2, keep_warm=60)
    (session,) = modal_magic.sessions()
    first = session["compute_usd"]
    time.sleep(1.0)  # idle, warm: still billed
    (session,) = modal_magic.sessions()
    assert session["compute_usd"] - first == pytest.approx(1.0 * RATE, abs=0.3 * RATE)
    assert session["container_s"] == pytest.approx(COLD_START_S + 2 * ROW_S + 1.0, abs=0.8)
    assert session["compute_usd"] == pytest.approx(session["container_s"] * RATE, abs=0.1 * RATE)
