"""One chat completion per row: the :class:`Session` a process shares across its rows.

This is the heart of the row runtime, which runs where the rows run: on the asyncio backend's
event loop in the kernel, in the kernel's worker processes (``processes=``), or inside a Modal
container, where it arrives pickled by value (cloudpickle, the whole
:mod:`modal_magic.llm.row` package), and modal_magic is not installed. So the package imports only
the standard library at the top; ``openai`` is imported where it is used. How an answer is read
(usage, a structured answer) is :mod:`.answers`; the row functions as shipped are :mod:`.shipped`.

Everything one process shares across its rows lives in a :class:`Session`: the ``openai.AsyncOpenAI``
client (created on the loop that uses it, closed when no row is running), the
:class:`~modal_magic.llm.row.limits.RateLimiter` every request goes through (every retry included), the
:class:`~modal_magic.llm.row.limits.Budget` and the :class:`~modal_magic.llm.row.limits.Meter` the progress
bar reads. Requests are sent with the client's own retries off (``max_retries=0``): the retries are
done here, so that each try passes the rate limiter, a ``Retry-After`` holds back every row (not
just the one that got the 429), and the row's error says how many tries it took.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .failures import (APIConnectionError, APIError, AuthenticationError, EmptyAnswer, LLMError, MissingValue,
                       SchemaValidationError, error_for_status, redact, redact_url, url_secrets)
from .allotment import BILLED_KEY
from .answers import _total_tokens, usage_of, validate_structured
from .limits import (DEFAULT_OUTPUT_ESTIMATE, Budget, Limits, Meter, RateLimiter, Request, backoff_s, cost_usd,
                     estimate_tokens, retry_after_s, worst_case)

#: a server asking to wait longer than this gets no retry: the row fails and says how long it asked
MAX_RETRY_AFTER_S = 300.0
#: HTTP statuses worth another try (timeouts, conflicts, rate limits, server errors)
RETRYABLE_STATUS = frozenset({408, 409, 429})
#: a Modal container closes its client after this long without a row
IDLE_CLOSE_S = 1.0
#: models that take ``max_completion_tokens`` and refuse ``max_tokens``
_COMPLETION_TOKENS_MODELS = re.compile(r"^(o\d|gpt-5)")

#: the HTTP libraries' loggers, which write each request's full URL (credentials and all) at INFO/DEBUG
_HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "openai._base_client", "aiohttp.client")


class _RedactingFilter(logging.Filter):
    """Rewrites an HTTP library's log record with URL credentials and key-like values as ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_REDACTING_FILTER = _RedactingFilter()


def _hide_secrets_in_http_logs() -> None:
    """Put :class:`_RedactingFilter` on the HTTP libraries' loggers (once: ``addFilter`` ignores a repeat)."""
    for name in _HTTP_LOGGERS:
        logging.getLogger(name).addFilter(_REDACTING_FILTER)


def openai_client_settings(base_url: str | None) -> tuple[str | None, dict[str, str] | None]:
    """``(base_url, default_query)`` for an ``openai`` client, with the HTTP libraries' logs redacted.

    The SDK appends paths to the base URL as a string (``"/v1?api_key=Xchat/completions"``): a
    query string (Azure's ``api-version``, a gateway's key) goes in ``default_query`` instead.

    Examples
    --------
    >>> openai_client_settings("https://host/v1?api-version=1")
    ('https://host/v1', {'api-version': '1'})
    """
    _hide_secrets_in_http_logs()
    if not base_url or not urlsplit(base_url).query:
        return base_url, None
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(query="")), dict(parse_qsl(parts.query, keep_blank_values=True))


def is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT (without importing pandas)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return type(value).__name__ in ("NAType", "NaTType")



