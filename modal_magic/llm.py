"""An LLM call per row: ``df.modal.llm(template, ...)`` and ``%%modal_llm``, on the shared engine.

:func:`llm_frame` checks everything it can before a request goes out (the template's ``{column}``
fields against the frame, the API key, the price when there is a budget, the result columns), then
makes one call into :func:`modal_magic.engine.map_frame` with an ``async`` row function over the
template's columns: each row becomes one chat completion through the real ``openai.AsyncOpenAI``
client against any OpenAI-compatible endpoint, and its answer (or one column per ``schema=`` field),
tokens in and out and cost come back as columns. How a row is sent (rate limits shared by every
request, retries honouring ``Retry-After``, the budget, the running token and cost totals on the
progress bar) is in :mod:`modal_magic._llm_row`, which also runs inside Modal containers and, with
``processes=``, in the kernel's own worker processes.

The API key is looked up in ``api_key=``, then ``OPENAI_API_KEY``, then a ``.env`` file (read, not
loaded into the environment); with ``backend="modal"`` it comes from a Modal secret inside the
container and never leaves this machine. It is kept off the row function itself (see
:class:`LLMRowFunction`), so it is in no cache key, no repr and no error message; the one pickle
that carries it is the :class:`~modal_magic._llm_row.WorkerRow` sent over a socket to a worker process.

Prices: :data:`PRICES` (USD per million tokens, as of :data:`PRICES_AS_OF`); pass ``prices=`` for a
model it lacks or to correct it, or change the dict itself.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import string
import textwrap
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ._llm_row import ContainerRow, Limits, Meter, Request, Session, WorkerRow
from .engine import map_frame
from .options import MapOptions, OptionsError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_INTO",
    "DEFAULT_MODEL",
    "LLMRowFunction",
    "MissingAPIKey",
    "PRICES",
    "PRICES_AS_OF",
    "TemplateError",
    "llm_frame",
    "price_for",
    "run_llm_cell",
    "template_fields",
]

DEFAULT_MODEL = "gpt-4o-mini"
#: the answer column when ``into=`` isn't given (tokens and cost go to ``answer_tokens_in``...)
DEFAULT_INTO = "answer"
#: requests in flight at once on the local asyncio backend when ``max_containers=`` isn't given
DEFAULT_CONCURRENCY = 64

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

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|latest)$")


class TemplateError(OptionsError):
    """The prompt template can't be filled from the DataFrame (a missing column, a bad field)."""


class MissingAPIKey(OptionsError):
    """No API key was found; raised before any request."""


# --- the template -------------------------------------------------------------------------------------


def template_fields(template: str) -> tuple[str, ...]:
    """The columns a template's ``{field}``s name, in order of first use.

    ``{text!r}``, ``{text:.200}`` and ``{meta[title]}`` name the column ``text`` / ``meta``;
    write ``{{`` and ``}}`` for literal braces.

    Examples
    --------
    >>> template_fields("Translate {text} into {lang}. Keep {text:.10}; JSON like {{\\"a\\": 1}}")
    ('text', 'lang')
    >>> template_fields("Summarise: {}")
    Traceback (most recent call last):
    ...
    modal_magic.llm.TemplateError: the template has an empty field {}: name the column to fill it from, e.g. {text}
    """
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"template={template!r} is not valid: expected the prompt text, with "
                            "{column} where each row's value goes")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise TemplateError(f"the template can't be read: {error}; write {{{{ and }}}} for literal braces") from None
    fields: list[str] = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = re.match(r"[^.\[]*", field).group()  # type: ignore[union-attr]
        if not name or name.isdigit():
            raise TemplateError(f"the template has an empty field {{{field}}}: name the column to fill it "
                                "from, e.g. {text}")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise TemplateError("the template has no {column} field, so every row would send the same prompt; "
                            "put {column_name} where each row's value goes (write {{ and }} for literal braces)")
    return tuple(fields)


def check_template_columns(frame: pd.DataFrame, fields: tuple[str, ...]) -> None:
    """Raise :class:`TemplateError` naming the first field the frame has no column for."""
    names = [str(c) for c in frame.columns]
    for name in fields:
        if name in frame.columns:
            continue
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {{{close[0]}}}? " if close else ""
        raise TemplateError(f"the template uses {{{name}}}, but the DataFrame has no column {name!r}: "
                            f"{hint}its columns are {', '.join(map(repr, names))}")


# --- prices, keys, endpoint ---------------------------------------------------------------------------


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


