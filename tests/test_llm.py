"""``df.modal.llm`` with the real ``openai`` client against a local OpenAI-compatible server.

The server (``tests/openai_server``) answers deterministically, reports usage, records when each
request arrived, and fails, slows down or garbles chosen rows on request (markers in the prompt,
e.g. ``[[fail=429 times=1 retry_after=0.3]]``). Rate limits are checked on those arrival times.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
from typing import Literal

import cloudpickle
import pandas as pd
import pytest
from pydantic import BaseModel

import modal_magic
import modal_magic.llm.row as llm_row
from modal_magic import costs, llm
from modal_magic.ipython import llm_magic
from modal_magic.fingerprint import function_fingerprint
from modal_magic.options import MapOptions, OptionsError
from tests.openai_server.fixture import TEST_KEY, openai_env

CLASSIFY = "Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}"
REVIEWS = [
    "This product is amazing, best purchase ever!",
    "Terrible quality, broke after one day.",
    "It arrived on time and works as described.",
]
FAST = {"progress": False}


class Complaint(BaseModel):
    product: str
    complaint: str
    severity: Literal["low", "high"]


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


def capture_row_functions(monkeypatch: pytest.MonkeyPatch) -> list:
    """The row functions llm_frame hands the engine, for checks on what they carry."""
    seen: list = []
    real = llm.map_frame

    def spy(frame, fn, **kwargs):
        seen.append(fn)
        return real(frame, fn, **kwargs)

    monkeypatch.setattr(llm, "map_frame", spy)
    return seen


# --- answers and columns ---------------------------------------------------------------------------


def test_answers_tokens_and_cost_become_columns(openai_server):
    df = pd.DataFrame({"text": REVIEWS, "stars": [5, 1, 3]}, index=["a", "b", "b"])
    before = df.copy()
    out = df.modal.llm(CLASSIFY, into="label", max_tokens=10, **FAST)

    assert out.columns.tolist() == ["text", "stars", "label", "label_tokens_in", "label_tokens_out",
                                    "label_cost_usd", "label_error"]
    assert out.index.tolist() == ["a", "b", "b"]
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert out["label_error"].isna().all()
    records = openai_server.requests
    assert len(records) == 3
    by_content = {r.content: r for r in records}
    for i, text in enumerate(REVIEWS):
        record = by_content[CLASSIFY.format(text=text)]
        assert out["label_tokens_in"].iloc[i] == record.tokens_in
        assert out["label_tokens_out"].iloc[i] == record.tokens_out
        price_in, price_out = llm.PRICES["gpt-4o-mini"]
        expected = (record.tokens_in * price_in + record.tokens_out * price_out) / 1e6
        assert out["label_cost_usd"].iloc[i] == pytest.approx(expected)
    assert str(out["label_tokens_in"].dtype) == "int64" and out["label_cost_usd"].dtype == "float64"
    pd.testing.assert_frame_equal(df, before)  # the input is never changed


def test_system_temperature_and_max_tokens_reach_the_request(openai_server):
    df = pd.DataFrame({"text": ["hello"], "lang": ["French"]})
    out = df.modal.llm("Translate {text} into {lang}", model="gpt-4.1-mini", system="You translate.",
                       temperature=0.2, max_tokens=7, **FAST)
    body = openai_server.requests[0].body
    assert body["model"] == "gpt-4.1-mini"
    assert body["messages"] == [{"role": "system", "content": "You translate."},
                                {"role": "user", "content": "Translate hello into French"}]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 7
    assert out["answer"].tolist() == ["Translate hello into French"]  # the server echoes


def test_newer_models_get_max_completion_tokens(openai_server):
    pd.DataFrame({"text": ["hi"]}).modal.llm("Say {text}", model="o4-mini", max_tokens=5, **FAST)
    body = openai_server.requests[0].body
    assert body["max_completion_tokens"] == 5 and "max_tokens" not in body


def test_a_model_without_a_price_has_no_cost_unless_prices_names_it(openai_server):
    df = pd.DataFrame({"text": ["hi", "there"]})
    out = df.modal.llm("Say {text}", model="llama3", **FAST)
    assert out["answer_cost_usd"].isna().all() and out["answer_tokens_in"].notna().all()
    out = df.modal.llm("Say {text}", model="llama3", prices={"llama3": (1_000_000, 0)}, **FAST)
    assert out["answer_cost_usd"].tolist() == out["answer_tokens_in"].astype(float).tolist()  # $1 a token


def test_an_empty_value_fails_its_row_without_a_request(openai_server):
    df = pd.DataFrame({"text": ["good", None, float("nan")]})
    out = df.modal.llm("Say {text}", **FAST)
    assert out["answer"].tolist()[0] == "Say good"
    assert out["answer_error"].iloc[1] == "MissingValue: column 'text' is empty in this row; no request was sent"
    assert out["answer_error"].iloc[2].startswith("MissingValue")
    assert len(openai_server.requests) == 1


def test_the_progress_bar_shows_tokens_and_cost(openai_server, capsys):
    df = pd.DataFrame({"text": REVIEWS})
    out = df.modal.llm(CLASSIFY, into="label", progress=True)
    tokens = int(out["label_tokens_in"].sum() + out["label_tokens_out"].sum())
    err = capsys.readouterr().err
    assert f"{tokens:,} tokens" in err
    assert costs.dollars(out['label_cost_usd'].sum()) in err


def test_rerunning_pays_nothing_and_a_new_key_or_budget_keeps_the_cache(openai_server, monkeypatch):
    df = pd.DataFrame({"text": ["one", "two", "three"]})
    seen = capture_row_functions(monkeypatch)
    first = df.modal.llm("Say {text}", **FAST)
    again = df.modal.llm("Say {text}", api_key="sk-other-key-000000", budget_usd=1.0, rpm=6000, **FAST)
    assert len(openai_server.requests) == 3  # the second run came from the cache
    pd.testing.assert_frame_equal(first, again)
    fingerprints = {function_fingerprint(fn, star=True, result_options={}) for fn in seen}
    assert len(fingerprints) == 1  # key, budget and rate limits are not part of what a row computes
    assert len({pickle.dumps(fn) for fn in seen}) == 1  # how an installed modal_magic's function is fingerprinted
    df.modal.llm("Say: {text}", **FAST)  # a changed prompt is new work
    assert len(openai_server.requests) == 6


# --- mistakes caught before any request --------------------------------------------------------------


def test_a_missing_template_column_is_named_before_any_request(openai_server):
    df = pd.DataFrame({"text": ["a"], "stars": [1]})
    with pytest.raises(llm.TemplateError, match=r"no column 'txt': did you mean \{text\}\? its columns are 'text', 'stars'"):
        df.modal.llm("Classify {txt}", **FAST)
    with pytest.raises(llm.TemplateError, match="no {column} field"):
        df.modal.llm("Classify this", **FAST)
    with pytest.raises(llm.TemplateError, match="empty field"):
        df.modal.llm("Classify {}", **FAST)
    with pytest.raises(llm.TemplateError, match="literal braces"):
        df.modal.llm("Classify {text", **FAST)
    assert openai_server.requests == []


def test_template_fields_allow_format_specs_and_escaped_braces():
    assert llm.template_fields("{a!r} {b:.5} {c[0]} {{not}} {a}") == ("a", "b", "c")


def test_no_api_key_is_an_error_before_any_request(openai_server, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(llm.MissingAPIKey, match="no OpenAI API key: pass api_key=, set OPENAI_API_KEY"):
        pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", **FAST)
    assert openai_server.requests == []


def test_the_key_and_endpoint_come_from_a_dotenv_file_without_touching_the_environment(openai_server, monkeypatch,
                                                                                       tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY=sk-from-dotenv-123456\nOPENAI_BASE_URL={openai_server.base_url}\n")
    monkeypatch.chdir(tmp_path)
    out = pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", **FAST)
    assert out["answer"].tolist() == ["Say a"]
    assert openai_server.requests[0].authorization == "Bearer sk-from-dotenv-123456"
    assert "OPENAI_API_KEY" not in os.environ


def test_result_columns_that_exist_need_overwrite(openai_server):
    df = pd.DataFrame({"text": ["a"], "answer_cost_usd": [0.0]})
    with pytest.raises(OptionsError, match="already has a column 'answer_cost_usd'"):
        df.modal.llm("Say {text}", **FAST)
    out = df.modal.llm("Say {text}", overwrite=True, **FAST)
    assert out["answer_cost_usd"].iloc[0] > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"rpm": 0}, "rpm=0 is not valid"),
    ({"max_tokens": 2.5}, "max_tokens=2.5 is not valid"),
    ({"temperature": 3}, "temperature=3 is not valid"),
    ({"budget_usd": 1, "model": "llama3"}, "budget_usd= needs the price of 'llama3'"),
    ({"schema": int}, "schema=<class 'int'> is not valid"),
    ({"backend": "modal:app/fn"}, "use backend='modal'"),
    ({"max_container": 3}, "did you mean 'max_containers'"),
    ({"processes": 0}, "processes=0 is not valid: expected a whole number of at least 1"),
    ({"processes": 2, "backend": "threads"}, "processes=2 spreads the requests over local worker processes, "
                                             "which needs backend='local'"),
    ({"processes": 2, "backend": "modal", "secrets": ["s"]}, "on Modal, max_containers= sets how many containers"),
])
def test_bad_arguments_are_refused_before_any_request(openai_server, kwargs, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", **kwargs, **FAST)
    assert openai_server.requests == []


# --- the key never shows -------------------------------------------------------------------------------


def test_the_key_never_appears_in_errors_reprs_pickles_or_fingerprints(openai_server, monkeypatch):
    seen = capture_row_functions(monkeypatch)
    df = pd.DataFrame({"text": ["[[fail=401]] hello", "fine"]})
    out = df.modal.llm("Say {text}", **FAST)

    error = out["answer_error"].iloc[0]
    assert error.startswith("AuthenticationError: 401 from http://127.0.0.1:")
    assert "Incorrect API key provided: ***" in error
    assert out["answer"].iloc[1] == "Say fine"
    assert openai_server.requests[0].authorization == f"Bearer {TEST_KEY}"  # the server did echo it back
    details = out.modal.errors()
    for text in (str(error), error.message, error.traceback, repr(error.exception), str(error.exception),
                 details.to_string(), repr(out), repr(seen[0]), repr(seen[0].session())):
        assert TEST_KEY not in text
    assert error.exception.__context__ is None and error.exception.__cause__ is None
    assert TEST_KEY.encode() not in cloudpickle.dumps(seen[0])
    assert TEST_KEY.encode() not in cloudpickle.dumps(out)
    with pytest.raises(TypeError, match="never pickled"):
        cloudpickle.dumps(seen[0].session())


@pytest.mark.parametrize("processes", [1, 2])
def test_a_base_urls_credentials_appear_in_nothing_a_user_sees(openai_server, monkeypatch, capsys, caplog, recwarn,
                                                              processes):
    import logging

    caplog.set_level(logging.DEBUG)
    seen = capture_row_functions(monkeypatch)
    host = openai_server.base_url.removeprefix("http://").removesuffix("/v1")
    password, query_key = "hunter2-PASSWORD", "QUERY-SECRET-42"
    base_url = f"http://someone:{password}@{host}/v1?api_key={query_key}&api-version=2024-06-01"
    unreachable = f"http://someone:{password}@127.0.0.1:9/v1?api_key={query_key}"
    df = pd.DataFrame({"text": ["[[fail=401]] a", "[[fail=500]] b", "[[fail=400]] c", "fine"]})
    out = df.modal.llm("Say {text}", base_url=base_url, max_retries=0, processes=processes, progress=True)
    down = df.iloc[3:].modal.llm("Say {text}", base_url=unreachable, max_retries=0, processes=processes, progress=True)
    assert out["answer"].iloc[3] == "Say fine"  # the endpoint was reached, credentials and all
    assert {r.body.get("model") for r in openai_server.requests} == {"gpt-4o-mini"}
    assert out["answer_error"].iloc[0].startswith(f"AuthenticationError: 401 from http://***@{host}/v1?api_key=***&api-version=2024-06-01")
    assert down["answer_error"].iloc[0].startswith("APIConnectionError: the request to http://***@127.0.0.1:9/v1?api_key=*** failed")
    options = llm.LLMOptions.create(base_url=base_url, api_key="sk-options-key-123456")
    shown = [repr(options), str(options), capsys.readouterr().out, capsys.readouterr().err, caplog.text,
             " ".join(str(w.message) for w in recwarn), repr(seen[0]), repr(seen[0].session()),
             repr(seen[0].request), str(modal_magic.last_run())]
    for frame in (out, down):
        details = frame.modal.errors()
        shown += [frame.to_string(), details.to_string(), *details["message"], *details["traceback"],
                  *(str(e) for e in details["exception"]), *(repr(e) for e in details["exception"])]
    assert len(shown) > 20
    for text in shown:
        # user-info goes out as "Authorization: Basic base64(user:password)", which a 401 may echo
        basic = base64.b64encode(f"someone:{password}".encode()).decode()
        for secret in (password, query_key, "sk-options-key-123456", basic):
            assert secret not in text


def test_errors_from_worker_processes_keep_their_exceptions_through_a_pickle(openai_server, tmp_path):
    # Issue 13: after processes=2, LLM exceptions were instances of by-value copies of their classes,
    # which pickle refused ("not the same object as _rebuild_error"): a saved frame lost them.
    df = pd.DataFrame({"text": ["[[fail=400]] a", "[[fail=401]] b", None, "product: kettle [[malformed]]",
                                "product: mug"]})
    out = df.modal.llm("Extract from: {text}", schema=Complaint, into="x", max_retries=0, processes=2,
                       max_containers=2, retries=0, **FAST)
    expected = {0: (llm_row.APIStatusError, "400 from"), 1: (llm_row.AuthenticationError, "401 from"),
                2: (llm_row.MissingValue, "column 'text' is empty"),
                3: (llm_row.SchemaValidationError, "the answer doesn't match Complaint")}

    def check(frame):
        details = frame.modal.errors()
        assert sorted(details.index) == sorted(expected)
        for position, (cls, start) in expected.items():
            exception = details.loc[position, "exception"]
            assert type(exception) is cls and str(exception).startswith(start), (position, exception)
        assert details.loc[1, "exception"].status == 401 and details.loc[3, "exception"].row_usage[0] > 0

    check(out)
    again = pickle.loads(pickle.dumps(out))
    check(again)
    assert again["x_error"].tolist() == out["x_error"].tolist()
    saved = tmp_path / "out.pkl"
    saved.write_bytes(pickle.dumps(out))
    script = textwrap.dedent(f"""
        import pickle, modal_magic
        out = pickle.loads(open({str(saved)!r}, "rb").read())
        for position, e in out.modal.errors()["exception"].items():
            print(position, type(e).__module__, type(e).__name__, getattr(e, "status", None), str(e)[:8])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "0 modal_magic.llm.row.failures APIStatusError 400 400 from",
        "1 modal_magic.llm.row.failures AuthenticationError 401 401 from",
        "2 modal_magic.llm.row.failures MissingValue None column '",
        "3 modal_magic.llm.row.failures SchemaValidationError None the answ",
    ]


