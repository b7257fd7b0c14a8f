"""An LLM call per row: ``df.modal.llm(template, ...)`` (and ``%%modal_llm``), on the shared engine.

:func:`llm_frame` checks everything it can before a request goes out (the template's ``{column}``
fields against the frame, the API key, the price when there is a budget, the result columns), then
makes one call into :func:`modal_magic.engine.map_frame` with an ``async`` row function over the
template's columns: each row becomes one chat completion through the real ``openai.AsyncOpenAI``
client against any OpenAI-compatible endpoint, and its answer (or one column per ``schema=`` field),
tokens in and out and cost come back as columns. The package, one module per idea:

- :mod:`~modal_magic.llm.options`: :class:`LLMOptions`, every LLM parameter declared once;
- :mod:`~modal_magic.llm.templates`, :mod:`~modal_magic.llm.prices`, :mod:`~modal_magic.llm.keys`:
  the template's fields, what tokens cost, where the API key comes from;
- :mod:`~modal_magic.llm.function`: the row function the engine maps, and the runtime it needs;
- :mod:`~modal_magic.llm.allotments`: on Modal, the kernel's account of ``budget_usd``, booked batch by batch;
- :mod:`~modal_magic.llm.row`, the row runtime, which also runs inside Modal containers and worker
  processes (pickled by value, standard library only): :mod:`~modal_magic.llm.row.session` (one
  request per row, retries), :mod:`~modal_magic.llm.row.limits` (request, rate limits, budget,
  meter) and :mod:`~modal_magic.llm.row.failures` (the errors a row ends with).

The API key is looked up in ``api_key=``, then ``OPENAI_API_KEY``, then a ``.env`` file; with
``backend="modal"`` it comes from a Modal secret inside the container and never leaves this
machine. It is kept off the row function, so it is in no cache key, no repr and no error message;
the one pickle that carries it is the :class:`~modal_magic.llm.row.shipped.WorkerRow` sent over a socket
to a worker process. The ``%%modal_llm`` magic is on the IPython side, in
:mod:`modal_magic.ipython.llm_magic`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from ..engine import map_frame
from ..runs import amend_last_run, recorded_run
from ..errors import OptionsError
from .function import _RUNTIMES, LLMRowFunction  # noqa: F401  (_RUNTIMES: tests look inside a run's session)
from .keys import MissingAPIKey, resolve_api_key, resolve_base_url
from .row.limits import Limits, Meter, Request
from .options import DEFAULT_CONCURRENCY, DEFAULT_INTO, DEFAULT_MODEL, LLM_OPTION_NAMES, LLM_OPTIONS, LLMOptions, schema_parts
from .prices import (BATCH_PRICES, BATCH_PRICES_AS_OF, MAX_OUTPUT_TOKENS, PRICES, PRICES_AS_OF, batch_price_for,
                     max_output_for, price_for)
from .row.failures import portable
from .row.session import Session
from .templates import TemplateError, check_template_columns, template_fields

if TYPE_CHECKING:
    from ..options import MapOptions
    from ..progress import RunSummary

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_INTO",
    "DEFAULT_MODEL",
    "BATCH_PRICES",
    "BATCH_PRICES_AS_OF",
    "LLMOptions",
    "LLMRowFunction",
    "LLM_OPTIONS",
    "LLM_OPTION_NAMES",
    "MAX_OUTPUT_TOKENS",
    "MissingAPIKey",
    "PRICES",
    "PRICES_AS_OF",
    "TemplateError",
    "batch_price_for",
    "check_template_columns",
    "llm_frame",
    "max_output_for",
    "price_for",
    "resolve_api_key",
    "resolve_base_url",
    "template_fields",
]

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


def llm_frame(
    frame: pd.DataFrame,
    template: str,
    *,
    into: str = DEFAULT_INTO,
    llm: LLMOptions | None = None,
    options: MapOptions,
    errors_call: str = "out.modal.errors()",
) -> pd.DataFrame:
    """Fill ``template`` from each row, send it to a chat model, and return the frame with the answers.

    What ``df.modal.llm`` and ``%%modal_llm`` call, with the LLM parameters in ``llm`` (default:
    every default) and the map's in ``options``; see :meth:`ModalFrameAccessor.llm
    <modal_magic.accessor.ModalFrameAccessor.llm>` for what they mean.

    Examples
    --------
    >>> import pandas as pd
    >>> from modal_magic.options import MapOptions
    >>> llm_frame(pd.DataFrame({"text": ["hi"]}), "Say {txt}", options=MapOptions.create(),
    ...           llm=LLMOptions.create(api_key="sk-x"))
    Traceback (most recent call last):
    ...
    modal_magic.llm.templates.TemplateError: the template uses {txt}, but the DataFrame has no column 'txt': did you mean {text}? its columns are 'text'
    """
    llm = llm if llm is not None else LLMOptions.create()
    fields = template_fields(template)
    check_template_columns(frame, fields)
    if not isinstance(into, str) or not into:
        raise OptionsError(f"into={into!r} is not valid: expected a column name (a non-empty string)")
    llm.check_with(options)
    on_modal = options.backend == "modal"
    price = llm.price
    schema, api_key, base_url, processes = llm.schema, llm.api_key, llm.base_url, llm.processes
    response_format, schema_columns = schema_parts(schema) if schema is not None else (None, ())

    if on_modal:
        if options.max_containers is None and (llm.rpm or llm.tpm):
            raise OptionsError("rpm= and tpm= are shared out between Modal containers: set max_containers= too "
                               "(each container gets its share; budget_usd= needs no max_containers, as this "
                               "kernel books each batch's worst case before sending it)")
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
        template=template, fields=fields, model=llm.model, into=into, system=llm.system,
        temperature=llm.temperature, max_tokens=llm.max_tokens,
        schema=schema, response_format=response_format, schema_columns=schema_columns,
        base_url=url, price=price, extra_body=tuple((llm.extra_body or {}).items()),
    )
    limits = Limits(rpm=llm.rpm, tpm=llm.tpm, budget_usd=llm.budget_usd, max_retries=llm.max_retries,
                    max_output_tokens=max_output_for(llm.model, llm.max_tokens))
    # budget_usd stays here: the engine books each batch's worst case before sending it (llm.allotments)
    container_limits = dataclasses.replace(limits.share(options.max_containers or 1), budget_usd=None)
    worker_limits = limits.share(processes)
    session = Session(request, limits, Meter(price is not None), api_key=key, base_url=url)
    row = LLMRowFunction(request, session, container_limits, on_modal=on_modal, processes=processes,
                         worker_limits=worker_limits)

    before = recorded_run()
    if llm.batch:
        return _batch_frame(frame, row, request, llm, options, key=key, url=url, fields=fields, into=into,
                            columns=columns, errors_call=errors_call, before=before)
    try:
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
                                errors_call=errors_call, runtime=row.runtime())
    finally:
        _record_usage(before, row.runtime().meter)
        row.release()
    _bring_errors_home(out[f"{into}_error"])
    return _with_every_column(out, frame, columns, into)


def _batch_frame(frame: pd.DataFrame, row: LLMRowFunction, request: Request, llm: LLMOptions, options: MapOptions,
                 *, key: str | None, url: str | None, fields: tuple[str, ...], into: str, columns: list[str],
                 errors_call: str, before: RunSummary | None) -> pd.DataFrame:
    """The rows through OpenAI's Batch API (:mod:`modal_magic.llm.batch`): same columns, batch prices.

    The engine runs ``row`` as in live mode, so the cache answers the rows it holds (whichever mode
    answered them) and stores the rest as their batches come back, but through a batch backend.
    """
    from .batch import ROWS_PER_GROUP, batch_runtime

    runtime = batch_runtime(request, batch_price_for(llm.model, llm.prices), api_key=key, base_url=url,
                            max_output_tokens=max_output_for(llm.model, llm.max_tokens), budget_usd=llm.budget_usd)
    opts = options.replace(expand=True, batch_size=options.batch_size or ROWS_PER_GROUP)
    try:
        out = map_frame(frame, row, columns=list(fields), star=True, into=into, options=opts, errors_call=errors_call,
                        runtime=runtime)
    finally:
        _record_usage(before, runtime.meter)  # type: ignore[arg-type]
        row.release()
    _bring_errors_home(out[f"{into}_error"])
    return _with_every_column(out, frame, columns, into)


def _bring_errors_home(errors: pd.Series) -> None:
    """Make the rows' exceptions plain records: importable classes, and no live traceback.

    Those that came back from workers or containers were raised by a by-value copy of the row
    runtime: ``isinstance`` against ``modal_magic.llm.row``'s classes would fail, and a plain
    ``pickle`` of the frame couldn't refer to their classes (see
    :func:`~modal_magic.llm.row.failures.portable`). Those raised here carry a traceback whose
    frames hold the run's session (its client, its key) for as long as the frame lives; the
    traceback's text is already in ``errors()["traceback"]``.
    """
    for error in errors.dropna():
        exception = getattr(error, "exception", None)
        if exception is not None:
            exception.__traceback__ = None
            error.exception = portable(exception)


def _record_usage(before: RunSummary | None, meter: Meter) -> None:
    """Put the run's tokens and cost on ``modal_magic.last_run()``, as the bar showed them.

    The engine knows nothing of tokens; the run's summary is a frozen record it keeps for the last
    run, so the LLM layer fills in what it measured, only if this run made a summary at all.
    """
    summary = recorded_run()
    if summary is None or summary is before:
        return
    amend_last_run(dataclasses.replace(summary, tokens=meter.tokens, cost_usd=meter.cost_usd))


def _map_shipped(frame: pd.DataFrame, row: LLMRowFunction, fields: tuple[str, ...], into: str,
                 options: MapOptions, errors_call: str) -> pd.DataFrame:
    """Map with the row runtime pickled by value: Modal containers have no modal_magic, and worker
    processes needn't import it (and pandas with it) to send requests."""
    import cloudpickle

    from . import row as row_runtime

    # Registering the package covers its modules (session, limits, failures).
    cloudpickle.register_pickle_by_value(row_runtime)
    try:
        return map_frame(frame, row, columns=list(fields), star=True, into=into, options=options,
                         errors_call=errors_call, runtime=row.runtime())
    finally:
        cloudpickle.unregister_pickle_by_value(row_runtime)


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
