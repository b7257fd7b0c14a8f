"""The progress bar in a notebook: an ipywidgets bar while the run goes, static HTML once it ends.

While rows run, :class:`WidgetProgress` shows a live ``IntProgress`` with a counts line. When the run
ends it draws the final state, then replaces its output with plain ``text/html`` and ``text/plain``
of that state (bar, counts, summary line, failures table): a widget's output needs the kernel (or
saved widget state) to show, and a notebook reopened without one, on GitHub or nbviewer, would read
"Error displaying widget: model not found". The static page has the widget's layout and CSS classes.
"""

from __future__ import annotations

import html
import time
from typing import Any, Callable

from .base import _LiveProgress
from .summary import RunSummary, State, bar_style, static_html, summary_html, summary_lines

__all__ = ["WidgetProgress"]


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
        Called once with the root widget; defaults to ``IPython.display.display`` with a display
        id. What it returns, if it has an ``update(bundle, raw=True)`` method (an IPython
        ``DisplayHandle``), is used to replace the widget by static HTML and text when the run ends.

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
        self._give_text_form()
        if show is None:
            from IPython.display import display

            def show(widget: Any) -> Any:
                return display(widget, display_id=True)
        self._handle = show(self.widget)

    def _give_text_form(self) -> None:
        """What the live bar's output carries as text, instead of ipywidgets' ``VBox(children=...`` repr.

        Only a notebook saved while the run still goes keeps it (the end replaces the whole output).
        """
        widget_bundle = self.widget._repr_mimebundle_
        line = (f"{self.title}: " if self.title else "") + (
            f"running over {self.total:,} rows (the live bar needs its kernel; when the run ends, its "
            "summary replaces it)")

        def bundle(**kwargs: Any) -> dict[str, Any]:
            return {**widget_bundle(**kwargs), "text/plain": line}

        self.widget._repr_mimebundle_ = bundle

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
        summary = self._summary(summary)
        self.bar.bar_style = bar_style(state, summary)
        if self.bar.bar_style == "success":
            self.bar.value = self.bar.max  # a run of 0 rows, or rows counted only in the summary
        self.summary.value = summary_html(state, summary)
        self.summary.layout.display = ""
        if hasattr(self._handle, "update"):
            self._handle.update(self.finished_bundle(state, summary), raw=True)

    def finished_bundle(self, state: State, summary: RunSummary) -> dict[str, str]:
        """The finished bar as ``text/plain`` and ``text/html``: what the output holds once the run ends.

        Examples
        --------
        >>> bar = WidgetProgress(2, title="y", show=lambda widget: None, clock=lambda: 0.0)
        >>> bar.update(done=2)
        >>> print(bar.finished_bundle("success", RunSummary(2, 2, 0, 0, 1.0))["text/plain"])
        y: 2/2 rows | 2 done, 0 failed, 0 cached, 0 retrying | 2.0 rows/s | 1.0s elapsed
        Done: 2 rows in 1.0s (2.0 rows/s) | 2 succeeded, 0 failed, 0 cached
        """
        counts = self._counts_text(self._start + summary.elapsed_s, final=True)  # close() set _start so
        fraction = self.bar.value / self.bar.max if self.bar.max else 1.0
        logs = getattr(self, "_log_lines", [])
        text = "\n".join([f"{self.title}: {counts}" if self.title else counts, *summary_lines(state, summary)])
        return {"text/plain": text,
                "text/html": static_html(state, summary, title=self.title, counts=counts, fraction=fraction,
                                         logs=logs)}
