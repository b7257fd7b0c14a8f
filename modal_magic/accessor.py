"""The pandas accessors: ``df.modal.map``, ``df.modal.starmap``, ``series.modal.map``, ``out.modal.errors()``.

They hold no state (pandas builds a new accessor object on every ``df.modal``): each method
validates its options and makes one call into :func:`modal_magic.engine.map_frame`. The methods
take their options as ``**options``, but their signatures (what ``help()`` and Jupyter's Shift-Tab
show) list every option by name, type and default, generated from the options' declarations
(:data:`modal_magic.options.OPTIONS`, :data:`modal_magic.llm.LLM_OPTIONS`).
"""

from __future__ import annotations

import ast
import inspect
import linecache
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import pandas as pd

from .declarations import unknown_option
from .engine import map_frame
from .estimate import DEFAULT_SAMPLE, Estimate, estimate_frame
from .jobs import MapJob, start_job
from .runs import LAST_RESULT_ERRORS
from .retry import retry_failed
from .errors import RowError
from .llm import LLM_OPTION_NAMES, LLM_OPTIONS, LLMOptions, llm_frame
from .options import OPTION_NAMES, OPTIONS, MapOptions

if TYPE_CHECKING:
    from .declarations import Option

__all__ = ["ModalFrameAccessor", "ModalSeriesAccessor", "errors_frame"]

ERROR_COLUMNS = ["column", "error", "type", "message", "traceback", "attempts", "exception"]

_F = TypeVar("_F", bound=Callable[..., Any])


class _Unchanged:
    """The default shown for ``retry_failed``'s options: a left-out option keeps the first run's value."""

    def __repr__(self) -> str:
        return "<as the first run>"


def _with_options(*declared: tuple[Option, ...], unchanged: bool = False) -> Callable[[_F], _F]:
    """Give a method taking ``**options`` a signature that lists every declared option, keyword-only.

    The body still receives ``**options`` (validated by the options object); only what
    ``inspect.signature`` reports changes, so one declaration per option stays the only list.
    """
    def decorate(method: _F) -> _F:
        signature = inspect.signature(method)
        fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        given = {p.name for p in fixed}
        added = []
        for options in declared:  # a name two option sets declare (budget_usd) is the first one's
            for o in options:
                if o.name not in given:
                    given.add(o.name)
                    added.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                                   default=_Unchanged() if unchanged else o.fresh_default(),
                                                   annotation=o.annotation))
        method.__signature__ = signature.replace(parameters=[*fixed, *added])  # type: ignore[attr-defined]
        return method

    return decorate


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PANDAS = os.path.dirname(os.path.abspath(pd.__file__)) + os.sep


def errors_call() -> str:
    """What the caller types to list the failed rows: ``scored.modal.errors()`` for ``scored = df.modal.map(...)``.

    The name is read from the statement that called the accessor (a notebook cell's source is in
    :mod:`linecache`); where there is none (no assignment, a tuple, an attribute, source not found)
    the summary names :func:`modal_magic.last_result`, which is always right.
    """
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith((_PACKAGE, _PANDAS))):
        frame = frame.f_back
    if frame is None:
        return LAST_RESULT_ERRORS
    name = _assigned_name(frame.f_code.co_filename, frame.f_lineno)
    return f"{name}.modal.errors()" if name else LAST_RESULT_ERRORS


def _assigned_name(filename: str, lineno: int) -> str | None:
    """The one plain name assigned by the statement at ``lineno`` of ``filename``, if that is what it is."""
    lines = linecache.getlines(filename)
    if not lines:
        return None
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):  # IPython magics in the cell's raw text; a file changed since
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and node.lineno <= lineno <= (node.end_lineno or node.lineno)
                and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return node.targets[0].id
    return None


def _now_or_background(wait: bool, title: str, run: Callable[[str], pd.DataFrame], call: str
                       ) -> pd.DataFrame | MapJob:
    """Run at once, or with ``wait=False`` in the background as a :class:`~modal_magic.jobs.MapJob`.

    ``call`` is what the caller types to list the failed rows (see :func:`errors_call`); ``run``
    takes the one that fits: a background run's frame is the job's ``result()``.
    """
    if wait:
        return run(call)
    if call != LAST_RESULT_ERRORS:
        call = call.replace(".modal.errors()", ".result().modal.errors()")
    return start_job(lambda: run(call), title=title)


