"""How one LLM row can fail: the exceptions a row ends with, and keeping the API key out of them.

Part of the row runtime (see :mod:`modal_magic.llm.row`): it runs inside Modal containers and
worker processes pickled by value, so it imports only the standard library. Every request error
says how many HTTP tries it took (``row_attempts``) and an answer paid for but unusable says what
it cost (``row_usage``): the :class:`~modal_magic.errors.RowReport` contract the engine reads.
"""

from __future__ import annotations

import re
from typing import Any

_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+)")

class LLMError(Exception):
    """A request that did not give an answer; ``status`` is the HTTP status when there was one."""

    row_usage: tuple[int, float | None] | None = None  # a request that failed was not paid for

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts

    @property
    def row_attempts(self) -> int:
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

    # Paid for although unusable: Session.complete sets row_usage on the instance, and it travels
    # back from a container with the exception (modal_magic.errors.RowReport).
    row_attempts = 1
    row_usage: tuple[int, float | None] | None = None


class EmptyAnswer(ValueError):
    """The endpoint answered without content (a refusal, or a malformed response)."""

    # Paid for although unusable: Session.complete sets row_usage on the instance, and it travels
    # back from a container with the exception (modal_magic.errors.RowReport).
    row_attempts = 1
    row_usage: tuple[int, float | None] | None = None


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