def _dotenv() -> dict[str, str]:
    """``OPENAI_*`` values from a ``.env`` file in the working directory or above; the environment is left alone."""
    try:
        from dotenv import dotenv_values, find_dotenv
    except ImportError:
        if Path(".env").is_file():
            raise MissingAPIKey("there is a .env file here, but python-dotenv, which reads it, isn't installed: "
                                "pip install python-dotenv") from None
        return {}
    path = find_dotenv(usecwd=True)
    if not path:
        return {}
    return {k: v for k, v in dotenv_values(path).items() if k.startswith("OPENAI_") and v}


def resolve_api_key(api_key: str | None) -> str | None:
    """``api_key``, else ``OPENAI_API_KEY``, else ``OPENAI_API_KEY`` from a ``.env`` file; else ``None``."""
    if api_key:
        return api_key
    return os.environ.get("OPENAI_API_KEY") or _dotenv().get("OPENAI_API_KEY") or None


def resolve_base_url(base_url: str | None) -> str | None:
    """``base_url``, else ``OPENAI_BASE_URL`` (environment, then ``.env``); ``None`` means OpenAI's own."""
    if base_url:
        return base_url
    return os.environ.get("OPENAI_BASE_URL") or _dotenv().get("OPENAI_BASE_URL") or None


# --- the row function -----------------------------------------------------------------------------------


@dataclass
class _Runtime:
    session: Session
    container_limits: Limits
    on_modal: bool  # only then is the function really shipped, with the containers' share of the limits
    meter: Meter  # what the bar shows: fed by the session here, or added up from the rows that come back
    processes: int = 1  # local worker processes sending the requests (1: the kernel's own event loop)
    worker_limits: Limits | None = None  # each worker process's share of the limits


# Each row function's session (API key, client, limiter, budget) lives here, off the function: the
# cache fingerprints a function by its attributes, and what decides an answer is the Request alone;
# the key must never be part of a fingerprint, and raising budget_usd or rpm must not make finished
# rows look new. A weak table so a session goes away with its function.
_RUNTIMES: weakref.WeakKeyDictionary[LLMRowFunction, _Runtime] = weakref.WeakKeyDictionary()


class LLMRowFunction:
    """The ``async`` function :func:`llm_frame` maps: one chat completion per row of the template's columns.

    It returns a dict (answer or schema fields, tokens in and out, cost), which the engine spreads
    into columns. Pickled for Modal it becomes a :class:`~modal_magic._llm_row.ContainerRow` that
    carries the request and the container's share of the limits, and never the key.
    """

    def __init__(self, request: Request, session: Session, container_limits: Limits, *, on_modal: bool,
                 processes: int = 1, worker_limits: Limits | None = None) -> None:
        self.request = request
        self.__name__ = f"llm_{request.into}"
        columns = request.columns
        elsewhere = on_modal or processes > 1  # the rows run in other processes: count what comes back
        meter = (Meter(request.price is not None, (columns["tokens_in"], columns["tokens_out"], columns["cost_usd"]))
                 if elsewhere else session.meter)
        _RUNTIMES[self] = _Runtime(session, container_limits, on_modal, meter, processes, worker_limits)

    @property
    def modal_magic_meter(self) -> Meter:
        """Running tokens and cost, which the engine shows on the progress bar as rows finish."""
        return _RUNTIMES[self].meter

    @property
    def modal_magic_processes(self) -> int:
        """Local worker processes to send the requests from (more than 1 picks the process backend)."""
        return _RUNTIMES[self].processes

    def modal_magic_for_workers(self) -> WorkerRow:
        """What the worker processes run: the request, each one's share of the limits, and the key."""
        runtime = _RUNTIMES[self]
        return runtime.session.worker_row(runtime.worker_limits or runtime.session.limits)

    async def modal_magic_aclose(self) -> None:
        """The run is over: close the client, on the loop that used it (the asyncio backend calls this)."""
        await _RUNTIMES[self].session.aclose()

    async def __call__(self, *values: Any) -> dict[str, Any]:
        return await _RUNTIMES[self].session.complete(values)

    def __reduce__(self) -> Any:
        # A local run is never shipped: only the cache pickles it, to fingerprint it, and what a row
        # computes doesn't depend on the limits, so they stay out of its pickle.
        runtime = _RUNTIMES[self]
        return (ContainerRow, (self.request, runtime.container_limits if runtime.on_modal else Limits()))

    def __repr__(self) -> str:
        return f"<LLMRowFunction model={self.request.model!r} into={self.request.into!r}>"


