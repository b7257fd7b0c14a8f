"""What LLM tokens cost: :data:`PRICES` (USD per million tokens) and :func:`price_for`.

The cost columns and ``budget_usd=`` both come from here. The table is dated
(:data:`PRICES_AS_OF`); pass ``prices=`` for a model it lacks or to correct it, or change the dict
itself.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..errors import OptionsError
from .row.limits import UNKNOWN_MAX_OUTPUT_TOKENS

__all__ = ["BATCH_PRICES", "BATCH_PRICES_AS_OF", "DEFAULT_MAX_OUTPUT_TOKENS", "MAX_OUTPUT_TOKENS", "PRICES", "PRICES_AS_OF",
           "batch_price_for", "max_output_for", "price_for"]

#: When :data:`PRICES` was read off OpenAI's pricing page (standard tier; no cached-input, batch or
#: flex discounts); rechecked in 2026-11 against copies of that page from March to June 2026, which
#: agree on every row. Prices change: pass ``prices=`` or edit :data:`PRICES` when they do.
PRICES_AS_OF = "2026-03"
#: USD per million tokens, ``model: (input, output)``. A dated snapshot name
#: (``gpt-4o-mini-2024-07-18``) takes its model's price. Models not here get no cost column values
#: (and can't run with ``budget_usd=``) unless ``prices=`` names them.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-5.4": (2.50, 15.00),
    "gpt-5.1": (1.25, 10.00),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}

#: When :data:`BATCH_PRICES` was read off OpenAI's pricing page ("Batch" tier): half the standard
#: price of every model in :data:`PRICES`, input and output alike.
BATCH_PRICES_AS_OF = "2026-03"
#: USD per million tokens through the Batch API (``df.modal.llm(..., batch=True)``), ``model: (input, output)``.
BATCH_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5.4": (1.25, 7.50),
    "gpt-5.1": (0.625, 5.00),
    "gpt-5": (0.625, 5.00),
    "gpt-5-mini": (0.125, 1.00),
    "gpt-5-nano": (0.025, 0.20),
    "gpt-4.1": (1.00, 4.00),
    "gpt-4.1-mini": (0.20, 0.80),
    "gpt-4.1-nano": (0.05, 0.20),
    "gpt-4o": (1.25, 5.00),
    "gpt-4o-mini": (0.075, 0.30),
    "o3": (1.00, 4.00),
    "o3-mini": (0.55, 2.20),
    "o4-mini": (0.55, 2.20),
    "gpt-3.5-turbo": (0.25, 0.75),
}

#: The most output tokens (reasoning tokens included) one request to ``model`` can be billed, from
#: OpenAI's model pages as of :data:`PRICES_AS_OF`. ``budget_usd=`` books this much output for every
#: request in flight when ``max_tokens=`` is not set, so a budget can't be passed by long answers.
MAX_OUTPUT_TOKENS: dict[str, int] = {
    "gpt-5.4": 128_000,
    "gpt-5.1": 128_000,
    "gpt-5": 128_000,
    "gpt-5-mini": 128_000,
    "gpt-5-nano": 128_000,
    "gpt-4.1": 32_768,
    "gpt-4.1-mini": 32_768,
    "gpt-4.1-nano": 32_768,
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
    "o3": 100_000,
    "o3-mini": 100_000,
    "o4-mini": 100_000,
    "gpt-3.5-turbo": 4_096,
}
#: what a model not in :data:`MAX_OUTPUT_TOKENS` is assumed to give at most: as much as any of them
DEFAULT_MAX_OUTPUT_TOKENS = UNKNOWN_MAX_OUTPUT_TOKENS

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|latest)$")


def _price(value: Any, model: str) -> tuple[float, float]:
    if isinstance(value, Mapping):
        value = (value.get("input"), value.get("output"))
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)):
        return float(value[0]), float(value[1])
    raise OptionsError(f"prices[{model!r}]={value!r} is not valid: expected (input, output) in USD per "
                       "million tokens, e.g. (0.15, 0.60)")


def price_for(model: str, prices: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
    """USD per million ``(input, output)`` tokens for ``model``: ``prices`` first, then :data:`PRICES`.

    Examples
    --------
    >>> price_for("gpt-4o-mini"), price_for("gpt-4o-mini-2024-07-18"), price_for("llama3")
    ((0.15, 0.6), (0.15, 0.6), None)
    >>> price_for("llama3", {"llama3": (0, 0)})
    (0.0, 0.0)
    """
    for table in (prices or {}, PRICES):
        for name in (model, _SNAPSHOT.sub("", model)):
            if name in table:
                return _price(table[name], name)
    return None


def batch_price_for(model: str, prices: Mapping[str, Any] | None = None) -> tuple[float, float] | None:
    """USD per million ``(input, output)`` tokens for ``model`` through the Batch API.

    A model named in ``prices`` (what you pay live) costs half of that in a batch, as OpenAI's Batch
    API does; else :data:`BATCH_PRICES`; else ``None``.

    Examples
    --------
    >>> batch_price_for("gpt-4o-mini"), batch_price_for("gpt-4o-mini-2024-07-18"), batch_price_for("llama3")
    ((0.075, 0.3), (0.075, 0.3), None)
    >>> batch_price_for("llama3", {"llama3": (2.0, 4.0)})
    (1.0, 2.0)
    """
    for name in (model, _SNAPSHOT.sub("", model)):
        if prices and name in prices:
            live = _price(prices[name], name)
            return live[0] / 2, live[1] / 2
    for name in (model, _SNAPSHOT.sub("", model)):
        if name in BATCH_PRICES:
            return _price(BATCH_PRICES[name], name)
    return None


def max_output_for(model: str, max_tokens: int | None = None) -> int:
    """The most output tokens one request can be billed: ``max_tokens``, else the model's maximum.

    A model missing from :data:`MAX_OUTPUT_TOKENS` gets :data:`DEFAULT_MAX_OUTPUT_TOKENS`, which
    is meant to be too many rather than too few: pass ``max_tokens=`` to book less.

    Examples
    --------
    >>> max_output_for("gpt-4o-mini"), max_output_for("gpt-4o-mini-2024-07-18"), max_output_for("llama3")
    (16384, 16384, 128000)
    >>> max_output_for("gpt-4o-mini", max_tokens=50)
    50
    """
    if max_tokens is not None:
        return max_tokens
    for name in (model, _SNAPSHOT.sub("", model)):
        if name in MAX_OUTPUT_TOKENS:
            return MAX_OUTPUT_TOKENS[name]
    return DEFAULT_MAX_OUTPUT_TOKENS
