"""What goes into an OpenAI batch: one JSONL line per distinct row, split over the API's limits, at a worst-case price.

Each row still to run becomes a chat completion request line whose ``custom_id`` is the hex of the
row's key (:func:`modal_magic.cache.keys.row_keys`, keyed by the request's scope, see
:func:`~modal_magic.llm.batch.backend.request_scope`), so the answer comes back to the right rows in
any process, and rows with the same values share one request. :func:`plan_requests` builds the lines, :func:`fit_budget` keeps the rows whose worst case
fits ``budget_usd`` and :func:`split` cuts the rest into batches no larger than
:data:`SETTINGS` allows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..row.failures import BudgetExceeded
from ..row.limits import prompt_tokens_bound, usd

__all__ = ["BatchSettings", "SETTINGS", "PlannedRequest", "plan_requests", "fit_budget", "split"]


@dataclass
class BatchSettings:
    """The Batch API's limits and how often to look at a batch; change :data:`SETTINGS` to adjust them.

    Attributes
    ----------
    max_requests : int
        Requests in one batch (OpenAI: 50,000); more rows are split over several batches.
    max_bytes : int
        Bytes of one batch's input file (OpenAI: 200 MB).
    poll_first_s, poll_max_s : float
        The first wait between two looks at a running batch, doubling up to the longest.
    poll_failures : int
        Looks in a row that may fail (network trouble) before the run gives up waiting; the batch
        keeps running and running the cell again picks it up.

    Examples
    --------
    >>> BatchSettings().max_requests
    50000
    """

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024**2
    poll_first_s: float = 1.0
    poll_max_s: float = 30.0
    poll_failures: int = 20


#: The settings every batch run uses (``modal_magic.llm.batch.SETTINGS.max_requests = 10_000``...).
SETTINGS = BatchSettings()


@dataclass
class PlannedRequest:
    """One request line and the rows (positions in the run) its answer goes to."""

    custom_id: str
    key: bytes | None
    line: bytes
    worst_usd: float
    worst: str  # what the worst case is made of, for a BudgetExceeded message
    positions: list[int] = field(default_factory=list)


def plan_requests(session: Any, rows: Sequence[tuple[int, tuple[Any, ...]]], keys: Sequence[bytes | None],
                  max_output_tokens: int, price: tuple[float, float] | None
                  ) -> tuple[dict[str, PlannedRequest], dict[int, BaseException]]:
    """``({custom_id: request}, {position: error})`` for ``rows``: ``(position, template values)`` pairs.

    ``session`` builds each prompt and body (:class:`~modal_magic.llm.row.session.Session`); a row
    whose template can't be filled (an empty value) gets its error here and no request.
    """
    planned: dict[str, PlannedRequest] = {}
    errors: dict[int, BaseException] = {}
    for (position, values), key in zip(rows, keys):
        try:
            body = session.body(session.prompt(values))
        except Exception as error:  # MissingValue, or a value that can't fill the template
            errors[position] = error
            continue
        custom_id = key.hex() if key is not None else f"row-{os.urandom(8).hex()}"
        if custom_id in planned:
            planned[custom_id].positions.append(position)
            continue
        line = json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body},
                          ensure_ascii=False, default=str).encode() + b"\n"
        worst_in = prompt_tokens_bound(body)
        worst_usd = (worst_in * price[0] + max_output_tokens * price[1]) / 1e6 if price is not None else 0.0
        worst = f"{worst_in:,} prompt tokens at most + {max_output_tokens:,} output tokens"
        planned[custom_id] = PlannedRequest(custom_id, key, line, worst_usd, worst, [position])
    return planned, errors


def fit_budget(requests: list[PlannedRequest], limit_usd: float | None, spent_usd: float
               ) -> tuple[list[PlannedRequest], BudgetExceeded | None]:
    """The requests, in order, whose worst cases together fit in ``limit_usd - spent_usd``; and the error for the rest.

    As in a live run, once one request doesn't fit, neither does any later one (no cheap row
    sneaks in after an expensive one was turned away).

    Examples
    --------
    >>> r = [PlannedRequest(str(i), None, b"", 0.4, "w") for i in range(3)]
    >>> kept, error = fit_budget(r, 1.0, 0.1)
    >>> len(kept), str(error)[:59]
    (2, 'budget_usd=1.00: $0.10 spent and $0.80 booked for 2 request')
    """
    if limit_usd is None:
        return requests, None
    total = spent_usd
    for i, request in enumerate(requests):
        if total + request.worst_usd > limit_usd + 1e-12:
            return requests[:i], BudgetExceeded(
                f"budget_usd={usd(limit_usd)}: ${usd(spent_usd)} spent and ${usd(total - spent_usd)} booked for {i} "
                f"request(s) of this batch at their worst case; the next could cost up to ${usd(request.worst_usd)} "
                f"at batch prices ({request.worst}), which would pass it, so it and every later one was not "
                "submitted. Raise budget_usd, or pass a smaller max_tokens= so that each request books less")
        total += request.worst_usd
    return requests, None


def split(requests: list[PlannedRequest], settings: BatchSettings) -> list[list[PlannedRequest]]:
    """``requests`` cut into batches of at most ``settings.max_requests`` lines and ``settings.max_bytes`` bytes.

    Examples
    --------
    >>> r = [PlannedRequest(str(i), None, b"x" * 10, 0.0, "") for i in range(30)]
    >>> [len(b) for b in split(r, BatchSettings(max_requests=10))], [len(b) for b in split(r, BatchSettings(max_bytes=95))]
    ([10, 10, 10], [9, 9, 9, 3])
    """
    batches: list[list[PlannedRequest]] = []
    current: list[PlannedRequest] = []
    size = 0
    for request in requests:
        if len(request.line) > settings.max_bytes:
            raise ValueError(f"one request is {len(request.line):,} bytes, more than a batch file may hold "
                             f"({settings.max_bytes:,}): shorten the prompt, or run without batch=True")
        if current and (len(current) >= settings.max_requests or size + len(request.line) > settings.max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(request)
        size += len(request.line)
    if current:
        batches.append(current)
    return batches
