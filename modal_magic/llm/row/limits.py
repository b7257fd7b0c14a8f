"""What an LLM row asks, and how fast and how far a process may go: request, limits, rate limiter, budget, meter.

Part of the row runtime (see :mod:`modal_magic.llm.row`): pickled by value into Modal
containers and worker processes, so only the standard library is imported here. A
:class:`Request` is what decides a row's answer (the cache fingerprints it); :class:`Limits` are
one process's share of ``rpm=``, ``tpm=`` and ``budget_usd=``; :class:`RateLimiter` and
:class:`Budget` enforce them across every request on one event loop, and :class:`Meter` keeps the
running totals the progress bar shows.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from .failures import BudgetExceeded

#: first wait before retrying a failed request without ``Retry-After``; doubles each try, with jitter
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 20.0
#: output tokens assumed for a request without ``max_tokens``, until answers have been seen
DEFAULT_OUTPUT_ESTIMATE = 256

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
    modal_magic.llm.row.failures.BudgetExceeded: budget_usd=0.10 reached after $0.05: the next request would cost about $0.06, ...
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
    plus the usage that failed rows carry (``row_usage``, see :class:`modal_magic.errors.RowReport`).
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
            # The RowReport contract, read by name: this runs where modal_magic may not be installed.
            usage = getattr(error[-1], "row_usage", None)
            if usage is not None:
                self.add(*usage)



def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for rate limits and budgets before the answer says."""
    return math.ceil(len(text) / 4)



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

