"""The progress bar outside a notebook: one line of text, rewritten in place on a terminal.

:class:`TextProgress` writes to ``sys.stderr`` by default: redrawn with ``\\r`` on a TTY, a few
sparse lines in CI logs and files, then the run's summary lines.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from .base import _LiveProgress
from .summary import RunSummary, State, summary_lines

__all__ = ["TextProgress"]


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
        self._write("".join(line + "\n" for line in summary_lines(state, self._summary(summary))))

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



def _terminal_columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, OSError, ValueError):
        return None
