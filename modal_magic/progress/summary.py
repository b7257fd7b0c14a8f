"""What a finished run says: the :class:`RunSummary` record and its text and HTML forms.

One record per run, made by the engine from the run's outcomes, is what the bar's summary line, the
failures table and ``modal_magic.last_run()`` all show, so they can't disagree. The same record
renders as plain lines (the text bar, and the ``text/plain`` a saved notebook keeps) and as HTML
(the widget's summary, and the static ``text/html`` that replaces the widget when the run ends, so
a notebook reopened without a kernel, on GitHub or nbviewer, still reads well).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Literal

from ..costs import dollars

__all__ = ["RunSummary", "State", "format_duration", "summary_lines", "summary_html", "static_html"]

State = Literal["success", "failed", "aborted"]

#: Failed rows listed under the bar; the rest are one ``errors_call`` away.
MAX_FAILURES_SHOWN = 5

_VERDICT = {"success": "Done", "failed": "Done with failures", "aborted": "Aborted"}
#: the bar's colour once the run ends: the JupyterLab theme's, with a fallback for other viewers
_BAR_COLOUR = {"success": "var(--jp-success-color1, #388e3c)", "failed": "var(--jp-warn-color1, #f57c00)",
               "aborted": "var(--jp-error-color1, #d32f2f)"}
_BAR_STYLE = {"success": "success", "failed": "warning", "aborted": "danger"}


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports under its bar, and what ``modal_magic.last_run()`` returns.

    Every row is counted once: ``succeeded + failed + cached + cancelled == total``. ``failed``
    rows raised (or were lost); ``cancelled`` rows never ran because the run was stopped (Stop, or
    ``on_error="raise"``); both carry an error in the result's error column, so ``errors()`` lists
    ``failed + cancelled`` rows. ``tokens`` and ``cost_usd`` are optional: when left ``None`` the
    last gauges the run reported through ``update`` are shown instead, if any.

    Examples
    --------
    >>> s = RunSummary(total=10, succeeded=6, failed=1, cached=2, elapsed_s=2.0, cancelled=1)
    >>> s.ran, s.rows_per_s
    (7, 3.5)
    """

    total: int
    succeeded: int
    failed: int
    cached: int
    elapsed_s: float
    errors_by_type: dict[str, int] = field(default_factory=dict)
    first_failures: list[tuple[str, str]] = field(default_factory=list)  # (index label, "Type: msg")
    errors_call: str = "out.modal.errors()"
    tokens: int | None = None
    cost_usd: float | None = None
    logs: tuple[str, ...] = ()  # output from where the rows ran (Modal's build and container logs)
    cancelled: int = 0
    no_cache: str = "cache=False"
    #: estimated dollars of Modal container time (Modal runs only; see modal_magic.costs)
    compute_usd: float | None = None  # how the caller turns the cache off, for the hint after "N cached"

    @property
    def ran(self) -> int:
        """Rows the function ran on in this run (succeeded or failed): not cached, not cancelled."""
        return self.succeeded + self.failed

    @property
    def rows_per_s(self) -> float:
        """Rows that ran (succeeded or failed) per second of the run; cached rows don't count."""
        return self.ran / self.elapsed_s if self.elapsed_s > 0 else 0.0


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``"4.2s"``, ``"12s"``, ``"3m04s"`` or ``"1h02m"``; unknown is ``"?"``.

    Examples
    --------
    >>> [format_duration(s) for s in (0.42, 12.4, 184, 3720, None)]
    ['0.4s', '12s', '3m04s', '1h02m', '?']
    """
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(rate: float | None) -> str:
    """Rows per second, with as many digits as are worth reading; unknown is ``"?"``."""
    if rate is None:
        return "?"
    if rate < 1:
        return f"{rate:.2f}"
    if rate < 100:
        return f"{rate:.1f}"
    return f"{rate:,.0f}"


def usage_text(tokens: int | None, cost_usd: float | None) -> str:
    """``"1,234 tokens, $0.0012"``, or the part that is known, or ``""``."""
    parts = []
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    if cost_usd is not None:
        parts.append(dollars(cost_usd))  # the same format as compute dollars on the same line
    return ", ".join(parts)


def outcome(state: State, summary: RunSummary) -> State:
    """Colour and wording follow what happened: a "success" with failed rows is a "failed"."""
    if state == "aborted":
        return "aborted"
    return "failed" if state == "failed" or summary.failed > 0 else "success"


def bar_style(state: State, summary: RunSummary) -> str:
    """The ipywidgets ``bar_style`` of a finished run: green, orange (failed rows) or red (stopped)."""
    return _BAR_STYLE[outcome(state, summary)]


def summary_line(state: State, summary: RunSummary) -> str:
    """The one line that says how the run ended and what became of every row.

    Examples
    --------
    >>> summary_line("success", RunSummary(5, 2, 1, 2, 1.0, {"ValueError": 1}))
    'Done with failures: 5 rows in 1.0s (3 ran, 3.0 rows/s) | 2 succeeded, 1 failed (1 ValueError), 2 cached: cache=False runs them again'
    """
    failed = f"{summary.failed:,} failed"
    if summary.errors_by_type:
        by_type = sorted(summary.errors_by_type.items(), key=lambda kv: (-kv[1], kv[0]))
        failed += " (" + ", ".join(f"{count:,} {name}" for name, count in by_type) + ")"
    if summary.ran:
        rate = f"{format_rate(summary.rows_per_s)} rows/s"
        if summary.cached:  # the rate is of the rows that ran: say how many, or it reads as the whole run's
            rate = f"{summary.ran:,} ran, {rate}"
    else:
        rate = "all cached" if summary.cached == summary.total and summary.total else "no row ran"
    counts = f"{summary.succeeded:,} succeeded, {failed}"
    if summary.cancelled:
        counts += f", {summary.cancelled:,} cancelled"
    counts += f", {summary.cached:,} cached"
    if summary.cached:  # a cached row doesn't run (nor print): say how to run it again
        counts += f": {summary.no_cache} runs them again"
    line = (f"{_VERDICT[outcome(state, summary)]}: {summary.total:,} rows in "
            f"{format_duration(summary.elapsed_s)} ({rate}) | {counts}")
    usage = usage_text(summary.tokens, summary.cost_usd)
    if summary.compute_usd is not None:
        compute = f"≈ {dollars(summary.compute_usd)} Modal compute (estimate)"
        usage = f"{usage}, {compute}" if usage else compute
    return f"{line} | {usage}" if usage else line


def _failures(summary: RunSummary) -> tuple[list[tuple[str, str]], str]:
    """The failed rows to list, and the words that lead to ``errors_call`` for all of them."""
    shown = [(clip(label, 60), clip(error, 200))
             for label, error in summary.first_failures[:MAX_FAILURES_SHOWN]]
    lead = f"Showing {len(shown)} of {summary.failed:,} failed rows. " if shown else ""
    if summary.failed == 0:  # only rows a stop cancelled
        return shown, "The cancelled rows: "
    return shown, lead + "All failures with tracebacks: "


def _has_errors(summary: RunSummary) -> bool:
    return summary.failed > 0 or summary.cancelled > 0


def summary_lines(state: State, summary: RunSummary) -> list[str]:
    """The summary line, the first failed rows, and what to type to see them all."""
    lines = [summary_line(state, summary)]
    if _has_errors(summary):
        shown, lead = _failures(summary)
        lines += [f"  {label}: {error}" for label, error in shown]
        lines.append(f"  {lead}{summary.errors_call}")
    return lines


def summary_html(state: State, summary: RunSummary) -> str:
    """The summary line, a table of the first failed rows, and what to type to see them all, as HTML."""
    line = html.escape(summary_line(state, summary))
    parts = [f'<div class="modal-magic-summary-line">{line}</div>']
    if _has_errors(summary):
        shown, lead = _failures(summary)
        if shown:
            cell = 'style="padding: 0 1em 0 0; text-align: left; vertical-align: top"'
            rows = "".join(f"<tr><td {cell}>{html.escape(label)}</td>"
                           f"<td {cell}>{html.escape(error)}</td></tr>" for label, error in shown)
            parts.append(f'<table class="modal-magic-failures" style="font-size: smaller; line-height: 1.3">'
                         f"<thead><tr><th {cell}>index</th><th {cell}>error</th></tr></thead>"
                         f"<tbody>{rows}</tbody></table>")
        parts.append(f'<div class="modal-magic-errors-call">{html.escape(lead)}'
                     f"<code>{html.escape(summary.errors_call)}</code></div>")
    return "".join(parts)


def static_html(state: State, summary: RunSummary, *, title: str, counts: str, fraction: float,
                logs: list[str] | tuple[str, ...] = ()) -> str:
    """The finished bar as plain HTML, laid out and classed like the widget, for a saved notebook.

    Examples
    --------
    >>> page = static_html("success", RunSummary(2, 2, 0, 0, 1.0), title="y", counts="2/2 rows", fraction=1.0)
    >>> "progress-bar-success" in page and "Done: 2 rows" in page
    True
    """
    look = outcome(state, summary)
    width = f"{max(0.0, min(fraction, 1.0)) * 100:.4g}%"
    title_html = (f'<span class="modal-magic-title" style="margin-right: 0.5em">{html.escape(title)}</span>'
                  if title else "")
    bar = (f'<div class="modal-magic-bar" style="flex: 1 1 auto; height: 1em; margin: 2px 0; '
           f'background: var(--jp-layout-color2, #eee)">'
           f'<div class="progress-bar progress-bar-{_BAR_STYLE[look]}" '
           f'style="width: {width}; height: 100%; background: {_BAR_COLOUR[look]}"></div></div>')
    parts = [
        '<div class="modal-magic-progress modal-magic-static">',
        f'<div style="display: flex; align-items: center; width: 100%">{title_html}{bar}</div>',
        f'<div class="modal-magic-counts">{html.escape(counts)}</div>',
        f'<div class="modal-magic-summary">{summary_html(state, summary)}</div>',
    ]
    if logs:
        parts.append(f'<details class="modal-magic-logs"><summary>Modal output ({len(logs)} lines)</summary>'
                     '<pre style="max-height: 20em; overflow: auto; font-size: 0.85em; margin: 0">'
                     f'{html.escape(chr(10).join(logs))}</pre></details>')
    parts.append("</div>")
    return "".join(parts)


def clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: error messages can be long and multi-line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
