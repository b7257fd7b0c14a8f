"""A local OpenAI-compatible server for tests and benchmarks: ``POST /v1/chat/completions``.

It answers deterministically from the request, so the real ``openai`` client can be tested offline:

- with ``response_format`` ``json_schema``: a JSON object built from the schema (a string property
  ``NAME`` takes the text after ``NAME:`` in the prompt, else ``"unknown"``; an ``enum`` of
  POSITIVE/NEGATIVE/NEUTRAL is classified as below, another ``enum`` takes the first of its values
  the prompt mentions; integers count the prompt's words; booleans say whether the prompt says "yes");
- a prompt that asks for POSITIVE, NEGATIVE or NEUTRAL: that label, from keywords in the prompt;
- anything else: the user message echoed back.

``usage`` is always reported: prompt tokens are ``ceil(chars / 4) + 3`` per message, completion
tokens ``ceil(chars / 4)`` of the answer (at least 1).

A test steers single requests with markers in the user message (several may be combined, each in
its own brackets; a marker is removed from an echoed answer):

- ``[[fail=429 times=2 retry_after=0.3]]``: the first 2 requests with this exact message get a 429
  with ``Retry-After: 0.3`` (``retry_after_ms=300`` sends ``retry-after-ms`` instead); ``times``
  defaults to every request; ``fail=500`` (or 502, 503, 400, 401...) likewise; ``code=`` sets the
  error code (e.g. ``code=insufficient_quota``). A 401 echoes the request's bearer token in its
  message, as a careless server would, so tests can check that clients redact it.
- ``[[malformed times=1]]``: a structured answer that is not valid JSON.
- ``[[garbage]]``: a 200 response whose body is HTML, not a chat completion.
- ``[[latency=0.2]]``: this request waits 0.2 s more than the server's global latency.
- ``[[usage=100,20]]``: report these prompt and completion tokens.
- ``[[answer=SOME TEXT]]``: answer exactly this.
- ``[[long=2000]]``: a long answer, exactly 2,000 completion tokens (cut at ``max_tokens`` like any other).

OpenAI's Batch API (``/v1/files``, ``/v1/batches``) is served too, answering each request of a
batch the same way: see :mod:`tests.openai_server.batches`.

Every request is recorded (arrival time on ``time.monotonic()``, the body, the answer's status) so a
test can measure the request rate; with ``find_senders`` on, so is the process that sent it. An
arrival time is always later than the moment the client let the request go, by however long a busy
machine takes to deliver it: a test bounds it from below (the k-th request can't arrive before k
rate-limiter slots have passed), never from above. Run it in a background thread with :class:`OpenAIServer`, or as a
process (``python -m tests.openai_server --port 0 --latency 0.05`` prints its base URL), which is
what the benchmark does so the server doesn't share the client's interpreter.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .batches import BatchState, add_batch_routes

__all__ = ["OpenAIServer", "RequestRecord", "make_app", "answer_for"]

_MARKER = re.compile(r"\[\[([^\[\]]*)\]\]")
POSITIVE_WORDS = ("amazing", "best", "great", "excellent", "love", "perfect", "good", "happy", "fantastic")
NEGATIVE_WORDS = ("terrible", "broke", "awful", "worst", "bad", "poor", "refund", "disappoint", "useless", "hate")


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    t: float  # arrival, time.monotonic()
    content: str  # the last user message
    body: dict[str, Any]
    status: int = 200
    authorization: str = ""  # the Authorization header as sent (the tests check clients never print it)
    tokens_in: int = 0
    tokens_out: int = 0
    connection: Any = None  # the client's (host, port): one per TCP connection, so tests can count them
    sender_pid: int | None = None  # the process that sent it, with ``OpenAIServer.find_senders`` on

    def as_json(self) -> dict[str, Any]:
        return {"t": self.t, "content": self.content, "body": self.body, "status": self.status,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out}


@dataclass
class _State:
    latency_s: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    seen: Counter = field(default_factory=Counter)  # requests per exact user message, for ``times=``
    record: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    find_senders: bool = False  # look up which process sent each request (psutil; this process and its children)
    batch: BatchState = field(default_factory=BatchState)  # /v1/files and /v1/batches


def parse_markers(text: str) -> dict[str, str]:
    """``"[[fail=429 times=2]] hi [[latency=0.1]]"`` -> ``{"fail": "429", "times": "2", "latency": "0.1"}``.

    ``answer=`` takes the rest of its marker, spaces included.
    """
    found: dict[str, str] = {}
    for marker in _MARKER.findall(text):
        if marker.startswith("answer="):
            found["answer"] = marker[len("answer="):]
            continue
        for word in marker.split():
            key, _, value = word.partition("=")
            found[key] = value
    return found


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _classify(text: str) -> str:
    lowered = text.lower()
    # The label words themselves appear in the instructions: look at what follows them.
    tail = lowered.rsplit("neutral", 1)[-1] if "neutral" in lowered else lowered
    positive = sum(tail.count(w) for w in POSITIVE_WORDS)
    negative = sum(tail.count(w) for w in NEGATIVE_WORDS)
    if positive > negative:
        return "POSITIVE"
    if negative > positive:
        return "NEGATIVE"
    return "NEUTRAL"


def _value_for(name: str, prop: dict[str, Any], text: str, defs: dict[str, Any]) -> Any:
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].rsplit("/", 1)[-1], {})
    if "anyOf" in prop:  # Optional[X]: the first non-null branch
        branches = [b for b in prop["anyOf"] if b.get("type") != "null"]
        prop = branches[0] if branches else {"type": "null"}
    if "enum" in prop:
        if {"POSITIVE", "NEGATIVE", "NEUTRAL"} <= {str(o).upper() for o in prop["enum"]}:
            label = _classify(text)
            return next(o for o in prop["enum"] if str(o).upper() == label)
        for option in prop["enum"]:
            if str(option).lower() in text.lower():
                return option
        return prop["enum"][0]
    kind = prop.get("type")
    if kind == "integer":
        return len(text.split())
    if kind == "number":
        return round(len(text) / 100, 2)
    if kind == "boolean":
        return "yes" in text.lower()
    if kind == "array":
        return text.split()[:3]
    if kind == "object":
        return _object_for(prop, text, defs)
    if kind == "null":
        return None
    match = re.search(rf"\b{re.escape(name)}\s*[:=]\s*([^,;\n\[\]]+)", text, flags=re.IGNORECASE)
    return match.group(1).strip() if match else "unknown"


def _object_for(schema: dict[str, Any], text: str, defs: dict[str, Any]) -> dict[str, Any]:
    return {name: _value_for(name, prop, text, defs) for name, prop in schema.get("properties", {}).items()}


def answer_for(body: dict[str, Any], markers: dict[str, str], malformed: bool = False) -> str:
    """The deterministic answer to a chat completion request."""
    messages = body.get("messages") or []
    user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if "answer" in markers:
        return markers["answer"]
    if "long" in markers:
        return "abcd" * int(markers["long"])  # ceil(chars / 4): exactly that many tokens
    clean = _MARKER.sub("", user).strip()
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        text = json.dumps(_object_for(schema, clean, schema.get("$defs", {})))
        return text[: len(text) // 2] if malformed else text
    if response_format.get("type") == "json_object":
        return '{"answer": ' if malformed else json.dumps({"answer": clean})
    if "positive" in clean.lower() and "negative" in clean.lower():
        return _classify(clean)
    return clean


def _error(status: int, message: str, code: str | None, headers: dict[str, str] | None = None) -> web.Response:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}.get(status, "server_error")
    payload = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(payload, status=status, headers=headers)


def _completion(body: dict[str, Any], markers: dict[str, str], in_failing_window: bool, n: int,
                authorization: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, JSON body, headers)`` of the answer to a chat completion request."""
    messages = body.get("messages") or []
    if "fail" in markers and in_failing_window:
        status = int(markers["fail"])
        headers: dict[str, str] = {}
        if "retry_after" in markers:
            headers["Retry-After"] = markers["retry_after"]
        if "retry_after_ms" in markers:
            headers["retry-after-ms"] = markers["retry_after_ms"]
        if status == 401:
            token = authorization.removeprefix("Bearer ").strip()
            message = (f"Incorrect API key provided: {token}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
            code: str | None = "invalid_api_key"
        else:
            code = markers.get("code") or {429: "rate_limit_exceeded"}.get(status)
            message = {429: "Rate limit reached for requests", 500: "The server had an error while "
                       "processing your request. Sorry about that!"}.get(status, f"error {status}")
        kind = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}.get(status, "server_error")
        return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers
    malformed = "malformed" in markers and in_failing_window
    content = answer_for(body, markers, malformed=malformed)
    if "usage" in markers:
        tokens_in, tokens_out = (int(x) for x in markers["usage"].split(","))
    else:
        tokens_in = sum(_tokens(_text_of(m.get("content"))) + 3 for m in messages)
        tokens_out = max(1, _tokens(content))
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    finish = "stop"
    if max_tokens is not None and tokens_out > max_tokens and "usage" not in markers:
        tokens_out, finish = max_tokens, "length"
    return 200, {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                  "total_tokens": tokens_in + tokens_out},
    }, {}