def errors_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every failed row of ``frame``: one line per error, indexed by the row's label.

    Columns: ``column`` (the result column the error belongs to), ``error`` (the short text),
    ``type``, ``message``, ``traceback`` (from where the row ran), ``attempts`` and ``exception``
    (the exception object, where it could be brought back).
    """
    pieces = []
    for name in frame.columns:
        if not (isinstance(name, str) and name.endswith("_error")) or frame[name].dtype != object:
            continue
        column = frame[name]
        mask = column.map(lambda v: isinstance(v, RowError)).to_numpy(dtype=bool)
        if not mask.any():
            continue
        failed = column[mask]
        pieces.append(
            pd.DataFrame(
                {
                    "column": name.removesuffix("_error"),
                    "error": [str(e) for e in failed],
                    "type": [e.type_name for e in failed],
                    "message": [e.message for e in failed],
                    "traceback": [e.traceback for e in failed],
                    "attempts": pd.array([e.attempts for e in failed], dtype="int64"),
                    "exception": pd.Series([e.exception for e in failed], dtype=object).to_numpy(),
                },
                index=failed.index,
            )
        )
    if not pieces:
        empty = pd.DataFrame({c: pd.Series(dtype="int64" if c == "attempts" else object) for c in ERROR_COLUMNS})
        empty.index = frame.index[:0]
        return empty
    return pd.concat(pieces) if len(pieces) > 1 else pieces[0]


@pd.api.extensions.register_dataframe_accessor("modal")
class ModalFrameAccessor:
    """``df.modal``: run a function over a column (or several) in parallel, locally or on Modal."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame

    @_with_options(OPTIONS)
    def map(
        self,
        fn: Callable[[Any], Any],
        column: Any = None,
        *,
        into: str | None = None,
        **options: Any,
    ) -> pd.DataFrame | MapJob:
        """Call ``fn(value)`` once for every value of ``column``, in parallel; return a new DataFrame.

        The result is the original frame (same rows, order and index) plus ``<into>`` (the return
        value, missing where the row failed) and ``<into>_error`` (missing where it succeeded, else
        ``"ExceptionType: message"``). ``into`` defaults to the function's name. With
        ``wait=False`` it returns a :class:`~modal_magic.jobs.MapJob` at once instead, whose
        ``result()`` is that DataFrame.

        Parameters
        ----------
        fn
            A function of one value; ``async def`` functions run on an event loop.
        column
            The column whose values are passed to ``fn``.
        into
            The result column's name.
        **options
            See :class:`modal_magic.options.MapOptions`: ``backend``, ``max_containers``,
            ``timeout``, ``retries``, ``batch_size``, ``on_error``, ``sample``, ``expand``,
            ``overwrite``, ``progress``, and the Modal ones (``gpu``, ``image``, ``secrets``...).

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> df = pd.DataFrame({"text": ["good", "bad", ""]})
        >>> def shout(text):
        ...     if not text:
        ...         raise ValueError("empty")
        ...     return text.upper() + "!"
        >>> out = df.modal.map(shout, column="text", backend="threads", progress=False)
        >>> out.columns.tolist()
        ['text', 'shout', 'shout_error']
        >>> out["shout"].tolist(), out["shout_error"].tolist()
        (['GOOD!', 'BAD!', nan], [None, None, 'ValueError: empty'])
        """
        if column is None:
            raise TypeError(
                "map() needs column=: which column's values to pass to the function; "
                f"the DataFrame has: {', '.join(map(repr, self._frame.columns.tolist()))}"
            )
        if isinstance(column, list):
            raise TypeError("map() takes one column; use df.modal.starmap(fn, columns=[...]) to pass several")
        opts = MapOptions.create(**options)
        return _now_or_background(opts.wait, into or getattr(fn, "__name__", "map"), lambda call: map_frame(
            self._frame, fn, columns=[column], star=False, into=into, options=opts, errors_call=call), errors_call())

    @_with_options(OPTIONS)
    def starmap(
        self,
        fn: Callable[..., Any],
        columns: Sequence[Any],
        *,
        into: str | None = None,
        **options: Any,
    ) -> pd.DataFrame | MapJob:
        """Call ``fn(*row_values)`` with one argument per column in ``columns``, for every row.

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> df = pd.DataFrame({"a": [1, 2], "b": [10, 20]})
        >>> df.modal.starmap(lambda a, b: a + b, columns=["a", "b"], into="total",
        ...                  backend="threads", progress=False)["total"].tolist()
        [11, 22]
        """
        if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
            raise TypeError("starmap() needs columns=[...]: a list of column names, one per argument")
        opts = MapOptions.create(**options)
        return _now_or_background(opts.wait, into or getattr(fn, "__name__", "starmap"), lambda call: map_frame(
            self._frame, fn, columns=list(columns), star=True, into=into, options=opts, errors_call=call),
            errors_call())

    @_with_options(OPTIONS)
    def estimate(
        self,
        fn: Callable[..., Any],
        column: Any = None,
        *,
        columns: Sequence[Any] | None = None,
        into: str | None = None,
        sample: int = DEFAULT_SAMPLE,
        **options: Any,
    ) -> Estimate:
        """Time ``sample`` rows spread over the frame, and project the whole run's wall time and dollars.

        The sample runs with these options (as the real run would) and its results are cached, so
        the real run doesn't pay for them again. The returned :class:`~modal_magic.estimate.Estimate`
        prints the per-row time (median, p10–p90), the projected wall time at ``max_containers`` and,
        for ``backend="modal"``, the projected dollars at Modal's rates for the ``gpu``/``cpu``/
        ``memory`` asked for; ``.result`` is the sample's frame.

        Parameters
        ----------
        fn
            The function the real run will map.
        column, columns
            One column (as for :meth:`map`), or several (as for :meth:`starmap`).
        sample
            How many rows to run (fewer when the frame is smaller).
        **options
            As for :meth:`map`.

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> df = pd.DataFrame({"x": range(1000)})
        >>> est = df.modal.estimate(lambda v: v + 1, column="x", sample=10, backend="threads", progress=False)
        >>> est.sampled, est.rows
        (10, 1000)
        """
        if (column is None) == (columns is None):
            raise TypeError("estimate() needs column= (one argument per row) or columns=[...] (several), not "
                            f"both; the DataFrame has: {', '.join(map(repr, self._frame.columns.tolist()))}")
        opts = MapOptions.create(**options)
        star = columns is not None
        chosen = list(columns) if columns is not None else [column]
        return estimate_frame(self._frame, fn, columns=chosen, star=star, into=into, sample=sample, options=opts)

    @_with_options(LLM_OPTIONS, OPTIONS)
    def llm(self, template: str, *, into: str = "answer", **options: Any) -> pd.DataFrame | MapJob:
        """Fill ``template``'s ``{column}`` fields from each row, ask a chat model, add the answers as columns.

        Works with any OpenAI-compatible endpoint, through the ``openai`` client. The new columns:
        ``<into>`` (the answer, stripped of surrounding whitespace; with ``schema=``, one column per
        field instead), ``<into>_tokens_in``, ``<into>_tokens_out``, ``<into>_cost_usd`` (from
        :data:`modal_magic.llm.PRICES`; missing for a model without a price) and ``<into>_error``.
        The progress bar shows the tokens and dollars spent so far.

        Parameters
        ----------
        template
            The prompt; ``{text}`` is replaced by the row's ``text`` value. A column the frame lacks is
            an error before any request; a row where a used column is empty fails without a request.
        into
            The answer column's name (default ``"answer"``), and the prefix of the other columns.
        model, system, temperature, max_tokens
            Passed to the chat completions request (``max_tokens`` goes as ``max_completion_tokens``
            to the o-series and gpt-5 models).
        schema
            A pydantic model class (strict structured output) or a JSON schema dict: the answer must
            be JSON that validates, else the row fails (and is retried with ``retries=``).
        base_url, api_key
            The endpoint (default ``OPENAI_BASE_URL``, else OpenAI) and key (default
            ``OPENAI_API_KEY``, else a ``.env`` file). With ``backend="modal"`` the key comes from a
            Modal secret: ``secrets=["openai-secret"]``.
        rpm, tpm
            Requests and tokens per minute across every request in flight (on Modal, each container
            gets ``1 / max_containers`` of them).
        budget_usd
            Send no request that would take the run past this many dollars; rows not sent fail
            with ``BudgetExceeded`` and the rows answered are kept (and cached).
        prices
            ``{model: (input, output)}`` in USD per million tokens, over the built-in table.
        max_retries
            Retries of one request on 429, 5xx, timeouts and connection errors, waiting as long as
            ``Retry-After`` says (else 0.5 s, 1 s, 2 s...).
        extra_body
            More fields for the request body, e.g. ``{"top_p": 0.9, "seed": 1}``.
        processes
            Send the requests from this many local worker processes instead of the kernel's one
            event loop (``max_containers`` in flight in all, split evenly, as are ``rpm`` and
            ``tpm``; they share one ``budget_usd``, which holds even when a worker dies). One process sends at most about 1,500 requests a second through
            the ``openai`` client; more help only against an endpoint that answers faster than that.
        batch
            Send the rows through OpenAI's Batch API instead: half the price per token, answers within 24
            hours, the same columns. The batch is recorded in the cache, so running the cell again (even
            after a restart) collects it instead of submitting the rows again; see
            :mod:`modal_magic.llm.batch`.
        **options
            As for :meth:`map`; ``max_containers`` is the number of requests in flight (default 64
            locally), ``retries`` re-runs a failed row (e.g. an answer that failed the schema).

        Examples
        --------
        >>> out = reviews.modal.llm("Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}",
        ...                         into="label", max_tokens=10)                       # doctest: +SKIP
        >>> out[["text", "label", "label_tokens_in", "label_cost_usd"]]              # doctest: +SKIP
        """
        unknown = [k for k in options if k not in LLM_OPTION_NAMES and k not in OPTION_NAMES]
        if unknown:
            raise unknown_option(unknown[0], (*LLM_OPTION_NAMES, *OPTION_NAMES))
        llm = LLMOptions.create(**{k: v for k, v in options.items() if k in LLM_OPTION_NAMES})
        opts = MapOptions.create(**{k: v for k, v in options.items() if k not in LLM_OPTION_NAMES})
        return _now_or_background(opts.wait, into, lambda call: llm_frame(
            self._frame, template, into=into, llm=llm, options=opts, errors_call=call), errors_call())

    @_with_options(OPTIONS, unchanged=True)
    def retry_failed(self, into: str | None = None, *, fn: Callable[..., Any] | None = None,
                     **options: Any) -> pd.DataFrame | MapJob:
        """Run again only the rows that failed, with new options if given; return the completed frame.

        Works on the frame a map returned. ``fn`` is a fixed function to run them with (default: the
        first run's); ``options`` override the original run's, e.g. ``retries=3`` or a bigger
        ``gpu``; ``into`` picks one result column when there are several.

        Examples
        --------
        >>> out = df.modal.map(fetch, column="url")          # doctest: +SKIP
        >>> out = out.modal.retry_failed(retries=3)           # doctest: +SKIP
        >>> out = out.modal.retry_failed(fn=fetch_fixed)      # doctest: +SKIP
        """
        # wait=False is taken here: the rerun itself runs in the foreground of the job's thread
        background = options.pop("wait", True) is False
        return _now_or_background(not background, into or "retry_failed",
                                  lambda call: retry_failed(self._frame, into, fn=fn, errors_call=call, **options),
                                  errors_call())

    def errors(self) -> pd.DataFrame:
        """The failed rows: error text, type, message, traceback, attempts and the exception itself.

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> out = pd.DataFrame({"x": [1, 0]}).modal.map(lambda x: 1 // x, column="x", backend="threads",
        ...                                             progress=False)
        >>> out.modal.errors()[["column", "type", "attempts"]]
           column               type  attempts
        1  result  ZeroDivisionError         1
        """
        return errors_frame(self._frame)


