"""One chat completion per row: the request, the shared rate limits, retries on 429/5xx, budget, usage.

This file runs where the rows run: on the asyncio backend's event loop in the kernel, or inside a
Modal container, where it arrives pickled by value (cloudpickle) and modal_magic is not installed.
So it imports only the standard library at the top; ``openai`` (and ``jsonschema`` for a dict
``schema=``) are imported where they are used. :mod:`modal_magic.llm` builds the objects here from
the user's arguments.

Everything one process shares across its rows lives in a :class:`Session`: the ``openai.AsyncOpenAI``
client (created on the loop that uses it, closed when no row is running), the :class:`RateLimiter`
every request goes through (every retry included), the :class:`Budget` and the :class:`Meter` the
progress bar reads. Requests are sent with the client's own retries off (``max_retries=0``): the
retries are done here, so that each try passes the rate limiter, a ``Retry-After`` holds back every
row (not just the one that got the 429), and the row's error says how many tries it took.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

#: first wait before retrying a failed request without ``Retry-After``; doubles each try, with jitter
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 20.0
#: a server asking to wait longer than this gets no retry: the row fails and says how long it asked
MAX_RETRY_AFTER_S = 300.0
#: HTTP statuses worth another try (timeouts, conflicts, rate limits, server errors)
RETRYABLE_STATUS = frozenset({408, 409, 429})
#: output tokens assumed for a request without ``max_tokens``, until answers have been seen
DEFAULT_OUTPUT_ESTIMATE = 256
#: a Modal container closes its client after this long without a row
IDLE_CLOSE_S = 1.0
#: models that take ``max_completion_tokens`` and refuse ``max_tokens``
_COMPLETION_TOKENS_MODELS = re.compile(r"^(o\d|gpt-5)")
_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")


# --- what is asked, and how fast ---------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What decides a row's answer: the prompt, the model and its parameters, the schema, the prices.

    This is the part of a row function the cache fingerprints; the API key and the limits are
    kept elsewhere on purpose.
    """

    template: str
    fields: tuple[str, ...]  # the template's columns, in the order the row's values come
    model: str
    into: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    schema: Any = None  # a pydantic model class, a JSON schema dict, or None
    response_format: Any = None  # the request's response_format, built once from the schema
    schema_columns: tuple[str, ...] = ()  # one result column per schema property
    base_url: str | None = None  # None: OpenAI's (on Modal: the container's OPENAI_BASE_URL, if set)
    price: tuple[float, float] | None = None  # USD per million input and output tokens
    extra_body: tuple[tuple[str, Any], ...] = ()

    @property
    def columns(self) -> dict[str, str]:
        """Result column names: ``answer`` (or the schema's fields), tokens in/out and cost."""
        return {"tokens_in": f"{self.into}_tokens_in", "tokens_out": f"{self.into}_tokens_out",
                "cost_usd": f"{self.into}_cost_usd"}


@dataclass(frozen=True)
class Limits:
    """How fast and how far one process (the kernel, or one Modal container) may go."""

    rpm: float | None = None
    tpm: float | None = None
    budget_usd: float | None = None
    max_retries: int = 5
    request_timeout_s: float = 120.0

    def share(self, ways: int) -> Limits:
        """One of ``ways`` equal shares, for each of that many processes or containers.

        Examples
        --------
        >>> Limits(rpm=600, budget_usd=2.0).share(4)
        Limits(rpm=150.0, tpm=None, budget_usd=0.5, max_retries=5, request_timeout_s=120.0)
        """
        return Limits(
            rpm=self.rpm / ways if self.rpm else None, tpm=self.tpm / ways if self.tpm else None,
            budget_usd=self.budget_usd / ways if self.budget_usd else None, max_retries=self.max_retries,
            request_timeout_s=self.request_timeout_s,
        )


# --- errors a row can end with ---------------------------------------------------------------------


class LLMError(Exception):
    """A request that did not give an answer; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts

    @property
    def modal_magic_attempts(self) -> int:
        """The HTTP tries this request took, which the row's ``attempts`` then counts."""
        return self.attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), str(self), self.status, self.attempts))


