"""What an LLM row asks, and how fast and how far a process may go: request, limits, rate limiter, budget, meter.

Part of the row runtime (see :mod:`modal_magic.llm.row`): pickled by value into Modal
containers and worker processes, so only the standard library is imported here. A
:class:`Request` is what decides a row's answer (the cache fingerprints it); :class:`Limits` are
one process's share of ``rpm=`` and ``tpm=``, and its ``budget_usd=``; :class:`RateLimiter` and
:class:`Budget` enforce them across every request on one event loop, :func:`worst_case` is what a
budget books for each try, and :class:`Meter` keeps the running totals the progress bar shows.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .booking import Bookings
from .failures import BudgetExceeded

#: first wait before retrying a failed request without ``Retry-After``; doubles each try, with jitter
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 20.0
#: output tokens assumed for the *rate limiter* for a request without ``max_tokens``, until answers
#: have been seen (the budget never assumes: it books the worst case, see :func:`prompt_tokens_bound`)
DEFAULT_OUTPUT_ESTIMATE = 256
#: tokens the chat format adds per message beyond its role and content (OpenAI's own count is 3 or 4:
#: ``<|start|>``, ``<|message|>``, ``<|end|>``...), and per request (the reply's priming, 3); both doubled
#: the most output tokens booked for a model whose maximum is unknown (no ``max_tokens=``, not in
#: :data:`modal_magic.llm.prices.MAX_OUTPUT_TOKENS`): as much as any OpenAI chat model can give
UNKNOWN_MAX_OUTPUT_TOKENS = 128_000
MESSAGE_OVERHEAD_TOKENS = 8
REQUEST_OVERHEAD_TOKENS = 16
#: body fields that are plain settings, not text the model reads
_SETTINGS = frozenset({"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n",
                       "seed", "stream", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
                       "user", "store", "service_tier", "parallel_tool_calls", "reasoning_effort"})

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
    # None: OpenAI's (on Modal: the container's OPENAI_BASE_URL, if set). Out of the repr: it may
    # carry credentials (user-info, ?api_key=...).
    base_url: str | None = field(default=None, repr=False)
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
    #: the most output tokens one request can be billed: ``max_tokens=``, else the model's maximum
    #: (:data:`modal_magic.llm.prices.MAX_OUTPUT_TOKENS`); the budget books it before sending
    max_output_tokens: int | None = None

    def share(self, ways: int) -> Limits:
        """One of ``ways`` equal shares, for each of that many processes or containers.

        Examples
        --------
        >>> Limits(rpm=600, budget_usd=2.0).share(4)
        Limits(rpm=150.0, tpm=None, budget_usd=0.5, max_retries=5, request_timeout_s=120.0, max_output_tokens=None)

        Each share is a hard cap of its own, so the shares together never pass the whole; a budget
        is rounded *down* to the cent's millionth so that ``ways`` shares can't add up to more.

        >>> sum([Limits(budget_usd=0.01).share(3).budget_usd] * 3) <= 0.01
        True
        """
        budget = None
        if self.budget_usd:
            budget = math.floor(self.budget_usd / ways * 1e8) / 1e8
        return Limits(
            rpm=self.rpm / ways if self.rpm else None, tpm=self.tpm / ways if self.tpm else None,
            budget_usd=budget, max_retries=self.max_retries, request_timeout_s=self.request_timeout_s,
            max_output_tokens=self.max_output_tokens,
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

    Requests take their turn in the order they ask (:meth:`acquire`), and each starts when the clock
    has reached its slot: ``60 / rpm`` seconds after the previous request *started*, and after the
    previous requests' tokens (``tokens * 60 / tpm`` seconds each) have run through the token
    schedule. So over any window of ``w`` seconds at most ``rpm * w / 60 + 1`` requests start, and
    at most ``tpm * w / 60`` tokens plus one request's, on the clock, however late the event loop
    wakes: a loop held up for a second (a busy machine) sends the requests that were due one slot
    apart afterwards, not all at once. A server's ``Retry-After`` (:meth:`pause`) holds every
    request back, because a 429 means the shared limit is hit, not just one row's.

    Examples
    --------
    >>> limiter = RateLimiter(rpm=600, tpm=None, clock=lambda: 0.0)
    >>> [limiter.reserve(10) for _ in range(3)]
    [0.0, 0.1, 0.2]
    """

    def __init__(self, rpm: float | None, tpm: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.request_interval = 60.0 / rpm if rpm else 0.0
        self.token_interval = 60.0 / tpm if tpm else 0.0
        self._clock = clock
        self._sleep = sleep  # with ``clock``, what a test replaces to run on fake time
        self._next_request = -math.inf
        self._next_tokens = -math.inf
        self._paused_until = -math.inf
        self._turn: asyncio.Lock | None = None  # one per event loop: a Lock belongs to the loop it waits on
        self._turn_loop: Any = None

    def reserve(self, tokens: int) -> float:
        """Claim the next slot for a request of ``tokens``; return when (on the clock) it may start."""
        start = max(self._clock(), self._next_request, self._next_tokens, self._paused_until)
        if self.request_interval:
            self._next_request = start + self.request_interval
        if self.token_interval:
            self._next_tokens = start + tokens * self.token_interval
        return start

    def _due(self) -> float:
        """When the next request may start: the later of its request slot, the token schedule and a pause."""
        return max(self._next_request, self._next_tokens, self._paused_until)

    async def acquire(self, tokens: int) -> None:
        """Wait for this request's turn, then its slot; the slot is claimed when it is due, not before.

        Claiming at the moment of starting (rather than booking every waiting request's slot up
        front) is what keeps the spacing when the loop wakes late, and lets a :meth:`settle` or a
        :meth:`pause` that happens meanwhile move the waiting request.
        """
        if not (self.request_interval or self.token_interval):
            while (delay := self._paused_until - self._clock()) > 0:
                await self._sleep(delay)
            return
        loop = asyncio.get_running_loop()
        if self._turn is None or self._turn_loop is not loop:
            self._turn, self._turn_loop = asyncio.Lock(), loop  # FIFO: requests start in the order they asked
        async with self._turn:
            while (delay := self._due() - self._clock()) > 0:
                await self._sleep(delay)
            self.reserve(tokens)

    def settle(self, reserved: int, used: int) -> None:
        """A request used ``used`` tokens where ``reserved`` were booked: move the token schedule."""
        if self.token_interval and reserved != used:
            self._next_tokens += (used - reserved) * self.token_interval

    def pause(self, seconds: float) -> None:
        """Hold every request for ``seconds`` (the server said ``Retry-After``)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)


class Budget(Bookings):
    """A hard cap on dollars: each request books its worst case before it is sent.

    :meth:`acquire` books ``worst_usd`` (the most the request can be billed: its prompt's token
    bound plus every output token it may be given, see :func:`prompt_tokens_bound`) and
    :meth:`settle` gives back what the answer's usage shows was not used. A request is sent only
    when the money spent, plus what requests in flight have booked, plus its own worst case fits in
    ``limit_usd``; so what is spent never passes the limit, however many requests are in flight. A
    request that doesn't fit *yet* waits for those in flight to settle; one that can't fit even
    then (what is spent plus its worst case passes the limit) is refused with
    :class:`~modal_magic.llm.row.failures.BudgetExceeded`, and so is every later one (no cheap row
    sneaks in after an expensive one was turned away), so a run stops cleanly where the budget ran
    out, possibly with less than one worst case left unspent.

    Examples
    --------
    >>> import asyncio
    >>> budget = Budget(0.10)
    >>> async def run():
    ...     await budget.acquire(0.06); budget.settle(0.06, 0.05)
    ...     await budget.acquire(0.06, "1,000 prompt tokens at most + 500 output")
    >>> asyncio.run(run())
    Traceback (most recent call last):
    ...
    modal_magic.llm.row.failures.BudgetExceeded: budget_usd=0.10: $0.05 spent, and the next request could cost up to $0.06 (1,000 prompt tokens at most + 500 output), ...
    """

    def __init__(self, limit_usd: float | None) -> None:
        super().__init__(limit_usd)  # the booking arithmetic, shared with a map's budget
        self.stopped: str | None = None
        self.overrun: str | None = None  # the endpoint billed more than a request's worst case
        self._waiters: list[Any] = []  # futures of requests waiting for those in flight to settle

    def _limit(self) -> str:
        # A share of a budget (0.015 of 0.03) is shown as it is, not rounded to the cent.
        limit = self.limit_usd or 0.0
        return usd(limit) if abs(limit * 100 - round(limit * 100)) < 1e-9 else f"{limit:.6g}"

    def _refuse(self, worst_usd: float, detail: str) -> BudgetExceeded:
        if self.stopped is None:
            self.stop(worst_usd, detail)
            self._wake()  # the requests waiting for room are refused too, now rather than later
        return BudgetExceeded(self.stopped)

    def stop(self, worst_usd: float, detail: str, unsent: str = "it and every later one was not sent") -> str:
        """Refuse every request from now on, because one whose worst case is ``worst_usd`` didn't fit;
        return the message the rows not sent get (``unsent`` says which they are)."""
        why = f" ({detail})" if detail else ""
        self.stopped = (
            f"budget_usd={self._limit()}: ${usd(self.spent_usd)} spent, and the next request could cost "
            f"up to ${usd(worst_usd)}{why}, which would pass it, so {unsent}. "
            "Raise budget_usd, or pass a smaller max_tokens= so that each request books less, and run "
            "again: rows already answered are not paid for twice"
        )
        if self.overrun:
            self.stopped += f". {self.overrun}"
        return self.stopped

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def acquire(self, worst_usd: float, detail: str = "") -> None:
        """Book ``worst_usd`` for one request, waiting for requests in flight if they hold the room it needs."""
        if self.limit_usd is None:
            return
        while True:
            verdict = self.check(worst_usd)
            if self.stopped is not None or verdict == "refuse":
                raise self._refuse(worst_usd, detail)
            if verdict == "book":
                self.book(worst_usd)
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def settle(self, worst_usd: float, actual_usd: float) -> None:
        """A request booked ``worst_usd`` and was billed ``actual_usd`` (0 when it got no answer)."""
        if self.limit_usd is None:
            self.spent_usd += actual_usd
            return
        self.release(worst_usd, actual_usd)
        if actual_usd > worst_usd * (1 + 1e-9):
            self._note_overrun(worst_usd, actual_usd)
        self._wake()

    def _note_overrun(self, worst_usd: float, actual_usd: float) -> None:
        # Only an endpoint that bills past max_tokens, or counts a prompt at more than a token a
        # byte, does this; say so, and send nothing more.
        self.overrun = (f"the endpoint billed ${usd(actual_usd)} for a request whose worst case was "
                        f"${usd(worst_usd)}: it counts tokens differently from OpenAI, so the cap can't be kept "
                        "with it")
        self.stopped = f"budget_usd={self._limit()}: ${usd(self.spent_usd)} spent. {self.overrun}"

    def restart(self) -> None:
        """A new run of the same function (e.g. ``retry_failed()``): keep what was spent, look again.

        What is booked for requests in flight stays booked: each is settled when its try ends.
        """
        self.stopped = None
        self._waiters = []


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
    """A rough token count (4 characters a token) for the rate limiter, before the answer says.

    Never for the budget, which needs a count that can't be too low: :func:`prompt_tokens_bound`.
    """
    return math.ceil(len(text) / 4)


def prompt_tokens_bound(body: dict[str, Any]) -> int:
    """At least as many prompt tokens as OpenAI can bill for the chat completion ``body``.

    OpenAI's tokenizers (``cl100k_base``, ``o200k_base``) are byte-level BPE: every token of text
    stands for at least one byte of its UTF-8 encoding, so a text has at most as many tokens as
    bytes. The bound is therefore each message's role and content in UTF-8 bytes, plus
    :data:`MESSAGE_OVERHEAD_TOKENS` a message for the chat format's own tokens, plus
    :data:`REQUEST_OVERHEAD_TOKENS`, plus every other field the model reads (``response_format``'s
    schema, tools from ``extra_body``...) as the bytes of its JSON. It needs no tokenizer (``tiktoken``
    downloads its BPE files on first use, which a machine without internet can't), and for English
    text it is about 4 times the real count: a budget books that much more per request in flight,
    and gives it back as soon as the answer's usage says.

    Examples
    --------
    >>> prompt_tokens_bound({"model": "m", "messages": [{"role": "user", "content": "héllo"}]})
    34
    """
    total = REQUEST_OVERHEAD_TOKENS
    for message in body.get("messages") or ():
        total += MESSAGE_OVERHEAD_TOKENS
        for value in message.values():
            total += len((value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode())
    for name, value in body.items():
        if name not in _SETTINGS:
            total += len(json.dumps(value, ensure_ascii=False, default=str).encode())
    return total



def cost_usd(price: tuple[float, float] | None, tokens_in: int | None, tokens_out: int | None) -> float | None:
    """What ``tokens_in`` prompt and ``tokens_out`` output tokens cost at ``price`` (USD per million each).

    Examples
    --------
    >>> cost_usd((0.15, 0.60), 1_000, 500), cost_usd(None, 1_000, 500)
    (0.00045, None)
    """
    if price is None or tokens_in is None or tokens_out is None:
        return None
    return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000


def worst_case(request: Request, body: dict[str, Any], max_output_tokens: int | None) -> tuple[float, str]:
    """The most one try of ``body`` can be billed, in dollars, and what that is made of (for messages).

    Its prompt's token bound (:func:`prompt_tokens_bound`) plus every output token it may be given:
    ``max_tokens=``, else ``max_output_tokens`` (the model's most), else
    :data:`UNKNOWN_MAX_OUTPUT_TOKENS`. The one arithmetic of every live budget: a process's
    :class:`Budget` books it before each try, and on Modal the kernel books it for each row of a
    batch before sending it (:mod:`~modal_magic.llm.row.allotment`), so both agree to the cent.

    Examples
    --------
    >>> request = Request(template="{t}", fields=("t",), model="gpt-4o-mini", into="a", price=(0.15, 0.60))
    >>> usd_, detail = worst_case(request, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    ...                           16_384)
    >>> round(usd_, 7), detail
    (0.0098349, "30 prompt tokens at most + 16,384 output tokens (gpt-4o-mini's most, as max_tokens is not set)")
    """
    worst_in = prompt_tokens_bound(body)
    if request.max_tokens is not None:
        worst_out, why = request.max_tokens, "max_tokens"
    else:
        worst_out = max_output_tokens or UNKNOWN_MAX_OUTPUT_TOKENS
        why = f"{request.model}'s most, as max_tokens is not set"
    detail = f"{worst_in:,} prompt tokens at most + {worst_out:,} output tokens ({why})"
    return cost_usd(request.price, worst_in, worst_out) or 0.0, detail


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

