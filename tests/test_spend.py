"""What a Modal map costs: ``budget_usd`` caps it (batches book their worst case), ``last_run()`` says it.

Against the local Modal test server, with the rates overridden so that one CPU core costs $0.001 a
second and memory nothing: dollars are then container-seconds / 1000 for ``cpu=1``. The runs that
compare dollars with the cap set ``keep_warm=0``: their containers stop with the run, so no idle
tail comes on top (container lifetimes are checked in tests/test_container_time.py).
"""

from __future__ import annotations

import re
import time

import pandas as pd
import pytest

import modal_magic
from modal_magic import BudgetExceeded, OptionsError, costs
from modal_magic.backends import Batch, BatchResult
from modal_magic.llm.row.booking import Bookings
from modal_magic.options import MapOptions
from modal_magic.spend import MapBudget

RATE = 0.001  # $ per second for cpu=1.0


@pytest.fixture
def round_rates(monkeypatch):
    monkeypatch.setitem(costs.MODAL_RATES, "cpu_core", RATE)
    monkeypatch.setitem(costs.MODAL_RATES, "memory_gib", 0.0)


def nap(x):
    time.sleep(x)
    return x


def test_spending_stops_before_the_budget_and_the_rest_is_refused(modal_server, round_rates):
    # timeout=1 s: each one-row input may run (and be billed) 10 s, Modal's shortest timeout, so each
    # batch books $0.01; each row then costs about $0.0003 of its container's time, so after at most
    # 7 rows (fewer where the containers' start-up and idle time count too) $0.002 + $0.01 > $0.012
    df = pd.DataFrame({"x": [0.3] * 12})
    out = df.modal.map(nap, column="x", backend="modal", cpu=1.0, timeout=1.0, budget_usd=0.012,
                       timings=True, progress=False, keep_warm=0)
    assert len(out) == 12
    ran = out["nap_error"].isna()
    refused = out.loc[~ran, "nap_error"]
    assert 3 <= ran.sum() <= 7, out["nap_error"].tolist()
    assert {e.type_name for e in refused} == {"BudgetExceeded"}
    message = refused.iloc[0].message
    assert re.match(r"budget_usd=0\.012: \$0\.00[23]\d* spent", message), message
    assert ("the next batch (1 row) could cost up to $0.01 (10 container-seconds: timeout=1s per row, "
            "Modal's shortest is 10 s; at $3.60/h for 1 CPU + 0.125 GiB)") in message
    # the dollars reported are the containers' time, start to stop (keep_warm=0: they stop with the
    # run), so at least the rows' measured time; within the cap, and nothing was sent once what was
    # spent + a batch's worst case would pass it
    rows = out.loc[ran, "nap_seconds"].sum() * RATE
    reported = modal_magic.last_run().compute_usd
    assert rows <= reported <= 0.012
    assert reported + 0.01 > 0.012


def test_finished_rows_are_cached_so_a_bigger_budget_pays_only_for_the_rest(modal_server, round_rates):
    df = pd.DataFrame({"x": [0.3 + i / 10_000 for i in range(6)]})  # distinct: equal rows share a cache entry
    first = df.modal.map(nap, column="x", backend="modal", cpu=1.0, timeout=1.0, budget_usd=0.011, progress=False)
    done = int(first["nap_error"].isna().sum())
    # about 3 rows' container time spends $0.001, a 4th books $0.01 and takes it past: no 5th fits
    assert 2 <= done <= 4, first["nap_error"].tolist()
    second = df.modal.map(nap, column="x", backend="modal", cpu=1.0, timeout=1.0, budget_usd=1.0, progress=False)
    assert second["nap"].tolist() == df["x"].tolist()
    assert modal_magic.last_run().cached == done


def test_a_budget_that_cannot_take_one_batch_sends_nothing(modal_server, round_rates):
    # no timeout: Modal's 300 s per input is the worst case, $0.30 a batch
    df = pd.DataFrame({"x": [0.0] * 3})
    out = df.modal.map(nap, column="x", backend="modal", cpu=1.0, budget_usd=0.10, progress=False)
    assert out["nap"].isna().all()
    errors = out["nap_error"].tolist()
    assert all(e.type_name == "BudgetExceeded" for e in errors)
    assert ("could cost up to $0.3 (300 container-seconds: Modal's default 300 s per input, as timeout= is unset"
            in errors[0].message)
    assert modal_magic.last_run().compute_usd == 0.0


def test_summary_line_shows_modal_compute_dollars(modal_server, round_rates, capsys):
    df = pd.DataFrame({"x": [0.1, 0.1]})
    df.modal.map(nap, column="x", backend="modal", cpu=1.0, max_containers=1, progress=True)
    summary = modal_magic.last_run()
    # one container: well under a second of start-up and rows, then the default keep_warm=300 s of
    # idle before it scales down, which Modal bills too (projected: it is still up)
    assert 0.300 < summary.compute_usd < 0.302
    text = capsys.readouterr().err + capsys.readouterr().out
    assert re.search(r"≈ \$0\.30\d+ Modal compute \(estimate\)", text), text
    assert re.search(r"nap: ≈ \$0\.000\d+ Modal compute so far \(estimate\) \| 2/2 rows", text), text