def _rebuild_error(cls: type[LLMError], message: str, status: int | None, attempts: int) -> LLMError:
    return cls(message, status=status, attempts=attempts)


class RateLimitError(LLMError):
    """429 Too Many Requests, still after every retry (or a quota that retrying can't fix)."""


class InternalServerError(LLMError):
    """5xx from the endpoint, still after every retry."""


class APIStatusError(LLMError):
    """Any other HTTP error (400 bad request, 404 unknown model...); not retried."""


class AuthenticationError(LLMError):
    """401/403: the API key was refused; not retried."""


class APIError(LLMError):
    """Anything else the client raised (a response it couldn't read...); not retried."""


class APIConnectionError(LLMError):
    """The endpoint could not be reached, or did not answer in time, after every retry."""


class MissingValue(ValueError):
    """A column the template uses is empty in this row; no request was sent."""


class SchemaValidationError(ValueError):
    """The answer is not JSON matching ``schema=`` (retried with the row's ``retries=``)."""


class EmptyAnswer(ValueError):
    """The endpoint answered without content (a refusal, or a malformed response)."""


class BudgetExceeded(RuntimeError):
    """``budget_usd=`` would be passed by this request: it, and every later one, was not sent."""


_STATUS_ERRORS: dict[int, type[LLMError]] = {401: AuthenticationError, 403: AuthenticationError, 429: RateLimitError}


def error_for_status(status: int) -> type[LLMError]:
    """The exception class for an HTTP error status (any 5xx is an ``InternalServerError``)."""
    if status >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status, APIStatusError)


def redact(text: str, key: str | None) -> str:
    """``text`` with the API key (and anything shaped like a key or a bearer token) replaced by ``***``.

    Examples
    --------
    >>> redact("Incorrect API key provided: sk-abc123456789xyz.", "sk-abc123456789xyz")
    'Incorrect API key provided: ***.'
    >>> redact("header Bearer tok_123", None)
    'header ***'
    """
    if key and len(key) >= 4:
        text = text.replace(key, "***")
    return _SECRET_LIKE.sub("***", text)


def usd(amount: float) -> str:
    """Dollars as a user reads them: ``0.50``, ``12.31``, or ``0.00042`` for fractions of a cent.

    Examples
    --------
    >>> usd(0.5), usd(0.489), usd(0.00042), usd(0.0005), usd(0.0000183), usd(0)
    ('0.50', '0.49', '0.00042', '0.0005', '0.000018', '0.00')
    """
    if abs(amount) < 1e-9 or abs(amount) >= 0.01:
        return f"{amount:,.2f}"
    return f"{amount:.{1 - math.floor(math.log10(abs(amount)))}f}".rstrip("0")


# --- shared state: rate limiter, budget, meter --------------------------------------------------------


class RateLimiter:
    """Requests per minute and tokens per minute for every request on one event loop.

    Each request reserves its place in time when it asks (no lock is needed: the loop runs one
    coroutine at a time), then sleeps until then. Requests are spaced ``60 / rpm`` seconds apart,
    and each request's tokens occupy ``tokens * 60 / tpm`` seconds of the token schedule, so over any
    window of ``w`` seconds at most ``rpm * w / 60 + 1`` requests start, and at most
    ``tpm * w / 60`` tokens plus one request's. A server's ``Retry-After`` (:meth:`pause`) holds
    every request back, because a 429 means the shared limit is hit, not just one row's.

    Examples
    --------
    >>> limiter = RateLimiter(rpm=600, tpm=None, clock=lambda: 0.0)
    >>> [limiter.reserve(10) for _ in range(3)]
    [0.0, 0.1, 0.2]
    """

    def __init__(self, rpm: float | None, tpm: float | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request_interval = 60.0 / rpm if rpm else 0.0
        self.token_interval = 60.0 / tpm if tpm else 0.0
        self._clock = clock
        self._next_request = -math.inf
        self._next_tokens = -math.inf
        self._paused_until = -math.inf

    def reserve(self, tokens: int) -> float:
        """Claim the next slot for a request of ``tokens``; return when (on the clock) it may start."""
        start = max(self._clock(), self._next_request, self._next_tokens, self._paused_until)
        if self.request_interval:
            self._next_request = start + self.request_interval
        if self.token_interval:
            self._next_tokens = start + tokens * self.token_interval
        return start

    async def acquire(self, tokens: int) -> None:
        """Wait for this request's slot."""
        start = self.reserve(tokens)
        delay = start - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    def settle(self, reserved: int, used: int) -> None:
        """A request used ``used`` tokens where ``reserved`` were booked: move the token schedule."""
        if self.token_interval and reserved != used:
            self._next_tokens += (used - reserved) * self.token_interval

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (the server said ``Retry-After``)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)


