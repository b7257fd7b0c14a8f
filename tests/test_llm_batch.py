"""``df.modal.llm(..., batch=True)``: OpenAI's Batch API through the real ``openai`` client, against the local server.

The server (``tests/openai_server/batches.py``) runs each batch on its own clock: ``batch_delay_s``
until every request is done (request ``i`` of ``n`` at ``(i + 1) / n`` of it), ``batch_expire_s``
to expire it half-way, and markers in a prompt (``[[fail=400]]``) to fail chosen rows. It keeps every
batch it was asked to create, so a test can count them across processes.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from typing import Literal

import pandas as pd
import pytest
from pydantic import BaseModel

import modal_magic
from modal_magic import llm
from modal_magic.cache import BatchRecords, default_cache
from modal_magic.errors import MapInterrupted, OptionsError
from modal_magic.ipython import llm_magic
from modal_magic.llm import batch as llm_batch
from tests.openai_server.fixture import TEST_KEY, openai_env
from tests.test_llm import CLASSIFY, REVIEWS, ip  # noqa: F401  (the same reviews, prompt and shell)

QUIET = {"progress": False, "batch": True}


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch):
    """Look at a running batch every few hundredths of a second, not every few seconds."""
    monkeypatch.setattr(llm_batch.SETTINGS, "poll_first_s", 0.02)
    monkeypatch.setattr(llm_batch.SETTINGS, "poll_max_s", 0.1)


def batch_lines(server, batch) -> list[dict]:
    return [json.loads(line) for line in server.batch_state.files[batch.input_file_id].data.decode().splitlines()]


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def stop_once_submitted(server) -> threading.Thread:
    """Press Stop (a KeyboardInterrupt in the main thread) once the server holds a batch and it was polled."""
    def stop() -> None:
        wait_for(lambda: server.batches)
        time.sleep(0.3)
        _thread.interrupt_main()

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


class Complaint(BaseModel):
    product: str
    complaint: str
    severity: Literal["low", "high"]


# --- the happy path --------------------------------------------------------------------------------


def test_answers_tokens_and_batch_prices_come_back_as_columns(openai_server):
    openai_server.batch_state.batch_delay_s = 0.3
    df = pd.DataFrame({"text": REVIEWS, "stars": [5, 1, 3]}, index=["a", "b", "b"])
    before = df.copy()
    out = df.modal.llm(CLASSIFY, into="label", max_tokens=10, **QUIET)

    assert out.columns.tolist() == ["text", "stars", "label", "label_tokens_in", "label_tokens_out",
                                    "label_cost_usd", "label_error"]
    assert out.index.tolist() == ["a", "b", "b"]
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert out["label_error"].isna().all()
    # One batch of three chat completion requests, and no live request.
    assert openai_server.requests == []
    [batch] = openai_server.batches
    lines = batch_lines(openai_server, batch)
    assert [line["body"]["messages"][0]["content"] for line in lines] == [CLASSIFY.format(text=t) for t in REVIEWS]
    assert {line["url"] for line in lines} == {"/v1/chat/completions"} and len({x["custom_id"] for x in lines}) == 3
    assert lines[0]["body"]["max_tokens"] == 10 and lines[0]["body"]["model"] == "gpt-4o-mini"
    # Half the live price per token.
    price_in, price_out = llm.BATCH_PRICES["gpt-4o-mini"]
    assert (price_in, price_out) == (llm.PRICES["gpt-4o-mini"][0] / 2, llm.PRICES["gpt-4o-mini"][1] / 2)
    expected = (out["label_tokens_in"] * price_in + out["label_tokens_out"] * price_out) / 1e6
    assert out["label_cost_usd"].tolist() == pytest.approx(expected.tolist())
    assert modal_magic.last_run().cost_usd == pytest.approx(expected.sum())
    assert modal_magic.last_run().tokens == int((out["label_tokens_in"] + out["label_tokens_out"]).sum())
    pd.testing.assert_frame_equal(df, before)


def test_the_bar_shows_the_batchs_status_and_request_counts(openai_server, capsys):
    openai_server.batch_state.batch_delay_s = 0.6
    pd.DataFrame({"text": REVIEWS}).modal.llm(CLASSIFY, batch=True, max_tokens=5)
    err = capsys.readouterr().err
    batch_id = openai_server.batches[0].id
    assert f"OpenAI batch {batch_id}: completed, 3/3 requests done" in err
    assert "3 done, 0 failed" in err


def test_a_schema_gives_one_column_per_field_as_in_live_mode(openai_server):
    df = pd.DataFrame({"text": ["product: kettle, complaint: leaks, it is high priority"]})
    out = df.modal.llm("Extract from: {text}", schema=Complaint, **QUIET)
    assert out[["product", "complaint", "severity"]].iloc[0].tolist() == ["kettle", "leaks", "high"]
    line = batch_lines(openai_server, openai_server.batches[0])[0]
    assert line["body"]["response_format"]["json_schema"]["name"] == "Complaint"


def test_equal_rows_share_one_request_and_empty_values_send_none(openai_server):
    df = pd.DataFrame({"text": ["good", None, "good", "bad"]})
    out = df.modal.llm("Say {text}", **QUIET)
    assert out["answer"].tolist()[::2] == ["Say good", "Say good"] and out["answer"].iloc[3] == "Say bad"
    assert out["answer_error"].iloc[1].startswith("MissingValue: column 'text' is empty")
    assert len(batch_lines(openai_server, openai_server.batches[0])) == 2


# --- failures ------------------------------------------------------------------------------------


def test_failed_requests_are_row_errors_and_retry_failed_submits_only_them(openai_server):
    texts = ["fine", "[[fail=500 times=1]] flaky", "[[fail=400 times=1]] refused", "[[malformed times=1]] json"]
    df = pd.DataFrame({"text": texts})
    out = df.modal.llm("Say {text}", schema={"type": "object", "properties": {"said": {"type": "string"}},
                                             "required": ["said"]}, into="x", **QUIET)
    errors = out["x_error"].astype(str).tolist()
    assert out["x_error"].iloc[0] is None
    assert errors[1].startswith("InternalServerError: 500 from batch ")
    assert errors[2].startswith("APIStatusError: 400 from batch ")
    assert errors[3].startswith("SchemaValidationError: the answer isn't valid JSON")
    # the malformed answer was paid for: its tokens count in the run's total
    assert modal_magic.last_run().tokens > out["x_tokens_in"].sum() + out["x_tokens_out"].sum()

    again = out.modal.retry_failed(progress=False)
    assert len(openai_server.batches) == 2
    second = batch_lines(openai_server, openai_server.batches[1])
    assert sorted(line["body"]["messages"][0]["content"] for line in second) == sorted(f"Say {t}" for t in texts[1:])
    assert again["x_error"].isna().all(), again["x_error"].tolist()
    assert again["said"].tolist() == ["unknown"] * 4  # the schema's string fields, from the server


def test_an_expired_batch_fails_its_unfinished_rows_and_retry_failed_submits_only_those(openai_server):
    state = openai_server.batch_state
    state.batch_delay_s, state.batch_expire_s = 2.0, 1.0  # half the requests are done when it expires
    df = pd.DataFrame({"text": [f"review {i}" for i in range(6)]})
    out = df.modal.llm("Say {text}", **QUIET)
    assert openai_server.batches[0].status == "expired"
    answered = out["answer_error"].isna()
    assert answered.sum() == 3 and answered.tolist() == [True] * 3 + [False] * 3
    message = str(out["answer_error"].iloc[5])
    assert message.startswith(f"BatchExpired: OpenAI's batch {openai_server.batches[0].id} expired (its 24 h window ended)")
    assert "out.modal.retry_failed()" in message
    assert isinstance(out.modal.errors()["exception"].iloc[0], llm_batch.BatchExpired)

    state.batch_delay_s, state.batch_expire_s = 0.0, None
    again = out.modal.retry_failed(progress=False)
    second = batch_lines(openai_server, openai_server.batches[1])
    assert [line["body"]["messages"][0]["content"] for line in second] == [f"Say review {i}" for i in (3, 4, 5)]
    assert again["answer"].tolist() == [f"Say review {i}" for i in range(6)]


def test_a_batch_cancelled_while_waiting_keeps_what_ran_and_fails_the_rest(openai_server):
    openai_server.batch_state.batch_delay_s = 2.0
    df = pd.DataFrame({"text": [f"row {i}" for i in range(4)]})

    def cancel_half_way():
        wait_for(lambda: openai_server.batches)
        time.sleep(1.1)  # two of four requests done
        cancelled.extend(llm_batch.cancel_batches())

    cancelled: list[str] = []
    canceller = threading.Thread(target=cancel_half_way)
    canceller.start()
    out = df.modal.llm("Say {text}", **QUIET)
    canceller.join()
    assert cancelled == [openai_server.batches[0].id] and openai_server.batches[0].status == "cancelled"
    assert out["answer"].tolist()[:2] == ["Say row 0", "Say row 1"]
    assert [str(e).split(":")[0] for e in out["answer_error"].iloc[2:]] == ["BatchCancelled"] * 2
    assert llm_batch.cancel_batches() == []  # nothing left running


def test_the_key_appears_in_no_error_the_endpoint_writes(openai_server):
    out = pd.DataFrame({"text": ["[[fail=401]] hi"]}).modal.llm("Say {text}", **QUIET)
    assert out["answer_error"].iloc[0].startswith("AuthenticationError: 401 from batch")
    # the server echoes the bearer token of a live request; a batch has none, and nothing shows the key
    assert TEST_KEY not in str(out.modal.errors().to_dict())


def test_an_unreachable_endpoint_fails_every_row_and_shows_no_credentials(monkeypatch):
    base_url = "http://user:hunter22@127.0.0.1:9/v1?api_key=QQQSECRET"
    out = pd.DataFrame({"text": ["a", "b"]}).modal.llm("Say {text}", api_key="sk-secretkey123456",
                                                       base_url=base_url, **QUIET)
    errors = out["answer_error"].astype(str).tolist()
    assert errors == ["BatchFailed: submitting the batch to http://***@127.0.0.1:9/v1?api_key=*** failed: "
                      "APIConnectionError: Connection error.; nothing was submitted for this row"] * 2
    shown = str(out.modal.errors().to_dict())
    assert "hunter22" not in shown and "QQQSECRET" not in shown and "sk-secretkey" not in shown


# --- split batches and the budget --------------------------------------------------------------------


def test_rows_are_split_over_the_requests_and_bytes_a_batch_may_hold(openai_server, monkeypatch):
    monkeypatch.setattr(llm_batch.SETTINGS, "max_requests", 10)
    df = pd.DataFrame({"text": [f"review number {i}" for i in range(30)]})
    out = df.modal.llm("Say {text}", **QUIET)
    assert out["answer"].tolist() == [f"Say review number {i}" for i in range(30)]
    assert [len(b.lines) for b in openai_server.batches] == [10, 10, 10]

    monkeypatch.setattr(llm_batch.SETTINGS, "max_requests", 50_000)
    monkeypatch.setattr(llm_batch.SETTINGS, "max_bytes", 2_000)
    out = df.modal.llm("Echo {text}", **QUIET)
    sizes = [len(openai_server.batch_state.files[b.input_file_id].data) for b in openai_server.batches[3:]]
    assert len(sizes) > 1 and max(sizes) <= 2_000 and sum(len(b.lines) for b in openai_server.batches[3:]) == 30
    assert out["answer_error"].isna().all()


def test_the_budget_is_checked_before_upload_against_the_worst_case(openai_server):
    df = pd.DataFrame({"text": [f"review {i}" for i in range(5)]})
    # Each request's worst case: its prompt's byte bound + 100 output tokens, at batch prices.
    out = df.modal.llm("Say {text}", max_tokens=100, budget_usd=0.0001, **QUIET)
    [batch] = openai_server.batches
    sent = len(batch.lines)
    assert 0 < sent < 5
    assert out["answer_error"].iloc[:sent].isna().all()
    refused = out["answer_error"].iloc[sent:].astype(str).tolist()
    assert all(e.startswith("BudgetExceeded: budget_usd=0.0001") and "at batch prices" in e for e in refused)
    assert out["answer_cost_usd"].sum() <= 0.0001

    openai_server.reset()
    out = df.modal.llm("Say {text}", budget_usd=0.0001, **QUIET)  # no max_tokens: 16,384 output tokens each
    assert openai_server.batches == [] and not openai_server.batch_state.files  # nothing uploaded
    assert out["answer_error"].astype(str).str.startswith("BudgetExceeded").all()


# --- resuming ------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import json, sys
    import pandas as pd
    import modal_magic
    from modal_magic.llm import batch
    batch.SETTINGS.poll_first_s = batch.SETTINGS.poll_max_s = 0.05
    df = pd.DataFrame({"text": [f"review {i}" for i in range(8)]})
    out = df.modal.llm("Say {text}", into="said", batch=True, progress=False)
    print(json.dumps({"said": out["said"].tolist(), "errors": out["said_error"].dropna().astype(str).tolist(),
                      "cached": modal_magic.last_run().cached}))
''')


def test_a_process_killed_after_submitting_is_resumed_without_a_second_batch(openai_server, tmp_path):
    env = {**os.environ, **openai_env(openai_server), "MODAL_MAGIC_CACHE_DIR": str(tmp_path / "cache")}
    openai_server.batch_state.batch_delay_s = 600.0  # the batch waits until the test lets it finish
    first = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: openai_server.batches, timeout=60)
        time.sleep(0.3)  # it polls the batch
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert openai_server.batches[0].status == "in_progress"

    openai_server.batch_state.batch_delay_s = 0.0
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == [] and report["said"] == [f"Say review {i}" for i in range(8)]
    assert len(openai_server.batches) == 1, "the resumed run submitted the rows again"

    # And a third run finds every answer in the cache: nothing is submitted.
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1])["cached"] == 8 and len(openai_server.batches) == 1


def test_a_batch_created_but_not_yet_recorded_is_found_by_its_file(openai_server):
    """A process killed between ``batches.create`` and recording its id: the next run finds it by its input file."""
    df = pd.DataFrame({"text": ["one", "two"]})
    openai_server.batch_state.batch_delay_s = 600.0
    with pytest.raises(MapInterrupted):
        stop_once_submitted(openai_server)
        with pytest.warns(llm_batch.BatchStillRunning, match="keeps running at OpenAI"):
            df.modal.llm("Say {text}", **QUIET)
    [batch] = openai_server.batches
    records = BatchRecords(default_cache().directory)
    assert [r.batch_id for r in records.all()] == [batch.id]
    with closing(sqlite3.connect(records.path)) as db:  # as if killed before the batch id was recorded
        db.execute("UPDATE llm_batches SET batch_id = NULL")
        db.commit()
    assert [r.batch_id for r in records.all()] == [None]

    openai_server.batch_state.batch_delay_s = 0.0
    out = df.modal.llm("Say {text}", **QUIET)
    assert out["answer"].tolist() == ["Say one", "Say two"]
    assert len(openai_server.batches) == 1
    assert [r.batch_id for r in records.all()] == [batch.id] and records.all()[0].collected is not None


def test_stop_leaves_the_batch_running_and_running_the_cell_again_collects_it(openai_server):
    openai_server.batch_state.batch_delay_s = 600.0
    df = pd.DataFrame({"text": REVIEWS})
    stop_once_submitted(openai_server)
    with pytest.warns(llm_batch.BatchStillRunning, match="Run the cell again to collect"):
        with pytest.raises(MapInterrupted) as stopped:
            df.modal.llm(CLASSIFY, into="label", **QUIET)
    assert stopped.value.result["label_error"].astype(str).str.startswith("Cancelled").all()
    assert openai_server.batches[0].status == "in_progress"

    openai_server.batch_state.batch_delay_s = 0.0
    out = df.modal.llm(CLASSIFY, into="label", **QUIET)
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert len(openai_server.batches) == 1


def test_on_error_raise_stops_at_the_first_failed_row_and_a_rerun_pays_nothing_more(openai_server):
    from modal_magic.errors import RowFailed

    df = pd.DataFrame({"text": ["a", "[[fail=400]] b", "c"]}, index=["x", "y", "z"])
    with pytest.raises(RowFailed, match="'y'"):
        df.modal.llm("Say {text}", on_error="raise", **QUIET)
    out = df.modal.llm("Say {text}", **QUIET)
    assert out["answer"].tolist()[::2] == ["Say a", "Say c"]
    assert len(openai_server.batches) == 1  # the rows answered were collected from it, not paid again


def test_cache_refresh_submits_again_and_rows_answered_live_are_not_submitted(openai_server):
    df = pd.DataFrame({"text": REVIEWS})
    df.iloc[:1].modal.llm(CLASSIFY, progress=False)  # answered live, and cached
    out = df.modal.llm(CLASSIFY, **QUIET)
    assert modal_magic.last_run().cached == 1
    assert len(openai_server.batches[0].lines) == 2
    again = df.modal.llm(CLASSIFY, cache="refresh", **QUIET)
    assert len(openai_server.batches[1].lines) == 3
    assert again["answer"].tolist() == out["answer"].tolist()


# --- mistakes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "modal", "secrets": ["s"], "max_containers": 2}, "backend='modal' doesn't apply"),
    ({"processes": 2}, "processes=2 paces live requests"),
    ({"rpm": 100}, "rpm=100.0 paces live requests"),
    ({"cache": False}, "use cache='refresh'"),
    ({"retries": 2}, "retry_failed() submits the failed rows in a new batch"),
    ({"timeout": 5}, "leave timeout= out"),
    ({"batch": "yes"}, "batch='yes' is not valid"),
])
def test_mistakes_are_refused_before_anything_is_uploaded(openai_server, kwargs, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", **{"batch": True, "progress": False, **kwargs})
    assert openai_server.batches == [] and not openai_server.batch_state.files


def test_the_magics_batch_flag(openai_server, ip):
    magic = ip.magics_manager.registry["ModalMagic"]
    llm_magic.run_llm_cell(magic, "reviews --into label --max-tokens 10 --batch", CLASSIFY + "\n")
    assert ip.user_ns["reviews"]["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert len(openai_server.batches) == 1 and openai_server.requests == []
    assert "--batch" in llm_magic.magic_help()


def test_a_background_batch_run_returns_a_job_and_cancelling_it_cancels_the_batch(openai_server):
    openai_server.batch_state.batch_delay_s = 30.0  # long enough that only the cancel can end it
    df = pd.DataFrame({"text": [f"row {i}" for i in range(3)]})

    job = df.modal.llm("Say {text}", wait=False, **QUIET)
    assert isinstance(job, modal_magic.MapJob)
    wait_for(lambda: openai_server.batches)
    assert not job.done()
    job.cancel()
    with pytest.raises(modal_magic.MapInterrupted) as stopped:
        job.result(timeout=60)

    assert openai_server.batches[0].status == "cancelled"  # cancelled at OpenAI, not only no longer awaited
    assert stopped.value.result["answer_error"].str.startswith("Cancelled").all()
    assert job.state == "cancelled"