# --- checks ---------------------------------------------------------------------------------------------


def _positive(name: str, value: Any, *, whole: bool = False) -> Any:
    if value is None:
        return None
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 or not math.isfinite(value):
        raise OptionsError(f"{name}={value!r} is not valid: expected a {'whole ' if whole else ''}number "
                           "greater than 0, or None")
    return value


def _schema_parts(schema: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(response_format, result columns)`` for a pydantic model class or a JSON schema dict."""
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


def _modal_packages(options: MapOptions, schema: Any) -> tuple[str, ...]:
    """The image's pip packages, plus what a row needs in the container (this kernel's versions)."""
    import openai
    import pydantic

    have = {re.split(r"[<>=!~\[ ]", p, maxsplit=1)[0].lower() for p in options.pip}
    wanted = [f"openai=={openai.__version__}", f"pydantic=={pydantic.__version__}"]
    if isinstance(schema, Mapping):
        import importlib.metadata

        try:
            wanted.append(f"jsonschema=={importlib.metadata.version('jsonschema')}")
        except importlib.metadata.PackageNotFoundError:
            wanted.append("jsonschema")
    return tuple(options.pip) + tuple(p for p in wanted if p.split("==")[0] not in have)


# --- the run --------------------------------------------------------------------------------------------


def llm_frame(
    frame: pd.DataFrame,
    template: str,
    *,
    into: str = DEFAULT_INTO,
    model: str = DEFAULT_MODEL,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    schema: Any = None,
    base_url: str | None = None,
    api_key: str | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    budget_usd: float | None = None,
    prices: Mapping[str, Any] | None = None,
    max_retries: int = 5,
    extra_body: Mapping[str, Any] | None = None,
    processes: int = 1,
    options: MapOptions,
    errors_call: str = "out.modal.errors()",
) -> pd.DataFrame:
    """Fill ``template`` from each row, send it to a chat model, and return the frame with the answers.

    What ``df.modal.llm`` and ``%%modal_llm`` call; see :meth:`ModalFrameAccessor.llm
    <modal_magic.accessor.ModalFrameAccessor.llm>` for the arguments.

    Examples
    --------
    >>> import pandas as pd
    >>> from modal_magic.options import MapOptions
    >>> llm_frame(pd.DataFrame({"text": ["hi"]}), "Say {txt}", options=MapOptions.create(), api_key="sk-x")
    Traceback (most recent call last):
    ...
    modal_magic.llm.TemplateError: the template uses {txt}, but the DataFrame has no column 'txt': did you mean {text}? its columns are 'text'
    """
    fields = template_fields(template)
    check_template_columns(frame, fields)
    if not isinstance(into, str) or not into:
        raise OptionsError(f"into={into!r} is not valid: expected a column name (a non-empty string)")
    if not isinstance(model, str) or not model:
        raise OptionsError(f"model={model!r} is not valid: expected a model name such as {DEFAULT_MODEL!r}")
    if system is not None and not isinstance(system, str):
        raise OptionsError(f"system={system!r} is not valid: expected the system prompt (a string) or None")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise OptionsError(f"temperature={temperature!r} is not valid: expected a number from 0 to 2, or None")
    _positive("max_tokens", max_tokens, whole=True)
    _positive("rpm", rpm)
    _positive("tpm", tpm)
    _positive("budget_usd", budget_usd)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise OptionsError(f"max_retries={max_retries!r} is not valid: expected a whole number of at least 0")
    if options.backend.startswith("modal:"):
        raise OptionsError(f"backend={options.backend!r}: an LLM run sends the requests itself; use "
                           "backend='modal' to send them from Modal containers, or a local backend")
    on_modal = options.backend == "modal"
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise OptionsError(f"processes={processes!r} is not valid: expected a whole number of at least 1")
    if processes > 1 and options.backend != "local":
        where = "on Modal, max_containers= sets how many containers send them" if on_modal else \
            f"backend={options.backend!r} sends them from the kernel's process"
        raise OptionsError(f"processes={processes} spreads the requests over local worker processes, which needs "
                           f"backend='local'; {where}")

    price = price_for(model, prices)
    if budget_usd is not None and price is None:
        raise OptionsError(f"budget_usd= needs the price of {model!r}, which isn't in modal_magic.llm.PRICES "
                           f"(as of {PRICES_AS_OF}); pass prices={{{model!r}: (input, output)}} in USD per "
                           "million tokens")
    response_format, schema_columns = _schema_parts(schema) if schema is not None else (None, ())

    if on_modal:
        if options.max_containers is None and (rpm or tpm or budget_usd):
            raise OptionsError("rpm=, tpm= and budget_usd= are shared out between Modal containers: set "
                               "max_containers= too (each container gets its share)")
        if api_key:
            raise MissingAPIKey("api_key= isn't sent to Modal containers: keep the key in a Modal secret "
                                "(modal secret create openai-secret OPENAI_API_KEY=...) and pass "
                                "secrets=['openai-secret']")
        if not options.secrets:
            raise MissingAPIKey("on Modal the API key comes from a Modal secret that sets OPENAI_API_KEY: create "
                                "one (modal secret create openai-secret OPENAI_API_KEY=...) and pass "
                                "secrets=['openai-secret']")
        key, url = None, base_url or None
    else:
        key = resolve_api_key(api_key)
        if not key:
            raise MissingAPIKey("no OpenAI API key: pass api_key=, set OPENAI_API_KEY, put OPENAI_API_KEY=... in a "
                                ".env file here, or run on Modal with secrets=['openai-secret']. (A local "
                                "server that needs no key still wants one: api_key='none')")
        url = resolve_base_url(base_url)

    columns = list(schema_columns) or [into]
    columns += [f"{into}_tokens_in", f"{into}_tokens_out", f"{into}_cost_usd"]
    clashes = [c for c in [*columns, f"{into}_error"] if c in frame.columns]
    if clashes and not options.overwrite:
        raise OptionsError(f"the DataFrame already has a column {clashes[0]!r}; pass overwrite=True to "
                           "replace it, or into='another_name'")
    if len(set(columns)) < len(columns):
        raise OptionsError(f"the schema has a field named like a result column ({', '.join(columns)}); "
                           "pass into='another_name'")

    request = Request(
        template=template, fields=fields, model=model, into=into, system=system,
        temperature=float(temperature) if temperature is not None else None, max_tokens=max_tokens,
        schema=schema, response_format=response_format, schema_columns=schema_columns,
        base_url=url, price=price, extra_body=tuple((extra_body or {}).items()),
    )
    limits = Limits(rpm=rpm, tpm=tpm, budget_usd=budget_usd, max_retries=max_retries)
    container_limits = limits.share(options.max_containers or 1)
    worker_limits = limits.share(processes)
    session = Session(request, limits, Meter(price is not None), api_key=key, base_url=url)
    row = LLMRowFunction(request, session, container_limits, on_modal=on_modal, processes=processes,
                         worker_limits=worker_limits)

    if on_modal:
        opts = options.replace(expand=True, pip=list(_modal_packages(options, schema)) if options.image is None
                               else list(options.pip))
        out = _map_shipped(frame, row, fields, into, opts, errors_call)
    else:
        # Every row is its own task on an event loop: max_containers requests in flight, from the
        # kernel's process or split over `processes` worker processes.
        opts = options.replace(expand=True, max_containers=options.max_containers or DEFAULT_CONCURRENCY,
                               batch_size=options.batch_size or 1)
        if processes > 1:
            out = _map_shipped(frame, row, fields, into, opts, errors_call)
        else:
            out = map_frame(frame, row, columns=list(fields), star=True, into=into, options=opts,
                            errors_call=errors_call)
    return _with_every_column(out, frame, columns, into)


def _map_shipped(frame: pd.DataFrame, row: LLMRowFunction, fields: tuple[str, ...], into: str,
                 options: MapOptions, errors_call: str) -> pd.DataFrame:
    """Map with the row code pickled by value: Modal containers have no modal_magic, and worker
    processes needn't import it (and pandas with it) to send requests."""
    import cloudpickle

    from . import _llm_row

    cloudpickle.register_pickle_by_value(_llm_row)
    try:
        return map_frame(frame, row, columns=list(fields), star=True, into=into, options=options,
                         errors_call=errors_call)
    finally:
        cloudpickle.unregister_pickle_by_value(_llm_row)


