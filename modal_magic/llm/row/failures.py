"""How one LLM row can fail: the exceptions a row ends with, and keeping the API key out of them.

Part of the row runtime (see :mod:`modal_magic.llm.row`): it runs inside Modal containers and
worker processes pickled by value, so it imports only the standard library. Every request error
says how many HTTP tries it took (``row_attempts``) and an answer paid for but unusable says what
it cost (``row_usage``): the :class:`~modal_magic.errors.RowReport` contract the engine reads.
"""

from __future__ import annotations

import base64
import pickle
import re
import sys
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,}|Bearer\s+\S+|Basic\s+[A-Za-z0-9+/=]{4,})")
#: the user-info of a URL anywhere in a text (``https://user:pass@host``)
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@?#]+@")
#: a credential in a query string anywhere in a text (``?api_key=...``, ``&sig=...``)
_QUERY_SECRET = re.compile(
    r"([?&;](?:[A-Za-z0-9_\-]*(?:key|token|secret|password|passwd|pwd|auth|sig|signature|credential|code|session))=)"
    r"[^&#\s'\"<>]+", re.IGNORECASE)
#: query parameters shown as they are in a redacted URL: they say which API, never who calls it
_PUBLIC_QUERY = frozenset({"api-version", "api_version"})

def _importable(obj: Any) -> Any:
    """The object of the same name in the importable module, where there is one; else ``obj`` itself.

    This package travels pickled by value (cloudpickle), so an error that comes back from a worker
    process or a container is an instance of a *copy* of its class, which plain ``pickle`` can't
    refer to by name ("not the same object as ..."). Where modal_magic is imported (the kernel) the
    real class and rebuild function are used instead, so the error pickles like any other; where
    it isn't (a Modal container), the copies are all there is and cloudpickle sends them by value.
    """
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    real = getattr(module, getattr(obj, "__qualname__", ""), None) if module is not None else None
    return real if real is not None else obj


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class _Portable:
    """Pickles as its importable class, whichever copy of the class it was made by (see :func:`_importable`)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_importable(_rebuild), (_importable(type(self)), self.args, dict(self.__dict__)))  # type: ignore[attr-defined]


def portable(error: BaseException) -> BaseException:
    """``error`` as an instance of its importable class when it is a by-value copy's (else unchanged).

    The kernel calls this on the errors that come back from worker processes and containers, so
    that ``isinstance(e, modal_magic.llm.row.RateLimitError)`` holds and ``pickle`` works without
    modal_magic's help.

    Examples
    --------
    >>> error = RateLimitError("429 from api.openai.com", status=429, attempts=3)
    >>> portable(error) is error
    True
    """
    # By module name, not isinstance: a copy's instance is no instance of this module's _Portable.
    cls = type(error)
    if cls.__module__ == __name__ and _importable(cls) is not cls:
        return pickle.loads(pickle.dumps(error))
    return error


class LLMError(_Portable, Exception):
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


class MissingValue(_Portable, ValueError):
    """A column the template uses is empty in this row; no request was sent."""


class SchemaValidationError(_Portable, ValueError):
    """The answer is not JSON matching ``schema=`` (retried with the row's ``retries=``)."""

    # Paid for although unusable: Session.complete sets row_usage on the instance, and it travels
    # back from a container with the exception (modal_magic.errors.RowReport).
    row_attempts = 1
    row_usage: tuple[int, float | None] | None = None


class EmptyAnswer(_Portable, ValueError):
    """The endpoint answered without content (a refusal, or a malformed response)."""

    # Paid for although unusable: Session.complete sets row_usage on the instance, and it travels
    # back from a container with the exception (modal_magic.errors.RowReport).
    row_attempts = 1
    row_usage: tuple[int, float | None] | None = None


class BudgetExceeded(_Portable, RuntimeError):
    """``budget_usd=`` would be passed by this request: it, and every later one, was not sent."""


_STATUS_ERRORS: dict[int, type[LLMError]] = {401: AuthenticationError, 403: AuthenticationError, 429: RateLimitError}


def error_for_status(status: int) -> type[LLMError]:
    """The exception class for an HTTP error status (any 5xx is an ``InternalServerError``)."""
    if status >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status, APIStatusError)


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with each of ``secrets`` (the API key, a base URL's credentials), anything shaped like
    a key or a bearer token, and any URL's user-info or credential-like query value replaced by ``***``.

    Examples
    --------
    >>> redact("Incorrect API key provided: sk-abc123456789xyz.", "sk-abc123456789xyz")
    'Incorrect API key provided: ***.'
    >>> redact("header Bearer tok_123", None)
    'header ***'
    >>> redact("GET https://me:hunter22@host/v1?api_key=XYZ123&api-version=1 failed")
    'GET https://***@host/v1?api_key=***&api-version=1 failed'
    """
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _SECRET_LIKE.sub("***", text)


def url_secrets(url: str | None) -> tuple[str, ...]:
    """What in ``url`` must never be shown: its user-info and query values, as written and decoded.

    Examples
    --------
    >>> url_secrets("https://me:p%40ss@host/v1?api_key=XYZ&api-version=1")
    ('me:p%40ss', 'me', 'p%40ss', 'p@ss', 'bWU6cEBzcw==', 'XYZ')
    >>> url_secrets("http://localhost:8000/v1")
    ()
    """
    if not url:
        return ()
    parts = urlsplit(url)
    found: list[str] = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        found.append(userinfo)
        for piece in userinfo.split(":", 1):
            found += [piece, unquote(piece)]
        # The HTTP client sends user-info as "Authorization: Basic base64(user:password)", and a
        # server may echo that header back in an error message.
        found.append(base64.b64encode(unquote(userinfo).encode()).decode())
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        if value and unquote_plus(name).lower() not in _PUBLIC_QUERY:
            found += [value, unquote_plus(value)]  # as written, and as a server or a library may print it
    return tuple(dict.fromkeys(f for f in found if f))


def redact_url(url: str | None) -> str | None:
    """``url`` as it may be shown: user-info and every query value but ``api-version`` replaced by ``***``.

    Examples
    --------
    >>> redact_url("https://me:pass@host:8443/v1?api_key=SECRET&api-version=2024-06-01")
    'https://***@host:8443/v1?api_key=***&api-version=2024-06-01'
    >>> redact_url("http://localhost:8000/v1")
    'http://localhost:8000/v1'
    """
    if not url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        p if "=" not in p or p.partition("=")[0].lower() in _PUBLIC_QUERY else f"{p.partition('=')[0]}=***"
        for p in parts.query.split("&")
    ) if parts.query else ""
    shown = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")