def test_local_runs_report_no_compute_dollars():
    pd.DataFrame({"x": [0.0]}).modal.map(nap, column="x", backend="threads", progress=False)
    assert modal_magic.last_run().compute_usd is None


@pytest.mark.parametrize("backend", ["local", "threads", "sequential", "modal:app/fn"])
def test_budget_on_a_backend_without_a_known_cost_is_refused(backend):
    with pytest.raises(OptionsError, match="budget_usd= caps what Modal containers cost, but .* so no cost is "
                                           "known; leave budget_usd out, or run with backend='modal'"):
        pd.DataFrame({"x": [1]}).modal.map(None if backend.startswith("modal:") else nap, column="x",
                                           backend=backend, budget_usd=1.0)


def test_budget_must_be_a_positive_number():
    with pytest.raises(OptionsError, match="budget_usd=-1 is not valid"):
        MapOptions.create(backend="modal", budget_usd=-1)


def test_lost_batches_settle_at_their_worst_case_and_unstarted_ones_at_nothing(round_rates):
    budget = MapBudget(MapOptions.create(backend="modal", cpu=1.0, timeout=5.0, budget_usd=1.0))
    batches = [Batch(i, [i], [0]) for i in range(3)]
    for batch in batches:
        assert budget.check(batch) == "book"
        budget.book(batch)
    budget.settle(BatchResult(batches[0], [1], [], elapsed_s=2.0))
    budget.settle(BatchResult(batches[1], lost=RuntimeError("container died")))
    budget.settle(BatchResult(batches[2], requeue=True))
    assert budget.spent_usd == pytest.approx(2.0 * RATE + 10 * RATE)  # 10 s: timeout 5 s + 5 s grace
    assert budget.bookings.in_flight_usd == 0.0


def test_the_llm_budget_and_the_map_budget_share_one_rule():
    from modal_magic.llm.row import Budget

    assert issubclass(Budget, Bookings)
    # the same numbers give the same verdicts
    llm, plain = Budget(1.0), Bookings(1.0)
    for bookings in (llm, plain):
        bookings.book(0.6)
    assert llm.check(0.5) == plain.check(0.5) == "wait"
    for bookings in (llm, plain):
        bookings.release(0.6, 0.6)
    assert llm.check(0.5) == plain.check(0.5) == "refuse"


def test_budget_exceeded_is_the_public_error():
    assert modal_magic.BudgetExceeded is BudgetExceeded


def stamp(x):
    """Sleeps ``x`` seconds and says when it ran, so the test can see the batches that overlapped."""
    start = time.time()
    time.sleep(x)
    return (start, time.time())


def test_with_several_batches_in_flight_what_is_spent_never_passes_the_budget(modal_server, round_rates):
    # Each one-row batch books $0.01 (10 s, Modal's shortest timeout, at $0.001/s), so $0.03 lets three
    # be in flight. Spent is the two containers' time so far (start-up and idle included; a batch in
    # flight is counted in it and in its booking, erring on the safe side): two stay in flight until
    # $0.01 is spent, and once $0.02 is no further batch fits, as $0.02 + its $0.01 would pass $0.03.
    modal_server.container_start_delay_s = 0.3
    df = pd.DataFrame({"x": [0.4 + i / 10_000 for i in range(60)]})  # distinct rows: one cache entry each
    options = dict(backend="modal", cpu=1.0, timeout=1.0, max_containers=2, batch_size=1, keep_warm=0,
                   progress=False)
    out = df.modal.map(stamp, column="x", budget_usd=0.03, **options)
    ran = out["stamp_error"].isna()
    spans = sorted(out.loc[ran, "stamp"])
    assert 10 <= len(spans) < 60, out["stamp_error"].tolist()
    overlapping = sum(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlapping >= len(spans) // 3, f"batches ran two at a time: {spans}"
    refused = out.loc[~ran, "stamp_error"]
    assert {e.type_name for e in refused} == {"BudgetExceeded"}
    assert refused.iloc[0].message.startswith("budget_usd=0.03: $0.02")  # spent when the next couldn't fit
    # what the run's containers cost, start to stop (keep_warm=0: they stop with the run), is within it
    spent = modal_magic.last_run().compute_usd
    assert len(spans) * 0.4 * RATE <= spent <= 0.03
    # the finished rows are kept and cached: running them again runs nothing
    again = df[ran].modal.map(stamp, column="x", budget_usd=0.03, **options)
    assert again["stamp"].tolist() == out.loc[ran, "stamp"].tolist()
    assert (modal_magic.last_run().cached, modal_magic.last_run().ran) == (len(spans), 0)