def _with_every_column(out: pd.DataFrame, frame: pd.DataFrame, columns: list[str], into: str) -> pd.DataFrame:
    """Add result columns no row filled (every row failed, or no rows), typed, before ``<into>_error``."""
    missing = [c for c in columns if c not in out.columns]
    if not missing:
        return out
    out = out.copy()
    for name in missing:
        dtype = "Int64" if name.endswith(("_tokens_in", "_tokens_out")) else "float64" if name.endswith("_cost_usd") else object
        out[name] = pd.Series(pd.NA if dtype == "Int64" else None, index=out.index, dtype=dtype)
    error = f"{into}_error"
    order = [c for c in frame.columns if c not in columns and c != error] + columns + [error]
    return out[order]


# --- %%modal_llm ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMCellArgs:
    """What a ``%%modal_llm`` line asks for, parsed but not yet resolved in the user namespace.

    Examples
    --------
    >>> args = parse_llm_line("reviews --into label --model gpt-4o-mini --max-tokens 10 --rpm 500")
    >>> args.frame, args.into, args.llm["model"], args.llm["max_tokens"], args.llm["rpm"]
    ('reviews', 'label', 'gpt-4o-mini', 10, 500.0)
    """

    frame: str
    into: str
    output: str | None
    schema: str | None  # the name of a pydantic model (or JSON schema dict) in the notebook
    llm: Mapping[str, Any]  # model, system, temperature, max_tokens, base_url, rpm, tpm, budget_usd, max_retries, processes
    options: Mapping[str, Any]  # the MapOptions flags given on the line