def _sender_pid(host: str, port: int) -> int | None:
    """The process (this one or one of its children) whose socket is the client end of a connection."""
    import psutil

    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:  # it ended meanwhile: it isn't the sender of a request still being answered
            continue
        if any(c.laddr and c.laddr.ip == host and c.laddr.port == port for c in connections):
            return process.pid
    return None


def make_app(state: _State) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        arrived = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_json")
        messages = body.get("messages") or []
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        markers = parse_markers(user)
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        record = RequestRecord(arrived, user, body, authorization=request.headers.get("Authorization", ""),
                               connection=tuple(peer) if peer else None)
        if state.find_senders and peer:
            record.sender_pid = _sender_pid(peer[0], peer[1])
        with state.lock:
            state.seen[user] += 1
            nth = state.seen[user]
            if state.record:
                state.records.append(record)
        times = markers.get("times")
        in_failing_window = times is None or times in ("", "inf") or nth <= int(times)
        delay = state.latency_s + float(markers.get("latency", 0) or 0)
        if delay > 0:
            await asyncio.sleep(delay)
        if "garbage" in markers and in_failing_window and "fail" not in markers:
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        status, payload, headers = _completion(body, markers, in_failing_window, len(state.records),
                                               record.authorization)
        record.status = status
        if status == 200:
            record.tokens_in = payload["usage"]["prompt_tokens"]
            record.tokens_out = payload["usage"]["completion_tokens"]
        return web.json_response(payload, status=status, headers=headers)

    def batch_answer(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One request of a batch: the same answer (markers and ``times=`` counters included) as live."""
        messages = body.get("messages") or []
        user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        markers = parse_markers(user)
        with state.lock:
            state.seen[user] += 1
            nth = state.seen[user]
        times = markers.get("times")
        in_failing_window = times is None or times in ("", "inf") or nth <= int(times)
        status, payload, _ = _completion(body, markers, in_failing_window, nth, "")
        return status, payload

    async def get_requests(request: web.Request) -> web.Response:
        with state.lock:
            records = [r.as_json() for r in state.records]
        return web.json_response(records)

    async def configure(request: web.Request) -> web.Response:
        settings = await request.json()
        if "latency_s" in settings:
            state.latency_s = float(settings["latency_s"])
        if "record" in settings:
            state.record = bool(settings["record"])
        if settings.get("reset"):
            with state.lock:
                state.records.clear()
                state.seen.clear()
        return web.json_response({"latency_s": state.latency_s, "record": state.record})

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/_control/requests", get_requests)
    app.router.add_post("/_control/config", configure)
    add_batch_routes(app, state.batch, batch_answer)
    return app


class OpenAIServer:
    """The server on 127.0.0.1, run on its own event loop in a background thread.

    Examples
    --------
    >>> server = OpenAIServer(latency_s=0.0).start()   # doctest: +SKIP
    >>> server.base_url                                # doctest: +SKIP
    'http://127.0.0.1:43121/v1'
    >>> server.stop()                                  # doctest: +SKIP
    """

    def __init__(self, *, latency_s: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self._state = _State(latency_s=latency_s)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def latency_s(self) -> float:
        return self._state.latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        self._state.latency_s = value

    @property
    def find_senders(self) -> bool:
        """Record which process sent each request (``RequestRecord.sender_pid``); off by default (it costs a scan)."""
        return self._state.find_senders

    @find_senders.setter
    def find_senders(self, value: bool) -> None:
        self._state.find_senders = value

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, in arrival order (a snapshot)."""
        with self._state.lock:
            return list(self._state.records)

    def requests_for(self, text: str) -> list[RequestRecord]:
        """The requests whose user message contains ``text``."""
        return [r for r in self.requests if text in r.content]

    def reset(self) -> None:
        """Forget the recorded requests and the per-message counters; latency back to 0, senders not looked up."""
        with self._state.lock:
            self._state.records.clear()
            self._state.seen.clear()
        self._state.latency_s = 0.0
        self._state.find_senders = False
        self._state.batch.reset()

    @property
    def batch_state(self) -> BatchState:
        """The Batch API's files, batches and settings (``batch_delay_s``, ``batch_expire_s``)."""
        return self._state.batch

    @property
    def batches(self) -> list[Any]:
        """Every batch created so far, oldest first (a snapshot)."""
        with self._state.batch.lock:
            return sorted(self._state.batch.batches.values(), key=lambda b: b.created)

    def start(self) -> OpenAIServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as e:  # e.g. the port is taken
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=serve, name="openai-test-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(make_app(self._state), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.openai_server [--port N] [--latency S]``: serve until killed."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every answer waits")
    parser.add_argument("--no-record", action="store_true", help="keep no request log (long benchmarks)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="share --port with other processes started the same way (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("this test server only listens on the loopback interface")
    state = _State(latency_s=args.latency, record=not args.no_record)

    async def serve() -> None:
        runner = web.AppRunner(make_app(state), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=2048, reuse_port=args.reuse_port or None)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"http://{args.host}:{port}/v1", flush=True)
        sys.stdout.flush()
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