def fill(request: Request, values: tuple[Any, ...]) -> str:
    """The row's prompt: ``request.template`` filled with the row's ``values`` (one per field).

    Raises :class:`MissingValue` for an empty value: no request is sent for that row.

    Examples
    --------
    >>> fill(Request(template="Say {text}", fields=("text",), model="m", into="a"), ("hi",))
    'Say hi'
    """
    for name, value in zip(request.fields, values):
        if is_missing(value):
            raise MissingValue(f"column {name!r} is empty in this row; no request was sent")
    return request.template.format_map(dict(zip(request.fields, values)))


def request_body(request: Request, prompt: str) -> dict[str, Any]:
    """The chat completion body that asks ``prompt`` as ``request`` says (model, system, max tokens...).

    Examples
    --------
    >>> request_body(Request(template="", fields=(), model="gpt-5", into="a", max_tokens=9), "hi")
    {'model': 'gpt-5', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_completion_tokens': 9}
    """
    messages = [{"role": "user", "content": prompt}]
    if request.system is not None:
        messages.insert(0, {"role": "system", "content": request.system})
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        param = "max_completion_tokens" if _COMPLETION_TOKENS_MODELS.match(request.model) else "max_tokens"
        body[param] = request.max_tokens
    if request.response_format is not None:
        body["response_format"] = request.response_format
    body.update(request.extra_body)
    return body


def row_worst_case(request: Request, values: tuple[Any, ...], max_output_tokens: int | None) -> tuple[float, str]:
    """The most the first try of this row's request can be billed, and what that is made of.

    What the kernel books for each row of a Modal batch (its allotment,
    :mod:`~modal_magic.llm.row.allotment`), with the arithmetic a :class:`Session` books each try
    with (:func:`~modal_magic.llm.row.limits.worst_case`). A row with an empty value sends nothing: 0.

    Examples
    --------
    >>> request = Request(template="{t}", fields=("t",), model="m", into="a", max_tokens=10, price=(1e6, 1e6))
    >>> row_worst_case(request, ("hi",), None)
    (40.0, '30 prompt tokens at most + 10 output tokens (max_tokens)')
    >>> row_worst_case(request, (None,), None)
    (0.0, 'an empty value: no request')
    """
    try:
        prompt = fill(request, values)
    except MissingValue:
        return 0.0, "an empty value: no request"
    return worst_case(request, request_body(request, prompt), max_output_tokens)


class _Bill:
    """What one row's tries may have been billed so far (reported to the kernel on Modal)."""

    usd = 0.0


_WARM = False


def warm_up() -> None:
    """Do the client library's one-time start-up now, ahead of every row: a row's timeout is for its request.

    Importing ``openai`` takes about 0.5 s, and making the first client imports its HTTP transport
    (as long again, and seconds on a loaded machine); a throwaway client, never used, makes it
    happen here, once per process.
    """
    global _WARM
    if _WARM:
        return
    _WARM = True
    try:
        import openai
    except ImportError:  # the first row says so, with the install command
        return
    Session(Request(template="", fields=(), model="warm-up", into="answer"), Limits(), Meter(False),
            api_key="warm-up", base_url="http://127.0.0.1:9/v1")._make_client()