_LLM_FLAGS = {"model": "--model", "system": "--system", "temperature": "--temperature", "max_tokens": "--max-tokens",
              "schema": "--schema", "base_url": "--base-url", "rpm": "--rpm", "tpm": "--tpm",
              "budget_usd": "--budget-usd", "max_retries": "--max-retries", "processes": "--processes"}


def llm_parser() -> Any:
    """The ``%%modal_llm`` argument parser: the LLM flags plus every option flag of ``%%modal_map``."""
    import argparse

    from IPython.core.magic_arguments import MagicArgumentParser

    from .magics import ModalMagic
    from .options import OPTION_NAMES

    parser = MagicArgumentParser(
        prog="%modal_llm", argument_default=argparse.SUPPRESS, add_help=False,
        description="Send the cell, a prompt template with {column} fields, to a chat model once per row "
                    "of DF, and add the answers (or one column per --schema field), tokens, cost and errors "
                    "as columns of DF (or of a new DataFrame with -o). Any OpenAI-compatible endpoint; the "
                    "key comes from OPENAI_API_KEY, a .env file, or on Modal a secret (--secret).",
    )
    parser.add_argument("frame", metavar="DF", help="The DataFrame whose rows fill the template.")
    parser.add_argument("--into", metavar="NAME", help=f"The answer column (default {DEFAULT_INTO!r}); also "
                        "NAME_tokens_in, NAME_tokens_out, NAME_cost_usd and NAME_error.")
    parser.add_argument("-o", "--output", metavar="NAME", help="Bind the result to a new DataFrame NAME; DF stays as it is.")
    group = parser.add_argument_group("The model")
    group.add_argument("--model", help=f"The chat model (default {DEFAULT_MODEL!r}).")
    group.add_argument("--system", metavar="TEXT", help="A system prompt.")
    group.add_argument("--temperature", type=float)
    group.add_argument("--max-tokens", type=int, metavar="N", help="The most tokens one answer may have.")
    group.add_argument("--schema", metavar="NAME", help="A pydantic model (or JSON schema dict) in the notebook: "
                       "one column per field.")
    group.add_argument("--base-url", metavar="URL", help="An OpenAI-compatible endpoint (default OPENAI_BASE_URL, "
                       "else OpenAI).")
    group = parser.add_argument_group("Limits")
    group.add_argument("--rpm", type=float, metavar="N", help="Requests per minute, across every request in flight.")
    group.add_argument("--tpm", type=float, metavar="N", help="Tokens per minute, across every request in flight.")
    group.add_argument("--budget-usd", type=float, metavar="USD", help="Send no request that would take the "
                       "run's cost past this; rows not sent get a BudgetExceeded error.")
    group.add_argument("--max-retries", type=int, metavar="N", help="Retries of one request on 429, 5xx and "
                       "connection errors (default 5), honouring Retry-After.")
    group.add_argument("--processes", type=int, metavar="N", help="Send the requests from N local worker "
                       "processes (default 1: the kernel's event loop); the limits are split between them.")
    group = parser.add_argument_group("Options of every map (as in %%modal_map)")
    for action in ModalMagic.modal_map.parser._actions:
        if action.dest in OPTION_NAMES:
            group._add_action(action)
    return parser


