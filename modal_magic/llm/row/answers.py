"""What an answer holds: its token usage, and a structured answer checked against ``schema=``.

Part of the row runtime (see :mod:`modal_magic.llm.row`): pickled by value into Modal containers
and worker processes, so only the standard library is imported at the top (``jsonschema`` where a
dict schema is checked). Live rows and batch rows (:mod:`modal_magic.llm.batch`) read their answers
with these.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .failures import SchemaValidationError

__all__ = ["usage_of", "validate_structured"]


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