class Session:
    """What one process shares across its rows: the client, the rate limiter, the budget, the meter.

    ``complete(values)`` answers one row. It is created where the rows run (the kernel for local
    runs, each container on Modal) and makes its ``openai.AsyncOpenAI`` client on first use, on the
    event loop that then uses it.
    """

    def __init__(self, request: Request, limits: Limits, meter: Meter, *, api_key: str | None,
                 base_url: str | None, key_hint: str = "", idle_close_s: float = 0.0) -> None:
        warm_up()
        self.request = request
        self.limits = limits
        self.meter = meter
        self.limiter = RateLimiter(limits.rpm, limits.tpm)
        self.budget = Budget(limits.budget_usd)
        self._api_key = api_key
        self._base_url = base_url
        self._secrets = (api_key, *url_secrets(base_url))  # what no message may show
        self._key_hint = key_hint  # what to do when there is no key, for the row's error
        self._client: Any = None
        self._active = 0
        self._idle_close_s = idle_close_s
        self._idle_close: Any = None
        self._loop: Any = None
        self._output_seen = 0
        self._answers_seen = 0

    # The key never leaves this object: not in repr, not in errors (they are redacted), not pickled;
    # nor do the credentials a base URL may carry (user-info, ?api_key=...).
    def __repr__(self) -> str:
        return f"<Session model={self.request.model!r} base_url={redact_url(self._base_url)!r}>"

    def __reduce__(self) -> Any:
        raise TypeError("a Session holds an API key and is never pickled; ship the Request instead")

    def open(self) -> None:
        """Make the client now, before any row's clock starts (where the rows run, before they run).

        Making one takes a TLS context (tens of milliseconds, far more on a loaded machine), which
        a row's ``timeout`` must not count. Without a key this does nothing: each row then fails
        with :class:`AuthenticationError`, saying where to put one.
        """
        if self._client is None and self._api_key:
            self._client = self._make_client()

    def _make_client(self) -> Any:
        import openai

        if not self._api_key:
            raise AuthenticationError(f"no API key where this row ran{self._key_hint}")
        http_client = None
        aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)
        # aiohttp refuses a URL with user-info next to the client's Authorization header (a
        # ValueError for every row); httpx, the default transport, sends the request.
        userinfo = "@" in urlsplit(self._base_url or "").netloc
        if aiohttp_client is not None and not userinfo:
            try:  # aiohttp moves a request in about half the CPU time of the default transport
                http_client = aiohttp_client(timeout=self.limits.request_timeout_s)
            except Exception:  # aiohttp isn't installed here: the default transport works too
                http_client = None
        base_url, query = openai_client_settings(self._base_url)
        return openai.AsyncOpenAI(api_key=self._api_key, base_url=base_url, default_query=query, max_retries=0,
                                  timeout=self.limits.request_timeout_s, http_client=http_client)

    def prompt(self, values: tuple[Any, ...]) -> str:
        """The row's prompt (:func:`fill`)."""
        return fill(self.request, values)

    def body(self, prompt: str) -> dict[str, Any]:
        """The request's body (:func:`request_body`)."""
        return request_body(self.request, prompt)

    def _estimates(self, prompt: str, body: dict[str, Any], budget: Budget) -> tuple[int, float, str]:
        """What to book before sending: tokens with the rate limiter, and the worst case with the budget.

        The rate limiter gets an estimate (settled with the real count afterwards); the budget gets
        the most this request can be billed (the prompt's token bound and every output token it may
        be given, see :func:`~modal_magic.llm.row.limits.prompt_tokens_bound`), and what that is
        made of, for the message of a row that doesn't fit.
        """
        request = self.request
        tokens_in = estimate_tokens(prompt) + estimate_tokens(request.system or "") + 8
        if request.max_tokens is not None:
            tokens_out = request.max_tokens
        elif self._answers_seen:
            tokens_out = math.ceil(2 * self._output_seen / self._answers_seen)
        else:
            tokens_out = DEFAULT_OUTPUT_ESTIMATE
        if budget.limit_usd is None:
            return tokens_in + tokens_out, 0.0, ""
        worst_usd, detail = worst_case(request, body, self.limits.max_output_tokens)
        return tokens_in + tokens_out, worst_usd, detail

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float | None:
        return cost_usd(self.request.price, tokens_in, tokens_out)

    async def complete(self, values: tuple[Any, ...], allotment: Budget | None = None) -> dict[str, Any]:
        """Send one row's request (retrying as allowed) and return its result columns.

        With ``allotment`` (on Modal: the budget of the batch's allotment, booked by the kernel, see
        :mod:`~modal_magic.llm.row.allotment`) its tries book against it instead of this session's
        budget, and the row reports what they may have been billed: under
        :data:`~modal_magic.llm.row.allotment.BILLED_KEY` in its result, or as ``row_billed_usd`` on
        its exception, for the kernel to settle the batch with.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._new_run(loop)
        self._active += 1
        budget = allotment if allotment is not None else self.budget
        bill = _Bill()
        try:
            prompt = self.prompt(values)
            body = self.body(prompt)
            data = await self._send(body, *self._estimates(prompt, body, budget), budget=budget, bill=bill)
            tokens_in, tokens_out = usage_of(data)
            # Paid for even when the answer then fails validation.
            usage = ((tokens_in or 0) + (tokens_out or 0), self.cost(tokens_in, tokens_out))
            self.meter.add(*usage)
            try:
                result = self.parse(data, tokens_in, tokens_out)
            except (EmptyAnswer, SchemaValidationError) as error:
                error.row_usage = usage  # travels back from Modal (modal_magic.errors.RowReport)
                raise
        except Exception as error:
            if allotment is not None:
                error.row_billed_usd = bill.usd  # type: ignore[attr-defined]  # modal_magic.errors.RowReport
            raise
        finally:
            self._active -= 1
            if self._active == 0 and self._idle_close_s:
                self._close_when_quiet()
        if allotment is not None:
            result[BILLED_KEY] = bill.usd
        return result

    def _new_run(self, loop: Any) -> None:
        """The function runs again on a new event loop (e.g. ``out.modal.retry_failed()``).

        A client belongs to the loop it was made on, so a new one is made. The budget keeps what
        was spent, but looks again: a retried row may fit where the last one didn't.
        """
        if self._loop is not None:
            self._client = None
            self.budget.restart()
        self._loop = loop

    def _close_when_quiet(self) -> None:
        """In a Modal container the loop lives on between inputs: close the client after a quiet spell."""
        if self._idle_close is not None:
            self._idle_close.cancel()
        loop = asyncio.get_running_loop()
        self._idle_close = loop.call_later(self._idle_close_s, lambda: loop.create_task(self._close_if_idle()))

    async def _close_if_idle(self) -> None:
        if self._active == 0:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the client and its connections; the next row opens a new one. The end of a run calls this."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _send(self, body: dict[str, Any], tokens_booked: int, usd_booked: float, worst: str, *,
                    budget: Budget, bill: _Bill) -> Any:
        """Send ``body`` until it is answered or may not be tried again; every try books its worst case
        with ``budget``, and adds what it may have been billed to ``bill``."""
        attempt = 0
        while True:
            attempt += 1
            # Before the rate limiter's slot, so the request goes out the moment the slot is due.
            if self._client is None:
                self._client = self._make_client()
            # Each try books its own worst case: a try that timed out may still have been billed.
            await budget.acquire(usd_booked, worst)
            billed = 0.0  # nothing goes out before the rate limiter's wait is over
            try:
                await self.limiter.acquire(tokens_booked)
                # From here the request may go out and be billed: cancelled now (a row timeout, Stop),
                # it is settled at its worst case.
                billed = usd_booked
                billed, data, failure, retryable = await self._post(body, tokens_booked, usd_booked)
            finally:
                budget.settle(usd_booked, billed)
                bill.usd += billed
            if failure is None:
                return data
            # Outside the except block: the openai exception (which holds the request and its
            # Authorization header) is not chained to the row's error.
            cls, message, status, wait = failure
            if wait is not None and wait > MAX_RETRY_AFTER_S:
                retryable = False
                message += f" (the server asked to wait {wait:.0f} s before retrying; not retried)"
            if not retryable or attempt > self.limits.max_retries:
                tries = f"after {attempt} attempts" if attempt > 1 else "not retried" if not retryable else "1 attempt"
                raise cls(f"{message} ({tries})", status=status, attempts=attempt)
            delay = wait if wait is not None else backoff_s(attempt)
            if status == 429:
                self.limiter.pause(delay)
            await asyncio.sleep(delay)

    async def _post(self, body: dict[str, Any], tokens_booked: int,
                    usd_booked: float) -> tuple[float, Any, tuple[type[LLMError], str, int | None, float | None] | None, bool]:
        """One HTTP try: ``(billed_usd, data, failure, retryable)``.

        ``billed_usd`` is what the try may have cost: the answer's usage; nothing for an HTTP error
        (the endpoint refused it); the worst case for a try whose answer never came back (timed out,
        connection lost), which may have been billed all the same.
        """
        import openai

        failure: tuple[type[LLMError], str, int | None, float | None] | None = None
        retryable = False
        data: Any = None
        billed = usd_booked
        try:
            data = await self._client.post("/chat/completions", cast_to=object, body=body)
        except openai.APIStatusError as e:
            status = e.status_code
            failure = (error_for_status(status), self._describe(e, status), status, retry_after_s(e.response.headers))
            code = getattr(e, "code", None)
            retryable = (status in RETRYABLE_STATUS or status >= 500) and code != "insufficient_quota"
        except openai.APIConnectionError as e:  # APITimeoutError included
            failure = (APIConnectionError, self._describe_connection(e), None, None)
            retryable = True
        except openai.OpenAIError as e:
            failure = (APIError, f"{type(e).__name__}: {self._clean(str(e))}", None, None)
        if failure is None:
            self.limiter.settle(tokens_booked, _total_tokens(data, tokens_booked))
            tokens_in, tokens_out = usage_of(data)
            cost = self.cost(tokens_in, tokens_out)
            # An answer without usage was billed, for how much is unknown: keep the worst case.
            return (usd_booked if cost is None else cost), data, None, False
        self.limiter.settle(tokens_booked, 0)
        if failure[2] is not None:  # the endpoint answered with an HTTP error: not billed
            billed = 0.0
        return billed, data, failure, retryable

    def _where(self) -> str:
        return redact_url(self._base_url) or "api.openai.com"

    def _clean(self, text: str) -> str:
        return redact(" ".join(text.split()), *self._secrets)

    def _describe_connection(self, error: BaseException) -> str:
        # The SDK's message ("Connection error.", "Request timed out.") hides the cause; the transport's says it.
        root = error
        while root.__cause__ is not None and root.__cause__ is not root:
            root = root.__cause__
        what = "timed out" if "timeout" in type(root).__name__.lower() else "failed"
        detail = f"{type(root).__name__}: {root}" if root is not error else str(error)
        return f"the request to {self._where()} {what}: {self._clean(detail)}"

    def _describe(self, error: Any, status: int) -> str:
        body = getattr(error, "body", None)
        message = None
        if isinstance(body, dict):
            inner = body.get("error", body)
            message = inner.get("message") if isinstance(inner, dict) else None
        if not message:
            message = getattr(error, "message", None) or str(error)
        return f"{status} from {self._where()}: {self._clean(str(message))}"

    def parse(self, data: Any, tokens_in: int | None, tokens_out: int | None) -> dict[str, Any]:
        """The result columns from a chat completion response (a dict); raise where it has no answer."""
        request = self.request
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (TypeError, KeyError, IndexError):
            raise EmptyAnswer(f"the response has no choices: {str(data)[:200]}") from None
        if tokens_out is not None:
            self._output_seen += tokens_out
            self._answers_seen += 1
        content = message.get("content")
        if content is None:
            refusal = message.get("refusal")
            raise EmptyAnswer(f"the model refused: {refusal}" if refusal else "the answer has no content")
        columns = request.columns
        result: dict[str, Any]
        if request.schema is None:
            result = {request.into: content.strip()}
        else:
            cut = choice.get("finish_reason") == "length"
            result = validate_structured(content, request.schema, request.schema_columns, cut=cut)
        result[columns["tokens_in"]] = tokens_in
        result[columns["tokens_out"]] = tokens_out
        result[columns["cost_usd"]] = self.cost(tokens_in, tokens_out)
        return result
