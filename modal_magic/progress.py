"""Progress display for a run: a live ipywidgets bar in a notebook, a text line elsewhere, or none.

The engine builds a display with ``make_progress(enabled, total, title=..., clock=...)``, feeds it
outcome counts with ``update(done=, failed=, cached=)`` (increments) and gauges (``retrying``,
``containers``, ``tokens``, ``cost_usd``: absolute values, shown once set), and ends it with
``close(state, summary)``, which always redraws and puts a summary of the run (and its first
failed rows) under the bar. Which display is used is decided in one place, ``_detect_display``:
an ipywidgets bar inside an IPython kernel, a text bar everywhere else (rewritten in place with
``\\r`` on a terminal, a few sparse lines in logs). Like tqdm's ``update()``, redraws are throttled
by checking a row counter before the clock and drawing at most every ``mininterval`` seconds, so
updating once per row costs about a tenth of a microsecond.
"""

from __future__ import annotations

import html
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, TextIO

from .costs import dollars

__all__ = ["Progress", "RunSummary", "State", "TextProgress", "WidgetProgress", "make_progress"]

State = Literal["success", "failed", "aborted"]

#: Failed rows listed under the bar; the rest are one ``errors_call`` away.
MAX_FAILURES_SHOWN = 5

_BAR_STYLE = {"success": "success", "failed": "warning", "aborted": "danger"}
_VERDICT = {"success": "Done", "failed": "Done with failures", "aborted": "Aborted"}


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports under its bar.

    ``tokens`` and ``cost_usd`` are optional: when left ``None`` the last gauges the run
    reported through ``update`` are shown instead, if any.
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
    #: estimated dollars of Modal container time (Modal runs only; see modal_magic.costs)
    compute_usd: float | None = None

    @property
    def rows_per_s(self) -> float:
        """Rows that ran (succeeded or failed) per second of the run."""
        return (self.succeeded + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Progress:
    """No display at all (``progress=False``); the interface every display implements.

    Examples
    --------
    >>> bar = Progress()
    >>> bar.update(done=1)
    >>> bar.close("success", RunSummary(total=1, succeeded=1, failed=0, cached=0, elapsed_s=0.1))
    """

    def update(self, *, done: int = 0, failed: int = 0, cached: int = 0,
               retrying: int | None = None, containers: int | None = None,
               tokens: int | None = None, cost_usd: float | None = None, status: str | None = None) -> None:
        """Count finished rows and set the gauges.

        Parameters
        ----------
        done, failed, cached : int
            Rows that succeeded, failed, or came from the cache since the last call.
        retrying, containers, tokens, cost_usd : optional
            Absolute values; ``None`` leaves the shown value as it was. ``containers``,
            ``tokens`` and ``cost_usd`` are shown only once they have been set.
        status : str, optional
            What the rows wait for (an OpenAI batch's state and request counts), shown first once set.

        Examples
        --------
        >>> Progress().update(done=3, failed=1, containers=4)
        """

    def log(self, lines: list[str]) -> None:
        """Output from where the rows run (Modal's image builds and container logs).

        The widget keeps it collapsed under the bar; the text bar doesn't print it (a log would
        drown in it), and ``modal_magic.last_run().logs`` keeps it either way.

        Examples
        --------
        >>> Progress().log(["Building image im-123"])
        """

    def close(self, state: State, summary: RunSummary) -> None:
        """Draw the final state and the run's summary; later calls do nothing.

        Parameters
        ----------
        state : {"success", "failed", "aborted"}
            How the run ended: every row succeeded, some rows failed, or it was stopped.
        summary : RunSummary
            Totals, failures by type and the first failed rows.

        Examples
        --------
        >>> Progress().close("aborted", RunSummary(4, 1, 0, 0, 2.0))
        """


class _LiveProgress(Progress):
    """Counts, throttling and the counts text shared by the widget and the text bar.

    Subclasses implement ``_draw(now, final)`` and ``_show_summary(state, summary)``.
    Not thread-safe: feed it from one thread (the engine's consumer loop does).
    """

    #: Seconds between redraws, at most.
    mininterval = 0.1
    #: Rows counted between two readings of the clock, at most.
    maxminiters = 100

    def __init__(self, total: int, *, title: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.title = title
        self.done = self.failed = self.cached = self.retrying = 0
        self.containers: int | None = None
        self.status: str | None = None
        self.tokens: int | None = None
        self.cost_usd: float | None = None
        self._clock = clock
        self._closed = False
        # Rows counted since the clock was last read, and how many to count before reading it
        # again (tqdm's miniters): the cheap integer check that keeps the clock out of most updates.
        self._pending = 0
        self._miniters = 1
        self._start = self._last_draw_t = clock()
        self._last_draw_n = 0

    @property
    def n(self) -> int:
        """Rows finished so far: done, failed or cached."""
        return self.done + self.failed + self.cached

    def update(self, *, done: int = 0, failed: int = 0, cached: int = 0,
               retrying: int | None = None, containers: int | None = None,
               tokens: int | None = None, cost_usd: float | None = None, status: str | None = None) -> None:
        pending = self._pending + done
        self.done += done
        if failed or cached:  # rare next to done; skipping them is a quarter of this call's cost
            self.failed += failed
            self.cached += cached
            pending += failed + cached
        if status is not None and status != self.status:
            self.status = status
            pending += self._miniters
        if (retrying is not None or containers is not None
                or tokens is not None or cost_usd is not None):
            if self._set_gauges(retrying, containers, tokens, cost_usd):
                pending += self._miniters  # a moved gauge is worth a look at the clock
        if pending < self._miniters:
            self._pending = pending
            return
        self._pending = 0
        now = self._clock()
        self._adapt_miniters(now)
        if now - self._last_draw_t >= self.mininterval and not self._closed:
            self._last_draw_t, self._last_draw_n = now, self.n
            self._draw(now, final=False)

    def _set_gauges(self, retrying: int | None, containers: int | None,
                    tokens: int | None, cost_usd: float | None) -> bool:
        moved = False
        if retrying is not None and retrying != self.retrying:
            self.retrying, moved = retrying, True
        if containers is not None and containers != self.containers:
            self.containers, moved = containers, True
        if tokens is not None and tokens != self.tokens:
            self.tokens, moved = tokens, True
        if cost_usd is not None and cost_usd != self.cost_usd:
            self.cost_usd, moved = cost_usd, True
        return moved

    def _adapt_miniters(self, now: float) -> None:
        # Read the clock about ten times per redraw interval at the rate since the last redraw,
        # growing at most twofold per reading (a burst of rows, or a clock too coarse to have
        # moved, is no rate) and never past `maxminiters`: when rows slow down, the bar can sit
        # on stale numbers for at most that many rows. 100 already makes the clock's share of
        # an update a few nanoseconds.
        dt = now - self._last_draw_t
        target = (int((self.n - self._last_draw_n) * self.mininterval / (10 * dt)) if dt > 0
                  else self.maxminiters)
        self._miniters = max(1, min(2 * self._miniters, target, self.maxminiters))

    def close(self, state: State, summary: RunSummary) -> None:
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        self._start = now - summary.elapsed_s  # the final line and the summary tell the same time
        self._draw(now, final=True)
        self._show_summary(state, summary)

    def _counts_text(self, now: float, *, final: bool = False) -> str:
        """The live line: rows, counts, gauges, rate, elapsed and (while running) ETA."""
        elapsed = max(now - self._start, 0.0)
        computed = self.done + self.failed
        rate = computed / elapsed if elapsed > 0 else None
        parts = [self.status] if self.status else []
        parts += [f"{self.n:,}/{self.total:,} rows",
                 f"{self.done:,} done, {self.failed:,} failed, {self.cached:,} cached, "
                 f"{self.retrying:,} retrying"]
        if self.containers is not None:
            parts.append(f"{self.containers:,} containers")
        usage = _usage_text(self.tokens, self.cost_usd)
        if usage:
            parts.append(usage)
        parts.append(f"{_format_rate(rate)} rows/s")
        timing = f"{format_duration(elapsed)} elapsed"
        if not final:
            remaining = max(self.total - self.n, 0)
            eta = 0.0 if remaining == 0 else (remaining / rate if rate else None)
            timing += f", ETA {format_duration(eta)}"
        parts.append(timing)
        return " | ".join(parts)

    def _summary(self, summary: RunSummary) -> RunSummary:
        """``summary`` with the run's last token and cost gauges filled in where it has none."""
        if summary.tokens is None and self.tokens is not None:
            summary = replace(summary, tokens=self.tokens)
        if summary.cost_usd is None and self.cost_usd is not None:
            summary = replace(summary, cost_usd=self.cost_usd)
        return summary

    def _draw(self, now: float, *, final: bool) -> None:
        raise NotImplementedError

    def _show_summary(self, state: State, summary: RunSummary) -> None:
        raise NotImplementedError


class WidgetProgress(_LiveProgress):
    """An ipywidgets bar with a counts line, and a summary line (plus failures) when done.

    Layout: ``VBox[HBox[title, IntProgress], HTML counts, HTML summary]``, with the CSS classes
    ``modal-magic-progress`` (the VBox), ``modal-magic-title``, ``modal-magic-bar``,
    ``modal-magic-counts`` and ``modal-magic-summary`` (hidden until the run ends).

    Parameters
    ----------
    total : int
        Rows in the run; the bar's maximum.
    title : str
        Shown before the bar (escaped).
    clock : callable
        Seconds, monotonic; inject a fake one in tests.
    show : callable, optional
        Called once with the root widget; defaults to ``IPython.display.display``.

    Examples
    --------
    >>> bar = WidgetProgress(3, title="classify", show=lambda widget: None)
    >>> bar.update(done=2, failed=1)
    >>> bar.close("failed", RunSummary(3, 2, 1, 0, 1.5, {"ValueError": 1}, [("7", "ValueError: x")]))
    >>> bar.bar.bar_style
    'warning'
    """

    def __init__(self, total: int, *, title: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 show: Callable[[Any], Any] | None = None) -> None:
        import ipywidgets as widgets

        super().__init__(total, title=title, clock=clock)
        self.title_html = widgets.HTML(html.escape(title),
                                       layout=widgets.Layout(display="" if title else "none"))
        self.bar = widgets.IntProgress(value=0, min=0, max=max(total, 1),
                                       layout=widgets.Layout(flex="1 1 auto", width="auto"))
        self.counts = widgets.HTML()
        self.summary = widgets.HTML(layout=widgets.Layout(display="none"))
        self.logs: Any = None  # a collapsed panel of remote output, added when the first line comes
        self.widget = widgets.VBox([
            widgets.HBox([self.title_html, self.bar], layout=widgets.Layout(width="100%")),
            self.counts,
            self.summary,
        ])
        for w, css in [(self.widget, "modal-magic-progress"), (self.title_html, "modal-magic-title"),
                       (self.bar, "modal-magic-bar"), (self.counts, "modal-magic-counts"),
                       (self.summary, "modal-magic-summary")]:
            w.add_class(css)
        self._draw(self._start, final=False)
        if show is None:
            from IPython.display import display as show
        show(self.widget)

    def _draw(self, now: float, *, final: bool) -> None:
        self.bar.value = min(self.n, self.bar.max)
        self.counts.value = html.escape(self._counts_text(now, final=final))

    #: lines of remote output kept in the collapsed panel
    LOG_LINES = 500

    def log(self, lines: list[str]) -> None:
        import ipywidgets as widgets

        if not lines:
            return
        if self.logs is None:
            self._log_lines: list[str] = []
            self._log_html = widgets.HTML()
            self.logs = widgets.Accordion(children=[self._log_html], selected_index=None)
            self.logs.add_class("modal-magic-logs")
            self.widget.children = (*self.widget.children, self.logs)
        self._log_lines = (self._log_lines + lines)[-self.LOG_LINES:]
        self._log_html.value = (
            '<pre style="max-height: 20em; overflow: auto; font-size: 0.85em; margin: 0">'
            + html.escape("\n".join(self._log_lines)) + "</pre>"
        )
        self.logs.set_title(0, f"Modal output ({len(self._log_lines)} lines)")

    def _show_summary(self, state: State, summary: RunSummary) -> None:
        outcome = _outcome(state, summary)
        if outcome == "success":
            self.bar.value = self.bar.max  # a run of 0 rows, or rows counted only in the summary
        self.bar.bar_style = _BAR_STYLE[outcome]
        self.summary.value = _summary_html(outcome, self._summary(summary))
        self.summary.layout.display = ""


class TextProgress(_LiveProgress):
    """A one-line text bar: rewritten in place on a terminal, sparse lines in a log.

    On a TTY the line is redrawn with ``\\r`` (at most every ``mininterval`` seconds). Elsewhere
    (CI logs, pipes, files) a full line is written only at the start, each time another tenth of
    the rows is finished, every ``log_interval`` seconds, and at the end.

    Parameters
    ----------
    total : int
        Rows in the run.
    title : str
        Prefixes every line as ``"title: "``.
    clock : callable
        Seconds, monotonic; inject a fake one in tests.
    file : text stream, optional
        Where to write; ``sys.stderr`` by default.
    log_interval : float
        Seconds between lines when ``file`` is not a TTY.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = TextProgress(2, file=out, clock=lambda: 0.0)
    >>> bar.update(done=2)
    >>> bar.close("success", RunSummary(2, 2, 0, 0, 1.0))
    >>> out.getvalue().splitlines()[-1]
    'Done: 2 rows in 1.0s (2.0 rows/s) | 2 succeeded, 0 failed, 0 cached'
    """

    def __init__(self, total: int, *, title: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 file: TextIO | None = None, log_interval: float = 30.0) -> None:
        super().__init__(total, title=title, clock=clock)
        self.file = sys.stderr if file is None else file
        self.log_interval = log_interval
        try:
            self._tty = bool(self.file.isatty())
        except (AttributeError, ValueError):
            self._tty = False
        self._ncols = _terminal_columns(self.file) if self._tty else None
        self._last_width = 0
        self._last_line_t: float | None = None
        self._last_tenth = 0
        self._draw(self._start, final=False)

    def _draw(self, now: float, *, final: bool) -> None:
        line = self._counts_text(now, final=final)
        if self.title:
            line = f"{self.title}: {line}"
        if self._tty:
            if self._ncols and len(line) >= self._ncols:
                line = line[:self._ncols - 1]
            padding = " " * max(self._last_width - len(line), 0)
            self._last_width = len(line)
            self._write("\r" + line + padding + ("\n" if final else ""))
            return
        tenth = self.n * 10 // self.total if self.total > 0 else 10
        if (final or self._last_line_t is None
                or (tenth > self._last_tenth and self.n < self.total)
                or now - self._last_line_t >= self.log_interval):
            self._last_line_t, self._last_tenth = now, tenth
            self._write(line + "\n")

    def _show_summary(self, state: State, summary: RunSummary) -> None:
        self._write("".join(line + "\n" for line in _summary_lines(_outcome(state, summary),
                                                                    self._summary(summary))))

    def _write(self, text: str) -> None:
        # A progress line must never end a run: a stream that can't take a character or that
        # went away (closed pipe) gets a best-effort rendering or nothing.
        try:
            try:
                self.file.write(text)
            except UnicodeEncodeError:
                self.file.write(text.encode("ascii", "backslashreplace").decode("ascii"))
            self.file.flush()
        except (OSError, ValueError):
            pass


def make_progress(enabled: bool, total: int, *, title: str = "",
                  clock: Callable[[], float] = time.monotonic,
                  file: TextIO | None = None,
                  kind: Literal["widget", "text"] | None = None) -> Progress:
    """Return the progress display that fits where the code runs.

    Parameters
    ----------
    enabled : bool
        ``False`` returns a display that shows nothing.
    total : int
        Rows in the run.
    title : str
        Shown before the bar.
    clock : callable
        Seconds, monotonic; inject a fake one in tests.
    file : text stream, optional
        Where the text bar writes (``sys.stderr`` by default).
    kind : {"widget", "text"}, optional
        Force a display instead of detecting one.

    Returns
    -------
    Progress
        A ``WidgetProgress`` in a kernel that can show widgets, else a ``TextProgress``.

    Examples
    --------
    >>> import io
    >>> bar = make_progress(True, 10, title="embed", file=io.StringIO(), kind="text")
    >>> type(bar).__name__
    'TextProgress'
    >>> type(make_progress(False, 10)).__name__
    'Progress'
    """
    if not enabled:
        return Progress()
    if (kind or _detect_display()) == "widget":
        return WidgetProgress(total, title=title, clock=clock)
    return TextProgress(total, title=title, clock=clock, file=file)


def _detect_display() -> Literal["widget", "text"]:
    """``"widget"`` in an IPython kernel (Jupyter, VS Code, Colab) with ipywidgets, else ``"text"``."""
    zmqshell = sys.modules.get("ipykernel.zmqshell")  # never imported outside a kernel
    if zmqshell is None:
        return "text"
    from IPython import get_ipython

    if not isinstance(get_ipython(), zmqshell.ZMQInteractiveShell):
        return "text"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "text"
    return "widget"


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


def _format_rate(rate: float | None) -> str:
    if rate is None:
        return "?"
    if rate < 1:
        return f"{rate:.2f}"
    if rate < 100:
        return f"{rate:.1f}"
    return f"{rate:,.0f}"


def _usage_text(tokens: int | None, cost_usd: float | None) -> str:
    parts = []
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    if cost_usd is not None:
        parts.append(f"${cost_usd:,.4f}" if cost_usd < 1 else f"${cost_usd:,.2f}")
    return ", ".join(parts)


def _outcome(state: State, summary: RunSummary) -> State:
    """Colour and wording follow what happened: a "success" with failed rows is a "failed"."""
    if state == "aborted":
        return "aborted"
    return "failed" if state == "failed" or summary.failed > 0 else "success"


def _summary_line(outcome: State, summary: RunSummary) -> str:
    failed = f"{summary.failed:,} failed"
    if summary.errors_by_type:
        by_type = sorted(summary.errors_by_type.items(), key=lambda kv: (-kv[1], kv[0]))
        failed += " (" + ", ".join(f"{count:,} {name}" for name, count in by_type) + ")"
    line = (f"{_VERDICT[outcome]}: {summary.total:,} rows in {format_duration(summary.elapsed_s)} "
            f"({_format_rate(summary.rows_per_s)} rows/s) | {summary.succeeded:,} succeeded, "
            f"{failed}, {summary.cached:,} cached")
    usage = _usage_text(summary.tokens, summary.cost_usd)
    if summary.compute_usd is not None:
        compute = f"≈ {dollars(summary.compute_usd)} Modal compute (estimate)"
        usage = f"{usage}, {compute}" if usage else compute
    return f"{line} | {usage}" if usage else line


def _failures(summary: RunSummary) -> tuple[list[tuple[str, str]], str]:
    """The failed rows to list, and the words that lead to ``errors_call`` for all of them."""
    shown = [(_clip(label, 60), _clip(error, 200))
             for label, error in summary.first_failures[:MAX_FAILURES_SHOWN]]
    lead = f"Showing {len(shown)} of {summary.failed:,} failed rows. " if shown else ""
    return shown, lead + "All failures with tracebacks: "


def _summary_lines(outcome: State, summary: RunSummary) -> list[str]:
    lines = [_summary_line(outcome, summary)]
    if summary.failed > 0:
        shown, lead = _failures(summary)
        lines += [f"  {label}: {error}" for label, error in shown]
        lines.append(f"  {lead}{summary.errors_call}")
    return lines


def _summary_html(outcome: State, summary: RunSummary) -> str:
    line = html.escape(_summary_line(outcome, summary))
    parts = [f'<div class="modal-magic-summary-line">{line}</div>']
    if summary.failed > 0:
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


def _clip(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: error messages can be long and multi-line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _terminal_columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        return None
