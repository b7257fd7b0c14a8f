"""Progress display for a run: a live ipywidgets bar in a notebook, a text line elsewhere, or none.

The engine builds a display with ``make_progress(enabled, total, title=..., clock=...)``, feeds it
outcome counts with ``update(done=, failed=, cached=)`` and gauges, and ends it with
``close(state, summary)``, which always redraws and puts the run's :class:`RunSummary` (and its
first failed rows) under the bar. Which display is used is decided in one place,
``_detect_display``: an ipywidgets bar inside an IPython kernel (:mod:`.widget`), a text bar
everywhere else (:mod:`.text`). The counting and throttling they share is in :mod:`.base`, the
summary's record and its text and HTML forms in :mod:`.summary`.
"""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO

from .base import Progress
from .summary import RunSummary, State, format_duration
from .text import TextProgress
from .widget import WidgetProgress

__all__ = ["Progress", "RunSummary", "State", "TextProgress", "WidgetProgress", "format_duration", "make_progress"]


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