class Budget:
    """Stops new requests once the money spent plus what is in flight would pass ``limit_usd``.

    Once a request is refused, every later one is too (no cheap row sneaks in after an expensive
    one was turned away), so a run stops cleanly where the budget ran out.

    Examples
    --------
    >>> budget = Budget(0.10)
    >>> budget.reserve(0.06); budget.settle(0.06, 0.05)
    >>> budget.reserve(0.06)
    Traceback (most recent call last):
    ...
    modal_magic._llm_row.BudgetExceeded: budget_usd=0.10 reached after $0.05: the next request would cost about $0.06, ...
    """

    def __init__(self, limit_usd: float | None) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = 0.0
        self.in_flight_usd = 0.0
        self.stopped: str | None = None

    def reserve(self, estimate_usd: float) -> None:
        if self.limit_usd is None:
            return
        if self.stopped is None and self.spent_usd + self.in_flight_usd + estimate_usd > self.limit_usd:
            in_flight = f" (+${usd(self.in_flight_usd)} in flight)" if self.in_flight_usd else ""
            self.stopped = (
                f"budget_usd={usd(self.limit_usd)} reached after ${usd(self.spent_usd)}{in_flight}: the next "
                f"request would cost about ${usd(estimate_usd)}, so it and every later one was not sent. "
                "Raise budget_usd and run again: rows already answered are not paid for twice"
            )
        if self.stopped is not None:
            raise BudgetExceeded(self.stopped)
        self.in_flight_usd += estimate_usd

    def settle(self, estimate_usd: float, actual_usd: float) -> None:
        if self.limit_usd is None:
            self.spent_usd += actual_usd
            return
        self.in_flight_usd = max(0.0, self.in_flight_usd - estimate_usd)
        self.spent_usd += actual_usd


class Meter:
    """Running totals the progress bar shows (``.tokens``, ``.cost_usd``), read by the engine as rows finish.

    Where the rows run in this process a :class:`Session` feeds it as each answer arrives
    (:meth:`add`), failed-but-paid answers included. Where they run elsewhere (Modal containers),
    build it with ``columns=`` (the result columns for tokens in, tokens out and cost): the engine
    then hands it every batch that comes back (:meth:`observe`), and it adds up those columns,
    plus the usage that failed rows carry (``modal_magic_usage`` on the exception).
    ``cost_usd`` is ``None`` when the model has no price, so the bar shows tokens only.

    Examples
    --------
    >>> meter = Meter(priced=True, columns=("t_in", "t_out", "usd"))
    >>> meter.observe([{"t_in": 10, "t_out": 2, "usd": 0.5}, None], [])
    >>> meter.tokens, meter.cost_usd
    (12, 0.5)
    """

    def __init__(self, priced: bool, columns: tuple[str, str, str] | None = None) -> None:
        self.tokens = 0
        self.cost_usd: float | None = 0.0 if priced else None
        self._columns = columns

    def add(self, tokens: int, cost_usd: float | None) -> None:
        self.tokens += tokens
        if cost_usd is not None and self.cost_usd is not None:
            self.cost_usd += cost_usd

    def observe(self, values: list[Any], errors: list[tuple[Any, ...]]) -> None:
        """A batch came back from elsewhere: add its rows' usage (nothing when fed live by a session)."""
        if self._columns is None:
            return
        tokens_in, tokens_out, cost = self._columns
        for value in values:
            if isinstance(value, dict):
                self.add((value.get(tokens_in) or 0) + (value.get(tokens_out) or 0), value.get(cost))
        for error in errors:
            usage = getattr(error[-1], "modal_magic_usage", None)
            if usage is not None:
                self.add(*usage)