@pd.api.extensions.register_series_accessor("modal")
class ModalSeriesAccessor:
    """``series.modal``: run a function over the values of one Series."""

    def __init__(self, series: pd.Series) -> None:
        self._series = series

    @_with_options(OPTIONS)
    def map(self, fn: Callable[[Any], Any], *, into: str | None = None, **options: Any) -> pd.DataFrame | MapJob:
        """Call ``fn`` on every value; return a DataFrame of the values, ``<into>`` and ``<into>_error``.

        The Series becomes a column named after it (``"value"`` when it has no name).

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> s = pd.Series([1, 2], name="x")
        >>> s.modal.map(lambda v: v * 10, into="y", backend="threads", progress=False)["y"].tolist()
        [10, 20]
        """
        name = self._series.name if self._series.name is not None else "value"
        opts = MapOptions.create(**options)
        return _now_or_background(opts.wait, into or getattr(fn, "__name__", "map"), lambda call: map_frame(
            self._series.to_frame(name), fn, columns=[name], star=False, into=into, options=opts, errors_call=call),
            errors_call())

    @_with_options(OPTIONS)
    def estimate(self, fn: Callable[[Any], Any], *, into: str | None = None, sample: int = DEFAULT_SAMPLE,
                 **options: Any) -> Estimate:
        """Time ``sample`` values spread over the Series and project the whole run (see ``DataFrame.modal.estimate``).

        Examples
        --------
        >>> import modal_magic, pandas as pd
        >>> est = pd.Series(range(50), name="x").modal.estimate(str, sample=5, backend="threads", progress=False)
        >>> est.values
        ('0', '12', '24')
        """
        name = self._series.name if self._series.name is not None else "value"
        opts = MapOptions.create(**options)
        return estimate_frame(self._series.to_frame(name), fn, columns=[name], star=False, into=into,
                              sample=sample, options=opts)
