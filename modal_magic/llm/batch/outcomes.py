"""What a finished OpenAI batch says about each row: its answer columns, or the error it ends with.

A batch's output file holds one JSON line per request that got an HTTP answer (``custom_id``,
``response.status_code``, ``response.body``) and its error file the requests that failed (an HTTP
error, or ``error.code`` ``batch_expired`` / ``batch_cancelled`` for those never run). :func:`read_lines`
indexes them by ``custom_id``; :func:`outcome` turns one into the row's result columns, parsed by
the same code as a live answer (schema validation included), or into an exception:
:class:`BatchExpired`, :class:`BatchCancelled` and :class:`BatchFailed` say what happened to the
batch and what to do (``out.modal.retry_failed()`` submits those rows again).
"""

from __future__ import annotations

import json
from typing import Any

from ..row.failures import EmptyAnswer, LLMError, SchemaValidationError, error_for_status
from ..row.session import usage_of

__all__ = ["BatchCancelled", "BatchExpired", "BatchFailed", "BatchLost", "outcome", "read_lines", "unfinished_error"]

_AGAIN = "out.modal.retry_failed() (or running the cell again) submits these rows again"


class BatchExpired(LLMError):
    """The batch's 24-hour window ended before this row's request ran; it was not paid for."""


class BatchCancelled(LLMError):
    """The batch was cancelled before this row's request ran; it was not paid for."""


class BatchFailed(LLMError):
    """The batch as a whole failed (OpenAI refused its input file, or it could not be submitted)."""


class BatchLost(LLMError):
    """The run stopped waiting for the batch (the endpoint stopped answering); the batch may still finish."""


def read_lines(text: str) -> dict[str, dict[str, Any]]:
    """``{custom_id: line}`` from a batch's output or error file (JSON lines; blank lines skipped).

    Examples
    --------
    >>> sorted(read_lines('{"custom_id": "a", "response": null}\\n\\n{"custom_id": "b"}\\n'))
    ['a', 'b']
    """
    found: dict[str, dict[str, Any]] = {}
    for raw in text.splitlines():
        if raw.strip():
            line = json.loads(raw)
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                found[line["custom_id"]] = line
    return found


def unfinished_error(batch_id: str, status: str, detail: str = "") -> LLMError:
    """The error of a row its batch never ran: expired, cancelled or failed.

    Examples
    --------
    >>> str(unfinished_error("batch_1", "expired"))[:69]
    "OpenAI's batch batch_1 expired (its 24 h window ended) before this re"
    """
    if status == "expired":
        return BatchExpired(f"OpenAI's batch {batch_id} expired (its 24 h window ended) before this request ran; "
                            f"it was not paid for. {_AGAIN}")
    if status in ("cancelled", "cancelling"):
        return BatchCancelled(f"OpenAI's batch {batch_id} was cancelled before this request ran; it was not paid "
                              f"for. {_AGAIN}")
    why = f": {detail}" if detail else ""
    return BatchFailed(f"OpenAI's batch {batch_id} {status}{why}; {_AGAIN}")


def outcome(session: Any, batch_id: str, line: dict[str, Any] | None, status: str,
            clean: Any = str) -> tuple[dict[str, Any] | None, BaseException | None]:
    """``(result columns, None)`` or ``(None, error)`` for one request of a finished batch.

    ``line`` is its output or error line (``None`` when the batch has none for it: it never ran);
    ``session`` parses an answer as a live run would, at the prices it was made with; ``clean``
    takes secrets out of a message the endpoint wrote.
    """
    if line is None:
        return None, unfinished_error(batch_id, status)
    response = line.get("response")
    error = line.get("error")
    if not isinstance(response, dict):
        code = (error or {}).get("code") if isinstance(error, dict) else None
        if code == "batch_expired":
            return None, unfinished_error(batch_id, "expired")
        if code == "batch_cancelled":
            return None, unfinished_error(batch_id, "cancelled")
        message = (error or {}).get("message") if isinstance(error, dict) else None
        return None, BatchFailed(f"OpenAI's batch {batch_id} didn't run this request: "
                                 f"{clean(str(message or code or error))}; {_AGAIN}")
    code = response.get("status_code")
    body = response.get("body")
    if code != 200:
        inner = body.get("error", body) if isinstance(body, dict) else body
        message = inner.get("message") if isinstance(inner, dict) else inner
        cls = error_for_status(code) if isinstance(code, int) else LLMError
        return None, cls(f"{code} from batch {batch_id}: {clean(str(message))}",
                         status=code if isinstance(code, int) else None)
    tokens_in, tokens_out = usage_of(body)
    try:
        return session.parse(body, tokens_in, tokens_out), None
    except (EmptyAnswer, SchemaValidationError) as failure:
        failure.row_usage = ((tokens_in or 0) + (tokens_out or 0), session.cost(tokens_in, tokens_out))
        return None, failure