def test_errors_from_modal_containers_keep_their_exceptions_through_a_pickle(openai_server, modal_server,
                                                                            monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    modal_server.add_secret("openai-secret", {"OPENAI_API_KEY": "sk-modal-secret-1234"})
    df = pd.DataFrame({"text": ["[[fail=400]] a", "fine"]})
    out = df.modal.llm("Say {text}", backend="modal", secrets=["openai-secret"], base_url=openai_server.base_url,
                       max_retries=0, **FAST)
    for frame in (out, pickle.loads(pickle.dumps(out))):
        exception = frame.modal.errors().loc[0, "exception"]
        assert type(exception) is llm_row.APIStatusError and exception.status == 400


# --- rate limits ---------------------------------------------------------------------------------------


def no_sooner_than_the_limiter_allows(arrivals: list[float], began: float, interval: float) -> bool:
    """Whether the k-th request (0-based) reached the server no sooner than ``k * interval`` after ``began``.

    The rate limiter starts each request at least ``interval`` after the one before, and the
    server records a request only after it was sent: a busy machine can bunch what the server
    sees by delivering some late, but never make the k-th one arrive early. So this holds on any
    machine however loaded, and fails whenever requests go out faster than the limit.
    """
    return all(t >= began + k * interval - 1e-6 for k, t in enumerate(sorted(arrivals)))


@pytest.mark.slow
def test_requests_per_minute_are_held_across_every_request_in_flight(openai_server):
    df = pd.DataFrame({"text": [f"row {i}" for i in range(20)]})
    began = time.monotonic()
    out = df.modal.llm("Say {text}", rpm=600, max_containers=64, **FAST)  # every row in flight at once
    assert out["answer_error"].isna().all()
    arrivals = [r.t for r in openai_server.requests]
    assert len(arrivals) == 20
    assert no_sooner_than_the_limiter_allows(arrivals, began, 0.1)  # 600 rpm: one every 0.1 s


@pytest.mark.slow
def test_tokens_per_minute_are_held(openai_server):
    # Each request books 18 tokens before it is sent (5 for its prompt, 8 for the chat format, 5 of
    # max_tokens), and the server reports 20 used: at 2,400 tpm, 40 tokens a second, each request
    # holds the next one back 0.45 s at least.
    df = pd.DataFrame({"text": [f"[[usage=15,5]] {i}" for i in range(5)]})
    began = time.monotonic()
    out = df.modal.llm("Say {text}", tpm=2400, max_tokens=5, **FAST)
    assert out["answer_tokens_in"].tolist() == [15] * 5
    assert no_sooner_than_the_limiter_allows([r.t for r in openai_server.requests], began, 0.45)


def test_rate_limiter_spacing_on_a_fake_clock():
    now = [0.0]
    limiter = llm_row.RateLimiter(rpm=120, tpm=600, clock=lambda: now[0])  # 2 requests, 10 tokens a second
    assert limiter.reserve(5) == 0.0
    assert limiter.reserve(5) == 0.5  # the request spacing decides
    assert limiter.reserve(20) == 1.0  # the last request's tokens (5 = 0.5 s) decide
    assert limiter.reserve(1) == 3.0  # 20 tokens take 2 s of the token schedule
    limiter.settle(1, 11)  # it used 10 more than booked: one more second
    now[0] = 3.0
    limiter.pause(5.0)  # Retry-After holds everyone
    assert limiter.reserve(1) == 8.0


def fake_time(oversleep: list[float]):
    """A clock and a sleep for a RateLimiter: each sleep moves the clock, late by ``oversleep``'s next item."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds + (oversleep.pop(0) if oversleep else 0.0)
        await asyncio.sleep(0)

    return now, sleep


def test_a_loop_that_wakes_late_doesnt_send_the_requests_that_were_due_all_at_once():
    # A busy machine held the event loop up for a second while 20 requests waited at 600 rpm.
    now, sleep = fake_time(oversleep=[1.0])
    limiter = llm_row.RateLimiter(rpm=600, tpm=None, clock=lambda: now[0], sleep=sleep)
    started: list[float] = []

    async def request() -> None:
        await limiter.acquire(10)
        started.append(now[0])

    async def run() -> None:
        await asyncio.gather(*(request() for _ in range(20)))

    asyncio.run(run())
    assert started[:3] == pytest.approx([0.0, 1.1, 1.2])  # the one that overslept goes late, the next a slot after
    assert min(b - a for a, b in zip(started, started[1:])) >= 0.1 - 1e-9
    assert max_in_window(started, 1.0) <= 11  # the limiter's promise, on its own clock


def test_a_request_waiting_for_its_slot_is_moved_by_what_the_one_before_used_and_by_retry_after():
    now, sleep = fake_time(oversleep=[])
    limiter = llm_row.RateLimiter(rpm=None, tpm=600, clock=lambda: now[0], sleep=sleep)  # 10 tokens a second
    started: list[tuple[str, float]] = []

    async def request(name: str, booked: int, used: int | None) -> None:
        await limiter.acquire(booked)
        started.append((name, now[0]))
        if used is not None:
            await asyncio.sleep(0)  # the answer comes while the next request waits
            limiter.settle(booked, used)

    async def run() -> None:
        first = asyncio.ensure_future(request("a", 10, 20))  # booked 1 s of tokens, used 2 s
        await asyncio.sleep(0)
        await asyncio.gather(first, request("b", 10, None))
        limiter.pause(5.0)  # a 429's Retry-After of 5 s, at 2 s: everyone waits until 7 s
        await request("c", 1, None)

    asyncio.run(run())
    assert started == [("a", 0.0), ("b", 2.0), ("c", 7.0)]


def test_retry_after_is_read_in_every_form():
    assert llm_row.retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert llm_row.retry_after_s({"retry-after": "1.5"}) == 1.5
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < llm_row.retry_after_s({"retry-after": http_date}) <= 30
    assert llm_row.retry_after_s({"retry-after": "soon"}) is None


# --- retries -------------------------------------------------------------------------------------------


def test_a_429_is_retried_after_the_wait_it_asks_for_and_the_row_succeeds(openai_server):
    df = pd.DataFrame({"text": ["[[fail=429 times=1 retry_after=0.5]] great stuff",
                                "[[fail=429 times=2 retry_after_ms=200]] awful stuff", "plain"]})
    out = df.modal.llm(CLASSIFY, into="label", **FAST)
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert out["label_error"].isna().all()
    first = openai_server.requests_for("retry_after=0.5")
    assert [r.status for r in first] == [429, 200]
    assert first[1].t - first[0].t >= 0.5
    second = openai_server.requests_for("retry_after_ms=200")
    assert [r.status for r in second] == [429, 429, 200]
    assert all(b.t - a.t >= 0.2 for a, b in zip(second, second[1:]))


def test_server_errors_are_retried(openai_server, monkeypatch):
    monkeypatch.setattr(llm_row.limits, "BACKOFF_FIRST_S", 0.01)
    df = pd.DataFrame({"text": ["[[fail=500 times=2]] a", "[[fail=503 times=1 retry_after=0.05]] b"]})
    out = df.modal.llm("Say {text}", **FAST)
    assert out["answer_error"].isna().all()
    assert [r.status for r in openai_server.requests_for("fail=500")] == [500, 500, 200]
    assert [r.status for r in openai_server.requests_for("fail=503")] == [503, 200]


def test_a_request_that_keeps_failing_is_its_rows_error_and_no_row_is_lost(openai_server, monkeypatch):
    monkeypatch.setattr(llm_row.limits, "BACKOFF_FIRST_S", 0.01)
    df = pd.DataFrame({"text": ["[[fail=429 retry_after=0.01]] a", "[[fail=500]] b", "[[fail=400]] c",
                                "[[fail=429 code=insufficient_quota]] d", "e"]})
    out = df.modal.llm("Say {text}", max_retries=2, **FAST)
    assert len(out) == 5
    errors = out["answer_error"].tolist()
    assert errors[0].startswith("RateLimitError: 429 from ") and errors[0].endswith("(after 3 attempts)")
    assert errors[1].startswith("InternalServerError: 500 from ") and errors[1].endswith("(after 3 attempts)")
    assert errors[2].startswith("APIStatusError: 400 from ") and errors[2].endswith("(not retried)")
    assert errors[3].startswith("RateLimitError: 429") and errors[3].endswith("(not retried)")
    assert errors[4] is None and out["answer"].iloc[4] == "Say e"
    assert errors[0].exception.attempts == 3 and errors[0].exception.status == 429
    assert [e.attempts for e in errors[:4]] == [3, 3, 1, 1], "the row's attempts count its HTTP tries"
    assert len(openai_server.requests_for("] a")) == 3
    assert len(openai_server.requests_for("] b")) == 3
    assert len(openai_server.requests_for("] c")) == 1
    assert len(openai_server.requests_for("] d")) == 1


def test_an_unreachable_endpoint_fails_every_row_with_a_connection_error(monkeypatch):
    monkeypatch.setattr(llm_row.limits, "BACKOFF_FIRST_S", 0.01)
    out = pd.DataFrame({"text": ["a", "b"]}).modal.llm("Say {text}", base_url="http://127.0.0.1:9/v1",
                                                       api_key="sk-x", max_retries=1, **FAST)
    assert out["answer"].isna().all()
    assert all(e.startswith("APIConnectionError: the request to http://127.0.0.1:9/v1 failed")
               and e.endswith("(after 2 attempts)") for e in out["answer_error"])
    assert out.columns.tolist() == ["text", "answer", "answer_tokens_in", "answer_tokens_out", "answer_cost_usd",
                                    "answer_error"]
    assert str(out["answer_tokens_in"].dtype) == "Int64"


@pytest.mark.parametrize("processes", [1, 2])
def test_a_slow_request_meets_the_row_timeout(openai_server, processes):
    # In a fresh process, start-up (importing the HTTP transport, making the client, starting the
    # worker processes) happens before any row's clock starts: the fast row's 2 s are its request's.
    df = pd.DataFrame({"text": ["[[latency=5]] slow", "fast"]})
    out = df.modal.llm("Say {text}", timeout=2, processes=processes, **FAST)
    assert out["answer_error"].tolist() == ["TimeoutError: the row ran longer than timeout=2s", None]
    assert out["answer"].tolist()[1] == "Say fast"


# --- budget --------------------------------------------------------------------------------------------


def test_the_budget_stops_new_requests_keeps_answered_rows_and_errors_the_rest(openai_server):
    # $1 per input token; every answer reports 10 input tokens: $10 a row. Before sending, a row books
    # its worst case: "Say [[usage=10,1]] 0" is 20 bytes, "user" 4, plus 8 + 16 for the chat format: $48.
    df = pd.DataFrame({"text": [f"[[usage=10,1]] {i}" for i in range(8)]})
    out = df.modal.llm("Say {text}", model="test-model", prices={"test-model": (1_000_000, 0)}, budget_usd=75,
                       max_tokens=1, max_containers=1, **FAST)
    assert len(out) == 8
    assert out["answer"].notna().tolist() == [True] * 3 + [False] * 5
    assert out["answer_cost_usd"].iloc[:3].tolist() == [10.0] * 3
    assert len(openai_server.requests) == 3
    message = ("BudgetExceeded: budget_usd=75.00: $30.00 spent, and the next request could cost up to $48.00 "
               "(48 prompt tokens at most + 1 output tokens (max_tokens)), which would pass it")
    assert all(e.startswith(message) for e in out["answer_error"].iloc[3:])
    assert out.modal.errors()["type"].tolist() == ["BudgetExceeded"] * 5


def test_the_budget_holds_with_many_requests_in_flight_and_a_rerun_pays_only_for_the_rest(openai_server):
    df = pd.DataFrame({"text": [f"[[usage=10,1]] {i}" for i in range(40)]})
    kwargs = dict(model="test-model", prices={"test-model": (1_000_000, 0)}, max_tokens=1, max_containers=16, **FAST)
    out = df.modal.llm("Say {text}", budget_usd=105, **kwargs)
    done = int(out["answer"].notna().sum())
    assert 0 < done < 40 and out["answer_cost_usd"].sum() <= 105
    assert len(openai_server.requests) == done
    rest = df.modal.llm("Say {text}", budget_usd=1000, **kwargs)
    assert rest["answer_error"].isna().all()
    assert len(openai_server.requests) == 40  # the answered rows came from the cache


def test_processes_send_the_requests_from_worker_processes_each_with_its_share_of_the_limits(openai_server,
                                                                                           capsys):
    openai_server.find_senders = True
    df = pd.DataFrame({"text": [f"{review} ({i})" for i in range(2) for review in REVIEWS]})
    began = time.monotonic()
    out = df.modal.llm(CLASSIFY, into="label", rpm=120, processes=3, max_containers=6, progress=True)
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"] * 2
    assert out["label_error"].isna().all() and out["label_cost_usd"].gt(0).all()
    requests = openai_server.requests
    assert {r.authorization for r in requests} == {f"Bearer {TEST_KEY}"}
    senders = {r.sender_pid for r in requests}
    assert len(senders) == 3 and os.getpid() not in senders  # three worker processes, never the kernel
    # Each process may send 40 a minute, one every 1.5 s (with all of rpm=120, one every 0.5 s):
    # whatever the machine's load, no process's second request reaches the server sooner than 1.5 s in.
    for pid in senders:
        arrivals = sorted(r.t for r in requests if r.sender_pid == pid)
        assert no_sooner_than_the_limiter_allows(arrivals, began, 1.5), pid
    # The bar adds up what the workers' rows used, as they come back.
    tokens = int(out["label_tokens_in"].sum() + out["label_tokens_out"].sum())
    assert f"{tokens:,} tokens" in capsys.readouterr().err


def test_with_processes_the_workers_share_one_budget_and_no_row_is_lost(openai_server, monkeypatch):
    seen = capture_row_functions(monkeypatch)
    df = pd.DataFrame({"text": [f"[[usage=10,1]] {i}" for i in range(16)]})
    out = df.modal.llm("Say {text}", model="test-model", prices={"test-model": (1_000_000, 0)}, budget_usd=150,
                       max_tokens=1, max_containers=2, processes=2, **FAST)
    # $10 a row and $48 booked before sending, in one ledger both processes book into: a request is
    # sent while what was spent, plus what is in flight, plus its $48 fits in $150, and none is
    # once $110 is spent ($110 + $48 > $150). Whether the last one fits depends on what is in flight.
    answered = int(out["answer"].notna().sum())
    assert 10 <= answered <= 11 and out["answer_cost_usd"].sum() == 10 * answered
    assert len(openai_server.requests) == answered
    errors = out["answer_error"].dropna()
    assert errors.str.startswith("BudgetExceeded: budget_usd=150.00: $1").all() and len(errors) == 16 - answered
    worker_row = seen[0].for_workers()
    assert TEST_KEY not in repr(worker_row) and TEST_KEY.encode() not in cloudpickle.dumps(seen[0])


def test_a_worker_killed_mid_run_cant_take_the_run_past_its_budget(openai_server):
    """Issue 13: a worker process that died was replaced with a fresh share of the budget."""
    openai_server.latency_s = 0.3
    df = pd.DataFrame({"text": [f"[[long=2000]] {i}" for i in range(40)]})
    killed: list[int] = []
    killer = _kill_a_child_talking_to(openai_server, after_requests=6, killed=killed)
    # $0.0012 a request at most (2,000 output tokens), so $0.012 pays for nine. One request at a
    # time per worker: when the sixth arrives, each has sent three. A replacement starting a fresh
    # half of the budget (four requests) would take the run to eleven.
    out = df.modal.llm("Say {text}", model="gpt-4o-mini", max_tokens=2000, budget_usd=0.012, processes=2,
                       max_containers=2, **FAST)
    killer.join()
    assert killed, "no worker was killed"
    billed = billed_usd(openai_server)  # what the server answered, the killed worker's requests included
    assert billed <= 0.012, f"spent ${billed:.4f} of a $0.012 budget"
    assert out["answer"].notna().sum() >= 5
    errors = out["answer_error"].dropna().astype(str)
    crashed = errors.str.startswith("WorkerCrashed: the worker process running this row was killed by SIGKILL")
    assert crashed.sum() <= 2  # what the killed worker was sending
    assert errors[~crashed].str.startswith("BudgetExceeded: budget_usd=0.012: $").all()


def test_a_dead_processs_bookings_in_the_shared_budget_count_as_spent(tmp_path):
    from modal_magic.llm.row.ledger import SharedBudget, new_ledger

    path = new_ledger()
    try:
        booker = textwrap.dedent(f"""
            import asyncio, os
            from modal_magic.llm.row.ledger import SharedBudget
            asyncio.run(SharedBudget(0.10, {path!r}).acquire(0.06))
            os._exit(0)  # dies with its request in flight: never settled
        """)
        subprocess.run([sys.executable, "-c", booker], check=True, timeout=60)
        budget = SharedBudget(0.10, path)
        with pytest.raises(llm_row.BudgetExceeded, match=r"budget_usd=0.10: \$0.06 spent, and the next request could "
                                                         r"cost up to \$0.05"):
            asyncio.run(budget.acquire(0.05))
        assert json.loads(open(path).read()) == {"committed": 0.06, "in_flight": {}}
    finally:
        os.unlink(path)


def billed_usd(server, price: tuple[float, float] = (0.15, 0.60)) -> float:
    """What the test server billed for every request it answered, at ``price`` (USD per million)."""
    return sum(r.tokens_in * price[0] + r.tokens_out * price[1] for r in server.requests if r.status == 200) / 1e6


@pytest.mark.parametrize("processes", [1, 2])
def test_the_budget_is_a_hard_cap_with_long_answers_and_64_requests_in_flight(openai_server, monkeypatch,
                                                                               processes):
    # Issue 13: 2,000-token answers without max_tokens, 64 in flight, spent $0.0315 of a $0.01 budget.
    # Each request now books gpt-4o-mini's 16,384 output tokens ($0.0098) before it is sent.
    seen = capture_row_functions(monkeypatch)
    df = pd.DataFrame({"text": [f"[[long=2000]] {i}" for i in range(64)]})
    out = df.modal.llm("Say {text}", model="gpt-4o-mini", budget_usd=0.03, max_containers=64,
                       processes=processes, **FAST)
    billed = billed_usd(openai_server)
    assert 0 < billed <= 0.03
    answered = int(out["answer"].notna().sum())
    assert answered >= 4 and answered == len(openai_server.requests)  # 2,000 tokens of output: $0.0012 a row
    assert out["answer_cost_usd"].sum() == pytest.approx(billed)
    meter = seen[0].runtime().meter
    assert meter.cost_usd == pytest.approx(billed) and modal_magic.last_run().cost_usd == pytest.approx(billed)
    errors = out["answer_error"].dropna()
    assert len(errors) == 64 - answered
    assert errors.str.startswith("BudgetExceeded: budget_usd=0.03: $").all()  # one budget, whatever the processes
    assert errors.str.contains(r"16,384 output tokens \(gpt-4o-mini's most, as max_tokens is not set\)").all()


@pytest.mark.parametrize("processes", [1, 2])
def test_the_budget_is_a_hard_cap_with_large_prompts(openai_server, processes):
    # Issue 13: prompts the server counted at 20,000 tokens spent $0.19. An 80,000-byte prompt books
    # 80,000 tokens at most ($0.012 at gpt-4o-mini's $0.15 a million) and is billed 20,004 ($0.003).
    big = "x" * 80_000
    df = pd.DataFrame({"text": [f"{big} {i}" for i in range(32)]})
    out = df.modal.llm("{text}", model="gpt-4o-mini", budget_usd=0.05, max_tokens=5, max_containers=32,
                       processes=processes, **FAST)
    billed = billed_usd(openai_server)
    assert billed <= 0.05 and modal_magic.last_run().cost_usd == pytest.approx(billed)
    assert {r.tokens_in for r in openai_server.requests} == {20_004}
    assert out["answer"].notna().sum() >= 4
    assert out["answer_error"].dropna().str.contains("80,0[0-9][0-9] prompt tokens at most").all()


def test_the_budget_books_a_worst_case_no_openai_tokenizer_can_pass():
    # A token of OpenAI's byte-level BPE is at least one byte of UTF-8: the byte count bounds any text.
    texts = ["hello world", "héllo wörld ünïcode", "数据科学家", "🙂🙃" * 10, "a" * 1000, ""]
    for text in texts:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
        assert llm_row.prompt_tokens_bound(body) >= len(text.encode()) + 4 + 3 + 3
    schema = {"model": "m", "messages": [{"role": "user", "content": "x"}],
              "response_format": {"type": "json_schema", "json_schema": {"name": "Complaint", "schema": {}}}}
    assert llm_row.prompt_tokens_bound(schema) > len(json.dumps(schema["response_format"]))
    assert llm.max_output_for("gpt-4o-mini") == 16_384 and llm.max_output_for("some-new-model") == 128_000


def test_a_budget_share_never_adds_up_to_more_than_the_whole():
    for budget in (0.01, 1 / 3, 70.0, 0.0000007):
        for ways in (1, 2, 3, 7, 64):
            assert llm_row.Limits(budget_usd=budget).share(ways).budget_usd * ways <= budget


def test_a_request_that_doesnt_fit_yet_waits_for_those_in_flight_and_one_that_never_fits_is_refused():
    budget = llm_row.Budget(1.0)
    order: list[str] = []

    async def request(name: str, worst: float, actual: float, hold: float) -> None:
        try:
            await budget.acquire(worst)
        except llm_row.BudgetExceeded:
            order.append(f"{name} refused")
            return
        order.append(f"{name} sent")
        await asyncio.sleep(hold)
        budget.settle(worst, actual)

    async def run():
        await asyncio.gather(request("a", 0.6, 0.1, 0.05), request("b", 0.6, 0.5, 0.05),
                             request("c", 0.6, 0.0, 0.0))

    asyncio.run(run())
    # b waits for a ($0.10 spent + $0.60 fits); c then waits for b, and can never fit ($0.60 + $0.60).
    assert order == ["a sent", "b sent", "c refused"]
    assert budget.spent_usd == pytest.approx(0.6) and budget.in_flight_usd == 0


def test_a_request_cancelled_in_flight_counts_at_its_worst_case():
    budget = llm_row.Budget(1.0)

    async def run():
        await budget.acquire(0.4)
        budget.settle(0.4, 0.4)  # what a try cancelled after it went out settles at
        await budget.acquire(0.4)
        budget.settle(0.4, 0.1)
        with pytest.raises(llm_row.BudgetExceeded, match=r"\$0.50 spent, and the next request could cost up to \$0.60"):
            await budget.acquire(0.6)

    asyncio.run(run())
    assert budget.spent_usd == pytest.approx(0.5) and budget.in_flight_usd == 0


# --- structured output -----------------------------------------------------------------------------------


def test_a_pydantic_schema_gives_one_column_per_field(openai_server):
    df = pd.DataFrame({"text": ["product: kettle, complaint: leaks water, it is high", "product: lamp"]})
    out = df.modal.llm("Extract from: {text}", schema=Complaint, into="x", **FAST)
    assert out.columns.tolist() == ["text", "product", "complaint", "severity", "x_tokens_in", "x_tokens_out",
                                    "x_cost_usd", "x_error"]
    assert out["product"].tolist() == ["kettle", "lamp"]
    assert out["complaint"].tolist() == ["leaks water", "unknown"]
    assert out["severity"].tolist() == ["high", "low"]
    fmt = openai_server.requests[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Complaint"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["additionalProperties"] is False


def test_a_schema_pydantic_cannot_describe_is_refused_before_any_request(openai_server):
    from typing import Callable

    class Bad(BaseModel):
        how: Callable[[int], int]

    with pytest.raises(OptionsError, match=r"schema=Bad can't be sent as a JSON schema: PydanticInvalidForJsonSchema"):
        pd.DataFrame({"text": ["a"]}).modal.llm("Say {text}", schema=Bad, **FAST)
    assert openai_server.requests == []


def test_an_answer_that_breaks_the_schema_is_its_rows_error_and_retries_ask_again(openai_server):
    df = pd.DataFrame({"text": ["[[malformed]] product: a", "[[malformed times=1]] product: b", "product: c"]})
    out = df.modal.llm("Extract from: {text}", schema=Complaint, retries=1, **FAST)
    assert out["product"].tolist()[1:] == ["b", "c"] and pd.isna(out["product"].iloc[0])
    error = out["answer_error"].iloc[0]
    assert error.startswith("SchemaValidationError: the answer doesn't match Complaint: Invalid JSON: EOF while parsing")
    assert error.attempts == 2
    assert len(openai_server.requests_for("product: b")) == 2
    # The broken answer was still paid for: the bar's meter counts it.
    assert out["answer_tokens_in"].notna().sum() == 2


def test_a_json_schema_dict_is_validated(openai_server):
    schema = {"title": "Facts", "type": "object",
              "properties": {"sentiment": {"type": "string", "enum": ["POSITIVE", "NEGATIVE", "NEUTRAL"]},
                             "words": {"type": "integer", "minimum": 3}},
              "required": ["sentiment", "words"]}
    df = pd.DataFrame({"text": ["great great product", "awful"]})
    out = df.modal.llm("{text}", schema=schema, **FAST)
    assert out["sentiment"].tolist()[0] == "POSITIVE"
    assert out["words"].iloc[0] == 3
    assert out["answer_error"].iloc[1].startswith("SchemaValidationError: the answer doesn't match Facts: 1 is less "
                                                   "than the minimum of 3")


# --- the row function off this machine -----------------------------------------------------------------


def test_the_row_function_travels_by_value_without_modal_magic_or_the_key(openai_server, monkeypatch):
    """Pickled as Modal ships it, it runs where modal_magic can't be imported, with the key from that environment."""
    seen = capture_row_functions(monkeypatch)
    pd.DataFrame({"text": ["x"]}).modal.llm(CLASSIFY, into="label", rpm=1200, max_containers=2, max_tokens=10, **FAST)
    assert pickle.loads(pickle.dumps(seen[0])).limits.rpm is None  # a local run's pickle is only its identity
    llm._RUNTIMES[seen[0]].on_modal = True  # as for backend="modal": the containers' share of the limits travels
    cloudpickle.register_pickle_by_value(llm_row)
    try:
        payload = cloudpickle.dumps(seen[0])
    finally:
        cloudpickle.unregister_pickle_by_value(llm_row)
    assert TEST_KEY.encode() not in payload
    script = textwrap.dedent("""
        import asyncio, pickle, sys
        sys.modules["modal_magic"] = None  # as in a container without it: any import of it fails
        row = pickle.loads(sys.stdin.buffer.read())
        print(type(row).__name__, row.limits.rpm)
        print(asyncio.run(row("So great, I love it")))
    """)
    env = {**os.environ, **openai_env(openai_server, key="sk-container-key-0000")}
    done = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "ContainerRow 600.0"
    assert "'label': 'POSITIVE'" in lines[1] and "'label_tokens_in': " in lines[1]
    assert openai_server.requests[-1].authorization == "Bearer sk-container-key-0000"


def test_on_modal_the_key_comes_from_a_secret_inside_the_container(openai_server, modal_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    modal_server.add_secret("openai-secret", {"OPENAI_API_KEY": "sk-modal-secret-1234",
                                              "OPENAI_BASE_URL": openai_server.base_url})
    df = pd.DataFrame({"text": REVIEWS * 2})
    out = df.modal.llm(CLASSIFY, into="label", backend="modal", secrets=["openai-secret"], max_containers=2,
                       rpm=1200, **FAST)
    assert out["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"] * 2
    assert out["label_error"].isna().all() and out["label_cost_usd"].gt(0).all()
    assert {r.authorization for r in openai_server.requests} == {"Bearer sk-modal-secret-1234"}
    function = modal_server.last_function
    assert function["secret_names"] == ["openai-secret"]
    assert any(p.startswith("openai==") for p in function["pip_packages"])
    assert function["max_containers"] == 2


def test_on_modal_the_bar_adds_up_tokens_and_cost_as_rows_come_back(openai_server, modal_server, monkeypatch,
                                                                     capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    modal_server.add_secret("openai-secret", {"OPENAI_API_KEY": "sk-modal-secret-1234"})
    df = pd.DataFrame({"text": ["product: kettle", "[[malformed]] product: lamp", "product: mug"]})
    out = df.modal.llm("Extract from: {text}", schema=Complaint, into="x", backend="modal", secrets=["openai-secret"],
                       base_url=openai_server.base_url, progress=True)
    assert out["x_error"].notna().tolist() == [False, True, False]
    # Every answer was paid for, the one that broke the schema too: the bar counts what the server billed.
    billed = sum(r.tokens_in + r.tokens_out for r in openai_server.requests)
    assert billed > out["x_tokens_in"].sum() + out["x_tokens_out"].sum()
    err = capsys.readouterr().err
    assert f"{billed:,} tokens" in err


MODAL_REFUSAL = (r"budget_usd=0.03: \$0.02 spent, and the next request could cost up to \$0.0098 \(4[0-9] prompt tokens "
                 r"at most \+ 16,384 output tokens \(gpt-4o-mini's most, as max_tokens is not set\)\), which would pass "
                 r"it, so it and the (\d+) rows? after it were not sent. Raise budget_usd, or pass a smaller max_tokens= "
                 r"so that each request books less, and run again: rows already answered are not paid for twice")


def on_modal(openai_server, modal_server, monkeypatch) -> dict:
    """The arguments of an LLM run on the local Modal server, its key in a Modal secret."""
    monkeypatch.delenv("OPENAI_API_KEY")
    modal_server.add_secret("openai-secret", {"OPENAI_API_KEY": "sk-modal-secret-1234"})
    return dict(backend="modal", secrets=["openai-secret"], base_url=openai_server.base_url, model="gpt-4o-mini")


@pytest.mark.timeout(180)
def test_on_modal_the_budget_is_one_hard_cap_booked_batch_by_batch_without_max_containers(openai_server, modal_server,
                                                                                           monkeypatch, capsys):
    # Issue 13: each container had its own share, and a crashed container's replacement a fresh one.
    # Now the kernel books each batch's worst case ($0.0098 a row without max_tokens): three rows of
    # $0.03 in flight at most, so the batches are cut to what fits, whatever max_containers says.
    df = pd.DataFrame({"text": [f"[[long=2000]] {i}" for i in range(24)]})
    out = df.modal.llm("Say {text}", budget_usd=0.03, progress=True, **on_modal(openai_server, modal_server,
                                                                               monkeypatch))
    billed = billed_usd(openai_server)
    assert 0 < billed <= 0.03
    answered = int(out["answer"].notna().sum())
    assert answered == len(openai_server.requests) >= 10  # $0.0012 an answer: the run stops near $0.02
    assert out["answer_cost_usd"].sum() == pytest.approx(billed)
    assert modal_magic.last_run().cost_usd == pytest.approx(billed)
    assert "modal_magic_billed_usd" not in out.columns  # what the rows report to the kernel is no column
    errors = out.modal.errors()
    assert len(errors) == 24 - answered > 0 and set(errors["type"]) == {"BudgetExceeded"}
    after = {int(re.fullmatch(MODAL_REFUSAL, message).group(1)) for message in errors["message"]}
    assert after == {len(errors) - 1}


@pytest.mark.timeout(180)
def test_on_modal_the_budget_is_a_hard_cap_with_large_prompts(openai_server, modal_server, monkeypatch):
    # An 80,000-byte prompt books 80,000 tokens at most ($0.012) and is billed 20,004 ($0.003).
    big = "x" * 80_000
    df = pd.DataFrame({"text": [f"{big} {i}" for i in range(16)]})
    kwargs = dict(max_tokens=5, progress=False, **on_modal(openai_server, modal_server, monkeypatch))
    out = df.modal.llm("{text}", budget_usd=0.03, **kwargs)
    billed = billed_usd(openai_server)
    assert billed <= 0.03 and modal_magic.last_run().cost_usd == pytest.approx(billed)
    assert {r.tokens_in for r in openai_server.requests} == {20_004}
    answered = int(out["answer"].notna().sum())
    assert answered == len(openai_server.requests) >= 4
    messages = out.modal.errors()["message"]
    assert len(messages) and messages.str.match(r"budget_usd=0.03: \$0.0[12] spent, and the next request could cost "
                                                r"up to \$0.01 \(80,0[0-9][0-9] prompt tokens at most \+ 5 output "
                                                r"tokens \(max_tokens\)\)").all()
    # The allotments that travelled with the rows are in no cache key: a bigger budget pays only for the rest.
    rest = df.modal.llm("{text}", budget_usd=1.0, **kwargs)
    assert rest["answer_error"].isna().all() and len(openai_server.requests) == 16


@pytest.mark.timeout(240)
def test_a_modal_container_killed_mid_batch_cant_take_the_run_past_its_budget(openai_server, modal_server,
                                                                             monkeypatch):
    """A container that dies loses its batches: each settles at its whole allotment, and no fresh share starts."""
    openai_server.latency_s = 0.3
    df = pd.DataFrame({"text": [f"[[long=2000]] {i}" for i in range(30)]})
    killed: list[int] = []
    killer = _kill_a_child_talking_to(openai_server, after_requests=3, killed=killed)
    # $0.0012 a request at most (2,000 output tokens), so $0.012 pays for nine.
    out = df.modal.llm("Say {text}", max_tokens=2000, budget_usd=0.012, progress=False,
                       **on_modal(openai_server, modal_server, monkeypatch))
    killer.join()
    assert killed, "no container was killed"
    billed = billed_usd(openai_server)  # what the server answered, the killed container's requests included
    assert billed <= 0.012, f"spent ${billed:.4f} of a $0.012 budget"
    answered = int(out["answer"].notna().sum())
    assert answered >= 3 and out["answer_cost_usd"].sum() <= billed + 1e-12
    errors = out.modal.errors()
    assert len(errors) == 30 - answered  # no row is lost: answered, or failed saying why
    assert set(errors["type"]) <= {"BudgetExceeded", "WorkerCrashed"}
    assert errors["message"][errors["type"] == "BudgetExceeded"].str.startswith("budget_usd=0.012: $").all()


@pytest.mark.timeout(180)
def test_on_modal_retry_failed_spends_from_what_is_left_of_the_budget(openai_server, modal_server, monkeypatch):
    # $0.001207 a request at most; the four answers cost $0.0048, the two 500s nothing, so $0.0014
    # is left: the retry sends one of its two rows and refuses the other.
    df = pd.DataFrame({"text": [f"[[long=2000]] {i}" for i in range(4)] + ["[[fail=500 times=1]] [[long=2000]] a",
                                                                            "[[fail=500 times=1]] [[long=2000]] b"]})
    out = df.modal.llm("Say {text}", max_tokens=2000, budget_usd=0.0062, max_retries=0, progress=False,
                       **on_modal(openai_server, modal_server, monkeypatch))
    assert out["answer"].notna().sum() == 4
    assert out["answer_error"].dropna().str.startswith("InternalServerError: 500").all()
    again = out.modal.retry_failed(into="answer", progress=False)
    assert billed_usd(openai_server) <= 0.0062
    assert again["answer"].notna().sum() == 5
    refused = again.modal.errors()["message"]
    assert len(refused) == 1 and refused.str.match(r"budget_usd=0.0062: \$0.006 spent, and the next request "
                                                   r"could cost up to \$0.0012").all()


def test_the_kernels_account_cuts_batches_to_what_fits_and_counts_a_batch_never_settled_as_spent():
    from modal_magic.backends import Batch, BatchResult
    from modal_magic.llm.allotments import LLMAccount
    from modal_magic.llm.row.allotment import BILLED_KEY

    # $0.40 a row at most (30 prompt tokens + 10 output tokens at $10,000 a million)
    request = llm_row.Request(template="{t}", fields=("t",), model="m", into="a", max_tokens=10, price=(1e4, 1e4))
    account = LLMAccount(request, None, llm_row.Budget(1.0)).start(tries=1)
    rows = [("hi",)] * 4
    assert account.admit(Batch(0, range(4), rows)) == ("book", 2)
    sent = account.book(Batch(7, range(2), rows[:2]))
    assert [arg[0] for arg in sent.args] == ["hi", "hi"] and sent.args[0][1] is sent.args[1][1]
    assert account.admit(Batch(0, range(2, 4), rows[2:])) == ("wait", 0)  # room for one only once 7 settles
    answers = [{"a": "x", BILLED_KEY: 0.1}, {"a": "y", BILLED_KEY: 0.1}]
    account.settle(BatchResult(sent, values=answers))
    assert account.budget.spent_usd == pytest.approx(0.2) and account.budget.in_flight_usd == 0
    assert answers == [{"a": "x"}, {"a": "y"}]  # the rows' reports are no columns
    assert account.admit(Batch(0, range(2, 4), rows[2:])) == ("book", 2)
    # A run stopped with a batch in flight: the next run (retry_failed) counts it as spent, it may have been billed.
    account.book(Batch(8, range(2, 4), rows[2:]))
    account.start(tries=1)
    assert account.budget.spent_usd == pytest.approx(1.0) and account.budget.in_flight_usd == 0
    assert account.admit(Batch(0, [0], rows[:1])) == ("refuse", 0)
    refusal = str(account.refusal(Batch(0, [0, 1], rows[:2]), rows_left=5))
    assert refusal.startswith("budget_usd=1.00: $1.00 spent, and the next request could cost up to $0.40 (30 prompt "
                              "tokens at most + 10 output tokens (max_tokens)), which would pass it, so it and the 4 "
                              "rows after it were not sent. Raise budget_usd")


def test_a_retry_that_no_longer_fits_its_batchs_allotment_fails_its_row_only(openai_server):
    # Inside a container: a try that timed out may have been billed its worst case, so the retry
    # needs a second one, which the batch's allotment (one and a half here) doesn't hold.
    from modal_magic.llm.row.allotment import AllotmentBudget

    request = llm_row.Request(template="Say {text}", fields=("text",), model="gpt-4o-mini", into="answer",
                              max_tokens=2000, price=(0.15, 0.60))
    session = llm_row.Session(request, llm_row.Limits(request_timeout_s=0.3, max_retries=3), llm_row.Meter(True),
                              api_key=TEST_KEY, base_url=openai_server.base_url)
    worst = llm_row.session.row_worst_case(request, ("[[latency=2]] x",), None)[0]
    allotment = AllotmentBudget(worst * 1.5, rows=1)

    async def run() -> None:
        try:
            await session.complete(("[[latency=2]] x",), allotment)
        finally:
            await session.aclose()

    with pytest.raises(llm_row.BudgetExceeded, match=r"this batch's allotment of budget_usd was used: the kernel "
                                                     r"booked \$0.0018 for its 1 row .*its tries have taken "
                                                     r"\$0.0012, and this try could cost up to \$0.0012") as raised:
        asyncio.run(run())
    assert raised.value.row_billed_usd == pytest.approx(worst)  # the try that timed out, reported to the kernel
    assert allotment.spent_usd == pytest.approx(worst) and allotment.stopped is None  # the next row may still go


def test_on_modal_mistakes_are_caught_before_anything_starts(openai_server):
    df = pd.DataFrame({"text": ["a"]})
    with pytest.raises(llm.MissingAPIKey, match=r"secrets=\['openai-secret'\]"):
        df.modal.llm("Say {text}", backend="modal", **FAST)
    with pytest.raises(llm.MissingAPIKey, match="api_key= isn't sent to Modal containers"):
        df.modal.llm("Say {text}", backend="modal", secrets=["openai-secret"], api_key="sk-x", **FAST)
    with pytest.raises(OptionsError, match="set max_containers= too"):
        df.modal.llm("Say {text}", backend="modal", secrets=["openai-secret"], rpm=100, **FAST)


@pytest.mark.parametrize("processes", [1, 2])
def test_no_session_or_client_outlives_its_run(openai_server, monkeypatch, processes):
    import gc
    import weakref

    from modal_magic.llm import function as function_module
    from modal_magic.llm.row import session as session_module

    sessions: list[weakref.ref] = []
    clients: list[weakref.ref] = []
    closed: list[bool] = []
    real_map, real_renew = llm.map_frame, function_module._SessionRecipe.session

    def spy(frame, fn, **kwargs):  # the run's first session, made by llm_frame
        sessions.append(weakref.ref(llm._RUNTIMES[fn].session))
        return real_map(frame, fn, **kwargs)

    def renew(self):  # the sessions made later, e.g. by retry_failed
        session = real_renew(self)
        sessions.append(weakref.ref(session))
        return session

    monkeypatch.setattr(llm, "map_frame", spy)
    monkeypatch.setattr(function_module._SessionRecipe, "session", renew)
    if processes == 1:  # with processes=2 the row package is shipped by value: patches would travel too
        real_make, real_close = session_module.Session._make_client, session_module.Session.aclose

        def make_client(self):
            client = real_make(self)
            clients.append(weakref.ref(client))
            return client

        async def aclose(self):
            closed.append(self._client is not None)
            await real_close(self)

        monkeypatch.setattr(session_module.Session, "_make_client", make_client)
        monkeypatch.setattr(session_module.Session, "aclose", aclose)
    df = pd.DataFrame({"text": ["a", "b", "[[fail=500 times=1]] c"]})
    out = df.modal.llm("Say {text}", max_containers=2, max_retries=0, processes=processes, **FAST)
    assert out["answer_error"].notna().sum() == 1
    retried = out.modal.retry_failed(progress=False)  # the run record keeps the function, for this
    assert retried["answer_error"].isna().all()
    gc.collect()
    assert len(sessions) == (2 if processes == 1 else 1) and all(ref() is None for ref in sessions)
    if processes == 1:
        assert len(clients) == 2 and all(ref() is None for ref in clients)
        assert closed == [True, True]  # each run closed its client before letting it go


def test_one_request_at_a_time_keeps_one_connection_for_the_whole_run(openai_server):
    # Closing the client whenever no row was running reconnected before every row at max_containers=1.
    out = pd.DataFrame({"text": list("abcdef")}).modal.llm("Say {text}", max_containers=1, **FAST)
    assert out["answer"].tolist() == [f"Say {c}" for c in "abcdef"]
    assert len({r.connection for r in openai_server.requests}) == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_retry_failed_runs_the_failed_rows_again(openai_server, processes):
    df = pd.DataFrame({"text": ["[[fail=500 times=1]] a", "b"]})
    out = df.modal.llm("Say {text}", max_retries=0, processes=processes, **FAST)
    assert out["answer_error"].iloc[0].startswith("InternalServerError: 500")
    again = out.modal.retry_failed(into="answer", progress=False)
    assert again["answer_error"].isna().all()
    assert again["answer"].tolist() == ["Say  a", "Say b"]  # the server echoes without its markers


# --- %%modal_llm ---------------------------------------------------------------------------------------


@pytest.fixture
def ip():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.config.ModalMagic.progress = False
    shell.run_line_magic("load_ext", "modal_magic")
    shell.user_ns["reviews"] = pd.DataFrame({"text": REVIEWS})
    yield shell
    atexit.unregister(shell.atexit_operations)
    InteractiveShell.clear_instance()


def test_the_modal_llm_cell_adapter_adds_columns_in_place(openai_server, ip):
    magic = ip.magics_manager.registry["ModalMagic"]
    llm_magic.run_llm_cell(magic, "reviews --into label --max-tokens 10 --max-containers 4", CLASSIFY + "\n")
    reviews = ip.user_ns["reviews"]
    assert reviews.columns.tolist() == ["text", "label", "label_tokens_in", "label_tokens_out", "label_cost_usd",
                                        "label_error"]
    assert reviews["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]
    assert openai_server.requests[0].body["max_tokens"] == 10

    ip.user_ns["Complaint"] = Complaint
    llm_magic.run_llm_cell(magic, "reviews --schema Complaint -o facts --budget-usd 1 --processes 2", "Extract from: {text}")
    assert ip.user_ns["facts"]["severity"].tolist() == ["low", "low", "low"]
    assert "severity" not in ip.user_ns["reviews"].columns


@pytest.mark.parametrize("line, cell, message", [
    ("reviews --into label", "Say {txt}", "no column 'txt'"),
    ("reviewz", "Say {text}", "did you mean reviews?"),
    ("reviews.text", "Say {text}", "the column names go in the prompt"),
    ("reviews --rmp 5", "Say {text}", "did you mean --rpm?"),
    ("reviews --rpm 0", "Say {text}", "--rpm 0.0 is not valid"),
    ("reviews --processes 2 --backend threads", "Say {text}", "--processes 2 spreads the requests"),
    ("reviews --schema Nope", "Say {text}", "nothing named 'Nope'"),
    ("reviews", "   ", "the cell is empty"),
])
def test_modal_llm_mistakes_are_one_line_usage_errors(openai_server, ip, line, cell, message):
    from IPython.core.error import UsageError

    magic = ip.magics_manager.registry["ModalMagic"]
    with pytest.raises(UsageError, match=message.replace("?", r"\?")):
        llm_magic.run_llm_cell(magic, line, cell)
    assert openai_server.requests == []


def test_modal_llm_magic_is_registered(openai_server, ip):
    if "modal_llm" not in ip.magics_manager.magics["cell"]:
        pytest.skip("waiting for magics wiring (ModalMagic.modal_llm -> llm.run_llm_cell)")
    ip.run_cell_magic("modal_llm", "reviews --into label --max-tokens 10", CLASSIFY)
    assert ip.user_ns["reviews"]["label"].tolist() == ["POSITIVE", "NEGATIVE", "NEUTRAL"]


# --- the notebook --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_llm_notebook_classifies_reviews_against_any_openai_compatible_endpoint(openai_server, tmp_path):
    import nbformat

    from tests.notebook_runner import execute_notebook, progress_runs
    from modal_magic.datasets import load_reviews
    from tests.openai_server import answer_for

    source = os.path.join(os.path.dirname(__file__), "..", "notebooks", "llm_classify.ipynb")
    # The kernel inherits OPENAI_BASE_URL / OPENAI_API_KEY (set by the fixture) and the test's cache dir.
    executed, _ = execute_notebook(source, output_path=tmp_path / "llm_classify.ipynb", timeout=120)
    nb = nbformat.read(executed, as_version=4)
    text = nbformat.writes(nb)
    assert TEST_KEY not in text and "OPENAI_API_KEY=" not in text
    outputs = {cell.source.splitlines()[0]: cell.outputs for cell in nb.cells if cell.cell_type == "code"}
    assert not [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]

    prompt = "Classify this review as POSITIVE, NEGATIVE or NEUTRAL. Answer with the label only.\n\nReview: {text}"
    expected: dict[str, int] = {}
    for review in load_reviews().head(300)["text"]:
        label = answer_for({"messages": [{"role": "user", "content": prompt.format(text=review)}]}, {})
        expected[label] = expected.get(label, 0) + 1
    def result(first_line: str) -> str:
        return next(o for o in outputs[first_line] if o.output_type == "execute_result")["data"]["text/plain"]

    counts = result("out.label.value_counts()")
    assert {label: int(n) for label, n in re.findall(r"(?m)^([A-Z]+)\s+(\d+)$", counts)} == expected

    runs = progress_runs(nb)
    assert [r.title for r in runs] == ["label", "facts", "label"]
    assert all(r.value == r.total for r in runs)
    assert runs[0].bar_style == "success" and "tokens" in runs[0].summary and "$" in runs[0].summary
    assert runs[2].bar_style == "warning"  # the budget ran out
    budget = result("small = reviews.modal.llm(")
    assert "BudgetExceeded" in budget
    first_error = result("small[small.label_error.notna()].label_error.iloc[0]")
    assert first_error.startswith("'BudgetExceeded: budget_usd=0.0005: $0.0")
    requests = openai_server.requests
    assert 300 + 40 < len(requests) < 300 + 40 + 300


def test_an_answers_cache_key_is_its_request_not_modal_magics_code_limits_or_where_it_runs(monkeypatch):
    # Upgrading modal_magic (new code, a new version) must not make paid answers look new; a new key,
    # rpm, budget or backend mustn't either; the prompt, model and schema must.
    from modal_magic.llm.function import LLMRowFunction
    from modal_magic.llm.row.limits import Limits, Meter, Request
    from modal_magic.llm.row.session import Session

    def fingerprint(request: Request, limits: Limits, on_modal: bool) -> str:
        session = Session(request, limits, Meter(True), api_key="sk-one", base_url=None)
        row = LLMRowFunction(request, session, limits, on_modal=on_modal)
        return function_fingerprint(row, star=True, result_options={"where": "local"})

    request = Request(template="Say {text}", fields=("text",), model="gpt-4o-mini", into="answer", price=(0.15, 0.6))
    first = fingerprint(request, Limits(), on_modal=False)
    assert fingerprint(request, Limits(rpm=60, tpm=1000, budget_usd=0.5), on_modal=True) == first
    monkeypatch.setattr(LLMRowFunction, "a_new_method", lambda self: 1, raising=False)
    monkeypatch.setattr(llm_row.session.Session, "complete", lambda self, values: None)
    assert fingerprint(request, Limits(), on_modal=False) == first, "modal_magic's own code is in the key"
    for changed in ({"template": "Shout {text}"}, {"model": "gpt-4o"}, {"max_tokens": 5}, {"system": "Be terse"},
                    {"temperature": 0.0}):
        other = Request(**{**request.__dict__, **changed})
        assert fingerprint(other, Limits(), on_modal=False) != first, changed


def _kill_a_child_talking_to(openai_server, after_requests: int, killed: list[int]):
    """A started thread that SIGKILLs a child process (a worker, a container) with a connection
    open to ``openai_server`` once it has had ``after_requests`` requests; its pid goes in ``killed``."""
    import signal
    import threading

    import psutil

    def kill() -> None:
        deadline = time.monotonic() + 60
        while len(openai_server.requests) < after_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                talking = any(c.raddr and c.raddr.port == openai_server.port for c in child.net_connections())
            except psutil.Error:
                continue
            if talking:
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
                return

    killer = threading.Thread(target=kill)
    killer.start()
    return killer
