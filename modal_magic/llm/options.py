"""The LLM options: one frozen, validated :class:`LLMOptions`, declared once per option.

``df.modal.llm(...)``, :func:`modal_magic.llm.llm_frame` and the ``%%modal_llm`` flags all take
their LLM parameters (model, limits, schema...) from the declarations here, made with
:func:`modal_magic.declarations.option` as :class:`~modal_magic.options.MapOptions`'s are, and checked
with the same check functions. What depends on the map options too (``processes=`` needs the local
backend, Modal needs a secret...) is checked by :meth:`LLMOptions.check_with`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ..declarations import Flag, declared_options, option, unknown_option
from ..errors import OptionsError
from ..options import DEFAULT_LLM_CONCURRENCY, invalid, non_negative_int, positive_int, positive_number, true_or_false
from .prices import PRICES_AS_OF, price_for
from .row.failures import redact_url

if TYPE_CHECKING:
    from ..declarations import Option
    from ..options import MapOptions

__all__ = ["DEFAULT_CONCURRENCY", "DEFAULT_INTO", "DEFAULT_MODEL", "LLM_OPTIONS", "LLM_OPTION_NAMES", "LLMOptions",
           "schema_parts"]

DEFAULT_MODEL = "gpt-4o-mini"
#: the answer column when ``into=`` isn't given (tokens and cost go to ``answer_tokens_in``...)
DEFAULT_INTO = "answer"
#: requests in flight at once on the local asyncio backend when ``max_containers=`` isn't given
DEFAULT_CONCURRENCY = DEFAULT_LLM_CONCURRENCY

_MODEL = "The model"
_LIMITS = "Limits"


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(name, value, f"a model name such as {DEFAULT_MODEL!r}" if name == "model"
                      else "a non-empty string")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise invalid(name, value, "the system prompt (a string) or None" if name == "system" else "a string or None")
    return value


def _temperature(name: str, value: Any) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2):
        raise invalid(name, value, "a number from 0 to 2, or None")
    return float(value) if value is not None else None


def _schema(name: str, value: Any) -> Any:
    if value is not None:
        schema_parts(value)  # raises for anything that can't be a response format
    return value


def _mapping(name: str, value: Any) -> Mapping[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        raise invalid(name, value, "a dict, or None")
    return value


def _processes(name: str, value: Any) -> int:
    if value is None:
        raise invalid(name, value, "a whole number of at least 1")
    return positive_int(name, value)  # type: ignore[return-value]


@dataclass(frozen=True)
class LLMOptions:
    """The parameters of an LLM run, beyond the map options: model, prompt settings, limits, schema.

    Build it with :meth:`create`, which validates each value and the ones that go together.

    Examples
    --------
    >>> opts = LLMOptions.create(model="gpt-4o-mini", max_tokens=10, rpm=500)
    >>> opts.max_tokens, opts.rpm, opts.max_retries
    (10, 500.0, 5)
    >>> LLMOptions.create(rpm=0)
    Traceback (most recent call last):
    ...
    modal_magic.errors.OptionsError: rpm=0 is not valid: expected a number greater than 0, or None
    """

    model: str = option(DEFAULT_MODEL, _text, "The chat model.",
                        trait="text", flag=Flag(group=_MODEL))
    system: str | None = option(None, _optional_text, "A system prompt.",
                                trait="text", flag=Flag(metavar="TEXT", group=_MODEL))
    temperature: float | None = option(None, _temperature, "Sampling temperature, from 0 to 2.",
                                       trait="number", flag=Flag(type=float, group=_MODEL))
    max_tokens: int | None = option(
        None, positive_int, "The most tokens one answer may have (sent as max_completion_tokens to the o-series "
        "and gpt-5 models).", trait="whole", flag=Flag(type=int, metavar="N", group=_MODEL))
    schema: Any = option(
        None, _schema, "A pydantic model class (strict structured output) or a JSON schema dict: one column per "
        "field (on the magic's line: its name in the notebook).",
        trait="name", flag=Flag(metavar="NAME", group=_MODEL))
    base_url: str | None = option(
        None, _optional_text, "An OpenAI-compatible endpoint (default OPENAI_BASE_URL, else OpenAI).",
        trait="text", flag=Flag(metavar="URL", group=_MODEL))
    api_key: str | None = option(
        None, _optional_text, "The API key (default OPENAI_API_KEY, else a .env file; on Modal, a secret).",
        trait="text", flag=None)
    rpm: float | None = option(None, positive_number, "Requests per minute, across every request in flight.",
                               trait="number", flag=Flag(type=float, metavar="N", group=_LIMITS))
    tpm: float | None = option(None, positive_number, "Tokens per minute, across every request in flight.",
                               trait="number", flag=Flag(type=float, metavar="N", group=_LIMITS))
    budget_usd: float | None = option(
        None, positive_number, "Send no request that would take the run's cost past this; rows not sent get a "
        "BudgetExceeded error. On Modal this kernel books each batch's worst case before sending it, so it "
        "holds whatever the containers do, with no max_containers needed.", trait="number", flag=Flag(type=float, metavar="USD", group=_LIMITS))
    prices: Mapping[str, Any] | None = option(
        None, _mapping, "{model: (input, output)} in USD per million tokens, over modal_magic.llm.PRICES.",
        trait="pairs", flag=None)
    max_retries: int = option(
        5, non_negative_int, "Retries of one request on 429, 5xx and connection errors, honouring Retry-After.", trait="whole", flag=Flag(type=int, metavar="N", group=_LIMITS))
    extra_body: Mapping[str, Any] | None = option(
        None, _mapping, "More fields for the request body, e.g. {'top_p': 0.9, 'seed': 1}.", trait="pairs", flag=None)
    processes: int = option(
        1, _processes, "Send the requests from N local worker processes (1: from the kernel's own event loop); "
        "rpm and tpm are split between them, and they share one budget_usd.", trait="whole", flag=Flag(type=int, metavar="N", group=_LIMITS))

    batch: bool = option(
        False, true_or_false, "Send the rows through OpenAI's Batch API: half the price per token, answers within "
        "24 hours; the batch is recorded in the cache, so running the cell again (even after a restart) collects "
        "it instead of submitting it again.", trait="switch", flag=Flag("switch", group=_MODEL))

    def __repr__(self) -> str:
        # The key and a base URL's credentials are never shown (a repr ends up in logs and tracebacks).
        shown = {o.name: getattr(self, o.name) for o in LLM_OPTIONS}
        if shown["api_key"] is not None:
            shown["api_key"] = "***"
        shown["base_url"] = redact_url(shown["base_url"])
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def create(cls, **kwargs: Any) -> LLMOptions:
        """Validate keyword parameters into an options object; raise ``OptionsError`` for a bad one.

        Examples
        --------
        >>> LLMOptions.create(model="llama3", budget_usd=1)
        Traceback (most recent call last):
        ...
        modal_magic.errors.OptionsError: budget_usd= needs the price of 'llama3', which isn't in modal_magic.llm.PRICES (as of 2026-03); pass prices={'llama3': (input, output)} in USD per million tokens
        """
        unknown = [k for k in kwargs if k not in _BY_NAME]
        if unknown:
            raise unknown_option(unknown[0], LLM_OPTION_NAMES)
        values = {o.name: o.fresh_default() for o in LLM_OPTIONS}
        for name, value in kwargs.items():
            values[name] = _BY_NAME[name].check(name, value)
        self = cls(**values)
        if self.budget_usd is not None and self.price is None:
            raise OptionsError(f"budget_usd= needs the price of {self.model!r}, which isn't in "
                               f"modal_magic.llm.PRICES (as of {PRICES_AS_OF}); pass "
                               f"prices={{{self.model!r}: (input, output)}} in USD per million tokens")
        return self

    @property
    def price(self) -> tuple[float, float] | None:
        """USD per million input and output tokens for :attr:`model`, or ``None`` when unknown."""
        return price_for(self.model, self.prices)

    def check_with(self, options: MapOptions) -> None:
        """Check what these parameters need of the map options; raise ``OptionsError`` before any request.

        Examples
        --------
        >>> from modal_magic.options import MapOptions
        >>> LLMOptions.create(processes=2).check_with(MapOptions.create(backend="threads"))
        Traceback (most recent call last):
        ...
        modal_magic.errors.OptionsError: processes=2 spreads the requests over local worker processes, which needs backend='local'; backend='threads' sends them from the kernel's process
        """
        if options.backend.startswith("modal:"):
            raise OptionsError(f"backend={options.backend!r}: an LLM run sends the requests itself; use "
                               "backend='modal' to send them from Modal containers, or a local backend")
        if self.batch:
            self._check_batch(options)
        if self.processes > 1 and options.backend != "local":
            where = ("on Modal, max_containers= sets how many containers send them" if options.backend == "modal"
                     else f"backend={options.backend!r} sends them from the kernel's process")
            raise OptionsError(f"processes={self.processes} spreads the requests over local worker processes, "
                               f"which needs backend='local'; {where}")


    def _check_batch(self, options: MapOptions) -> None:
        """``batch=True`` hands the rows to OpenAI, which runs them: the options that say how to send them can't apply."""
        if options.backend == "modal":
            raise OptionsError("batch=True hands the rows to OpenAI's Batch API, which runs them; backend='modal' "
                               "doesn't apply: leave backend= out")
        for name in ("processes", "rpm", "tpm"):
            value = getattr(self, name)
            if value not in (None, 1):
                raise OptionsError(f"{name}={value!r} paces live requests; batch=True hands the rows to OpenAI's Batch "
                                   f"API, which has its own limits: leave {name}= out, or drop batch=True")
        if options.cache is False:
            raise OptionsError("batch=True records its batches in the result cache, so that running the cell again "
                               "collects them instead of paying again; cache=False would lose them: use "
                               "cache='refresh' to submit every row afresh")
        if options.retries:
            raise OptionsError(f"retries={options.retries} sends a failed row again live; with batch=True, "
                               "out.modal.retry_failed() submits the failed rows in a new batch: leave retries= out")
        if options.timeout is not None:
            raise OptionsError("timeout= limits one live request; a batch has OpenAI's 24 h window: leave timeout= "
                               "out with batch=True")