def magic_help() -> str:
    """The ``%%modal_llm?`` text: what the magic does, an example, and every flag."""
    return llm_parser().format_help() + "\n" + textwrap.dedent(_MAGIC_EXAMPLE)


_MAGIC_EXAMPLE = """\
    Examples::

        %%modal_llm reviews --into label --model gpt-4o-mini --max-tokens 10
        Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}

        %%modal_llm reviews --schema Complaint -o complaints --budget-usd 2 --rpm 500
        Extract the product and the complaint from: {text}
"""


def parse_llm_line(line: str) -> LLMCellArgs:
    """Parse the ``%%modal_llm`` line; raise ``UsageError`` for a bad one."""
    import shlex

    from IPython.core.error import UsageError

    try:
        argv = shlex.split(line)
    except ValueError as error:
        raise UsageError(f"can't read the %%modal_llm line: {error}") from None
    parser = llm_parser()
    parsed, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0]
        if not first.startswith("-"):
            raise UsageError(f"unexpected {first!r} on the line: give the DataFrame's name once, and the prompt "
                             "in the cell below the line")
        known = [s for action in parser._actions for s in action.option_strings]
        close = difflib.get_close_matches(first.split("=")[0], known, n=1)
        raise UsageError(f"unknown flag {first}" + (f"; did you mean {close[0]}?" if close else ""))
    given = vars(parsed)
    frame = given.pop("frame")
    if not frame.isidentifier():
        hint = " (the column names go in the prompt, as {column})" if "." in frame else ""
        raise UsageError(f"{frame!r} is not a variable name: give the DataFrame's name{hint}")
    for name, flag in (("output", "-o"), ("schema", "--schema")):
        if name in given and not given[name].isidentifier():
            raise UsageError(f"{flag} {given[name]!r}: expected a variable name")
    from .magics import option_flags  # the same option flags as %%modal_map

    options = option_flags(given)
    llm = {k: v for k, v in given.items() if k in _LLM_FLAGS and k != "schema"}
    return LLMCellArgs(frame=frame, into=given.get("into", DEFAULT_INTO), output=given.get("output"),
                       schema=given.get("schema"), llm=llm, options=options)


def run_llm_cell(magic: Any, line: str, cell: str) -> None:
    """``%%modal_llm DF [--into NAME] [flags]`` with the prompt template as the cell body.

    ``magic`` is the registered ``ModalMagic`` (its ``%config`` traitlets are the option defaults).
    The answer, token, cost and error columns are added to ``DF`` in place, or bound to a new
    DataFrame with ``-o NAME``. Mistakes raise ``UsageError`` before any request.

    Examples::

        %%modal_llm reviews --into label --model gpt-4o-mini --max-tokens 10
        Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}
    """
    from IPython.core.error import UsageError

    from .checks import FunctionError
    from .errors import MapInterrupted, ModalSetupError
    from .magics import CellArgs, _bind, _in_flag_words, _lookup, _resolve_frame

    args = parse_llm_line(line)
    template = cell.strip()
    if not template:
        raise UsageError("the cell is empty: write the prompt below the %%modal_llm line, with {column} "
                         "where each row's value goes")
    user_ns = magic.shell.user_ns
    try:
        fields = template_fields(template)
    except TemplateError as error:
        raise UsageError(str(error)) from None
    cell_args = CellArgs(frame=args.frame, columns=fields, star=True, into=args.into, output=args.output,
                         options=args.options)
    frame = _resolve_frame(user_ns, cell_args)
    schema = None
    if args.schema is not None:
        schema = _lookup(user_ns, args.schema, flag="--schema", kind="a pydantic model or a JSON schema dict")
    options = magic._options(cell_args)
    try:
        out = llm_frame(frame, template, into=args.into, schema=schema, options=options,
                        errors_call=cell_args.errors_call, **args.llm)
    except (OptionsError, FunctionError, ModalSetupError) as error:  # caught before any request
        message = _in_flag_words(str(error).replace("secrets=['openai-secret']", "--secret openai-secret"))
        for name, flag in _LLM_FLAGS.items():
            message = message.replace(f"{name}=", f"{flag} ")
        raise UsageError(message) from None
    except MapInterrupted as stopped:  # Stop pressed: keep what finished, then say it stopped
        _bind(user_ns, cell_args, frame, stopped.result, into=args.into, options=options.replace(expand=True))
        raise
    _bind(user_ns, cell_args, frame, out, into=args.into, options=options.replace(expand=True))