# --- one row ---------------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for rate limits and budgets before the answer says."""
    return math.ceil(len(text) / 4)


def is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT (without importing pandas)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return type(value).__name__ in ("NAType", "NaTType")


def retry_after_s(headers: Any) -> float | None:
    """Seconds a response asks to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date).

    Examples
    --------
    >>> retry_after_s({"retry-after": "2"}), retry_after_s({"retry-after-ms": "250"}), retry_after_s({})
    (2.0, 0.25, None)
    """
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int) -> float:
    """Wait before retry ``attempt`` (1-based) when the server gave no ``Retry-After``: 0.5, 1, 2... s, jittered."""
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S) * (0.75 + 0.25 * random.random())


def _import_openai() -> None:
    """Import the client library ahead of the first row (about 0.5 s): a row's timeout is for its request."""
    try:
        import openai  # noqa: F401
    except ImportError:  # the first row says so, with the install command
        return


class Session:
    """What one process shares across its rows: the client, the rate limiter, the budget, the meter.

    ``complete(values)`` answers one row. It is created where the rows run (the kernel for local
    runs, each container on Modal) and makes its ``openai.AsyncOpenAI`` client on first use, on the
    event loop that then uses it.
    """

    def __init__(self, request: Request, limits: Limits, meter: Meter, *, api_key: str | None,
                 base_url: str | None, key_hint: str = "", idle_close_s: float = 0.0) -> None:
        _import_openai()
        self.request = request
        self.limits = limits
        self.meter = meter
        self.limiter = RateLimiter(limits.rpm, limits.tpm)
        self.budget = Budget(limits.budget_usd)
        self._api_key = api_key
        self._base_url = base_url
        self._key_hint = key_hint  # what to do when there is no key, for the row's error
        self._client: Any = None
        self._active = 0
        self._idle_close_s = idle_close_s
        self._idle_close: Any = None
        self._loop: Any = None
        self._output_seen = 0
        self._answers_seen = 0
        self._max_tokens_param = ("max_completion_tokens" if _COMPLETION_TOKENS_MODELS.match(request.model)
                                  else "max_tokens")

    # The key never leaves this object: not in repr, not in errors (they are redacted), not pickled.
    def __repr__(self) -> str:
        return f"<Session model={self.request.model!r} base_url={self._base_url!r}>"

    def __reduce__(self) -> Any:
        raise TypeError("a Session holds an API key and is never pickled; ship the Request instead")

    def worker_row(self, limits: Limits) -> WorkerRow:
        """The row function for one of the kernel's worker processes, with ``limits`` and this key."""
        return WorkerRow(self.request, limits, self._api_key, self._base_url)

    def _make_client(self) -> Any:
        import openai

        if not self._api_key:
            raise AuthenticationError(f"no API key where this row ran{self._key_hint}")
        http_client = None
        aiohttp_client = getattr(openai, "DefaultAioHttpClient", None)
        if aiohttp_client is not None:
            try:  # aiohttp moves a request in about half the CPU time of the default transport
                http_client = aiohttp_client(timeout=self.limits.request_timeout_s)
            except Exception:  # aiohttp isn't installed here: the default transport works too
                http_client = None
        return openai.AsyncOpenAI(api_key=self._api_key, base_url=self._base_url, max_retries=0,
                                  timeout=self.limits.request_timeout_s, http_client=http_client)

    def prompt(self, values: tuple[Any, ...]) -> str:
        for name, value in zip(self.request.fields, values):
            if is_missing(value):
                raise MissingValue(f"column {name!r} is empty in this row; no request was sent")
        return self.request.template.format_map(dict(zip(self.request.fields, values)))

    def body(self, prompt: str) -> dict[str, Any]:
        request = self.request
        messages = [{"role": "user", "content": prompt}]
        if request.system is not None:
            messages.insert(0, {"role": "system", "content": request.system})
        body: dict[str, Any] = {"model": request.model, "messages": messages}
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body[self._max_tokens_param] = request.max_tokens
        if request.response_format is not None:
            body["response_format"] = request.response_format
        body.update(request.extra_body)
        return body

    def _estimates(self, prompt: str) -> tuple[int, float]:
        """Tokens to book with the rate limiter, and dollars to book with the budget, before sending."""
        request = self.request
        tokens_in = estimate_tokens(prompt) + estimate_tokens(request.system or "") + 8
        if request.max_tokens is not None:
            tokens_out = request.max_tokens
        elif self._answers_seen:
            tokens_out = math.ceil(2 * self._output_seen / self._answers_seen)
        else:
            tokens_out = DEFAULT_OUTPUT_ESTIMATE
        return tokens_in + tokens_out, self.cost(tokens_in, tokens_out) or 0.0

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float | None:
        price = self.request.price
        if price is None or tokens_in is None or tokens_out is None:
            return None
        return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000

    async def complete(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """Send one row's request (retrying as allowed) and return its result columns."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._new_run(loop)
        self._active += 1
        try:
            prompt = self.prompt(values)
            body = self.body(prompt)
            tokens_booked, usd_booked = self._estimates(prompt)
            self.budget.reserve(usd_booked)
            spent = 0.0
            try:
                data = await self._send(body, tokens_booked)
                tokens_in, tokens_out = usage_of(data)
                # Paid for even when the answer then fails validation.
                usage = ((tokens_in or 0) + (tokens_out or 0), self.cost(tokens_in, tokens_out))
                spent = usage[1] or 0.0
                self.meter.add(*usage)
                try:
                    return self.parse(data, tokens_in, tokens_out)
                except (EmptyAnswer, SchemaValidationError) as error:
                    error.modal_magic_usage = usage  # type: ignore[attr-defined]  # travels back from Modal
                    raise
            finally:
                self.budget.settle(usd_booked, spent)
        finally:
            self._active -= 1
            if self._active == 0 and self._idle_close_s:
                self._close_when_quiet()

    def _new_run(self, loop: Any) -> None:
        """The function runs again on a new event loop (e.g. ``out.modal.retry_failed()``).

        A client belongs to the loop it was made on, so a new one is made. The budget keeps what
        was spent, but looks again: a retried row may fit where the last one didn't.
        """
        if self._loop is not None:
            self._client = None
            self.budget.stopped = None
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

    async def _send(self, body: dict[str, Any], tokens_booked: int) -> Any:
        import openai

        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire(tokens_booked)
            if self._client is None:
                self._client = self._make_client()
            failure: tuple[type[LLMError], str, int | None, float | None] | None = None
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
                retryable = False
            if failure is None:
                self.limiter.settle(tokens_booked, _total_tokens(data, tokens_booked))
                return data
            # Outside the except block: the openai exception (which holds the request and its
            # Authorization header) is not chained to the row's error.
            self.limiter.settle(tokens_booked, 0)
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

    def _where(self) -> str:
        return self._base_url or "api.openai.com"

    def _clean(self, text: str) -> str:
        return redact(" ".join(text.split()), self._api_key)

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


def usage_of(data: Any) -> tuple[int | None, int | None]:
    """``(prompt_tokens, completion_tokens)`` from a response, ``None`` where it doesn't say."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None, None
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (tokens_in if isinstance(tokens_in, int) else None, tokens_out if isinstance(tokens_out, int) else None)


def _total_tokens(data: Any, default: int) -> int:
    try:
        usage = data.get("usage") or {}
        return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    except (AttributeError, TypeError, ValueError):
        return default


def _schema_name(schema: Any) -> str:
    if isinstance(schema, Mapping):
        return str(schema.get("title", "the schema"))
    return getattr(schema, "__name__", "the schema")


def _first_problem(error: Exception) -> str:
    """``"severity: Input should be 'low' or 'high' (and 1 more)"`` from a pydantic ValidationError."""
    try:
        problems = error.errors()  # type: ignore[attr-defined]
    except Exception:
        return str(error).splitlines()[0]
    if not problems:
        return str(error).splitlines()[0]
    first = problems[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    text = f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
    return text + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def validate_structured(content: str, schema: Any, columns: tuple[str, ...], *, cut: bool = False) -> dict[str, Any]:
    """Parse and validate a structured answer; return one value per schema property.

    ``schema`` is a pydantic model class (validated by the model) or a JSON schema dict (validated
    with ``jsonschema`` when it is installed, else for required properties only).
    """
    shown = content if len(content) <= 120 else content[:117] + "..."
    name = _schema_name(schema)
    if cut:
        raise SchemaValidationError(f"the answer was cut off at max_tokens before its JSON ended: {shown!r}")
    if not isinstance(schema, Mapping):  # a pydantic model
        try:
            model = schema.model_validate_json(content)
        except Exception as error:  # pydantic.ValidationError
            raise SchemaValidationError(f"the answer doesn't match {name}: {_first_problem(error)}: {shown!r}") from None
        dumped = model.model_dump()
        return {column: dumped.get(column) for column in columns}
    try:
        value = json.loads(content)
    except ValueError as error:
        raise SchemaValidationError(f"the answer isn't valid JSON for {name} ({error}): {shown!r}") from None
    if not isinstance(value, dict):
        raise SchemaValidationError(f"the answer is a JSON {type(value).__name__}, not an object: {shown!r}")
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in schema.get("required", ()) if k not in value]
        if missing:
            raise SchemaValidationError(f"the answer lacks {missing[0]!r}, which {name} requires: {shown!r}") from None
    else:
        try:
            jsonschema.validate(value, dict(schema))
        except jsonschema.ValidationError as error:
            raise SchemaValidationError(f"the answer doesn't match {name}: {error.message}: {shown!r}") from None
    return {column: value.get(column) for column in columns}


class ContainerRow:
    """The row function as it runs in a Modal container: one :class:`Session` per container.

    The key comes from the container's environment (``OPENAI_API_KEY``, set by a Modal secret);
    so does ``OPENAI_BASE_URL`` when the run didn't name one. Limits are this container's share.
    """

    def __init__(self, request: Request, limits: Limits) -> None:
        self.request = request
        self.limits = limits
        self._session: Session | None = None

    def __reduce__(self) -> Any:
        return (ContainerRow, (self.request, self.limits))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} model={self.request.model!r} into={self.request.into!r}>"

    def _new_session(self) -> Session:
        import os

        return Session(
            self.request, self.limits, Meter(self.request.price is not None),
            api_key=os.environ.get("OPENAI_API_KEY"),
            base_url=self.request.base_url or os.environ.get("OPENAI_BASE_URL") or None,
            key_hint=": OPENAI_API_KEY is not set in the Modal container; pass a Modal secret that sets it, "
                     "e.g. secrets=['openai-secret']",
            idle_close_s=IDLE_CLOSE_S,
        )

    async def __call__(self, *values: Any) -> dict[str, Any]:
        if self._session is None:
            self._session = self._new_session()
        return await self._session.complete(values)


class WorkerRow(ContainerRow):
    """The row function in one of the kernel's own worker processes (``processes=``): one session each.

    Like a container's, with this process's share of the limits, but the key travels with it: over
    the socket to the kernel's worker process, and nowhere else. It is made by the backend just
    before sending (the cache fingerprints the :class:`~modal_magic.llm.LLMRowFunction`, which
    pickles without the key), and its repr doesn't show the key either.
    """

    def __init__(self, request: Request, limits: Limits, api_key: str | None, base_url: str | None) -> None:
        super().__init__(request, limits)
        _import_openai()  # runs as the worker unpickles it: start-up, before any row's clock starts
        self._api_key = api_key
        self._base_url = base_url

    def __reduce__(self) -> Any:
        return (WorkerRow, (self.request, self.limits, self._api_key, self._base_url))

    def _new_session(self) -> Session:
        return Session(self.request, self.limits, Meter(self.request.price is not None), api_key=self._api_key,
                       base_url=self._base_url, idle_close_s=IDLE_CLOSE_S)