#: Every LLM option, in declaration order.
LLM_OPTIONS: tuple[Option, ...] = declared_options(LLMOptions)
LLM_OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in LLM_OPTIONS)
_BY_NAME: dict[str, Option] = {o.name: o for o in LLM_OPTIONS}


def schema_parts(schema: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(response_format, result columns)`` for a pydantic model class or a JSON schema dict.

    Examples
    --------
    >>> fmt, columns = schema_parts({"type": "object", "properties": {"label": {"type": "string"}}})
    >>> fmt["type"], columns
    ('json_schema', ('label',))
    """
    if isinstance(schema, Mapping):
        if schema.get("type") != "object" or not isinstance(schema.get("properties"), Mapping):
            raise OptionsError("schema= as a dict must be a JSON schema of an object: "
                               "{'type': 'object', 'properties': {...}, 'required': [...]}")
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title", "answer")))[:64]
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": dict(schema), "strict": False}}
        return response_format, tuple(schema["properties"])
    fields = getattr(schema, "model_fields", None)
    if not isinstance(schema, type) or not isinstance(fields, Mapping):
        raise OptionsError(f"schema={schema!r} is not valid: expected a pydantic model class or a JSON schema dict")
    import openai

    # The SDK's public helper makes the strict schema OpenAI wants (every field required, no extra
    # properties), the same conversion its own ``.parse()`` applies to a response format.
    try:
        json_schema = openai.pydantic_function_tool(schema)["function"]["parameters"]
    except Exception as e:  # a model pydantic can't describe as a JSON schema
        raise OptionsError(f"schema={schema.__name__} can't be sent as a JSON schema: {type(e).__name__}: {e}") from None
    name = re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": json_schema, "strict": True}}
    return response_format, tuple(fields)


