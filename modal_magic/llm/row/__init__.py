"""The LLM row runtime: what runs where the rows run, one chat completion per row.

It runs on the kernel's event loop, in the kernel's worker processes (``processes=``) and inside
Modal containers, where it arrives pickled by value (cloudpickle, this whole package registered at
once) and modal_magic is not installed. So these modules import only the standard library and each
other at the top:

- :mod:`~modal_magic.llm.row.session`: the :class:`Session` a process shares across its rows
  (client, retries);
- :mod:`~modal_magic.llm.row.shipped`: the row functions as shipped, :class:`ContainerRow` (a Modal
  container) and :class:`WorkerRow` (a worker process);
- :mod:`~modal_magic.llm.row.answers`: an answer's usage, and a structured answer checked against its schema;
- :mod:`~modal_magic.llm.row.booking`: the arithmetic of a hard dollar cap (shared with a map's ``budget_usd``);
- :mod:`~modal_magic.llm.row.allotment`: a Modal batch's share of ``budget_usd``, booked by the kernel, as its rows book it;
- :mod:`~modal_magic.llm.row.limits`: :class:`Request`, :class:`Limits`, :class:`RateLimiter`,
  :class:`Budget`, :class:`Meter`, and the retry timing;
- :mod:`~modal_magic.llm.row.failures`: the errors a row ends with, and keeping the key out of them.
"""

from __future__ import annotations

from .failures import (APIConnectionError, APIError, APIStatusError, AuthenticationError, BudgetExceeded, EmptyAnswer,
                       InternalServerError, LLMError, MissingValue, RateLimitError, SchemaValidationError,
                       error_for_status, redact)
from .limits import (Budget, Limits, Meter, RateLimiter, Request, backoff_s, estimate_tokens, prompt_tokens_bound,
                     retry_after_s, usd)
from .answers import usage_of, validate_structured
from .session import Session, is_missing
from .shipped import ContainerRow, WorkerRow

__all__ = [
    "APIConnectionError", "APIError", "APIStatusError", "AuthenticationError", "Budget", "BudgetExceeded",
    "ContainerRow", "EmptyAnswer", "InternalServerError", "LLMError", "Limits", "Meter", "MissingValue",
    "RateLimitError", "RateLimiter", "Request", "SchemaValidationError", "Session", "WorkerRow", "backoff_s",
    "error_for_status", "estimate_tokens", "is_missing", "prompt_tokens_bound", "redact", "retry_after_s", "usage_of", "usd",
    "validate_structured",
]
