"""The exceptions and error records a user meets: per-row errors, crashed workers, stopped runs.

A failed row never raises out of a map by default; it becomes a :class:`RowError` in the
``<into>_error`` column. A ``RowError`` *is* the short ``"ExceptionType: message"`` text a user sees
in the DataFrame, and carries the rest (remote traceback, attempts, the exception object itself)
so ``out.modal.errors()`` can show everything without a side table that a copy or a filter would lose.
modal_magic's own exceptions (:class:`ShortTraceback`) show in IPython as the user's frames and one
message, without the library's internal frames; a row's traceback keeps the user's function's frames,
with their source lines even for a function defined in a notebook cell (:func:`readable_traceback`).
"""

from __future__ import annotations

import linecache
import os
import pickle
import re
import traceback as _traceback
from typing import Any, Protocol, runtime_checkable

__all__ = ["ShortTraceback", "readable_traceback", "ColumnNotFound", "OptionsError", "RowReport", "ModalSetupError", "RowError", "WorkerCrashed", "RowFailed", "MapInterrupted", "Cancelled", "UnpicklableResult"]


#: this package's folder: frames from files under it are modal_magic's internals
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: IPython's own frames (the one that runs the cell), hidden like this package's
_IPYTHON = os.sep + os.path.join("IPython", "core") + os.sep


def _internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or _IPYTHON in filename


class ShortTraceback:
    """Mixed into modal_magic's exceptions: IPython shows the user's frames and the message only.

    IPython calls an exception's ``_render_traceback_()`` for the lines it prints (ipyparallel uses
    it for remote errors). The frames left are the user's own (the cell that called the map); the
    twenty lines through the engine and the backends say nothing a user can act on. Outside IPython
    the exception is an ordinary one, with its full traceback.

    Examples
    --------
    >>> class Refused(ShortTraceback, ValueError):
    ...     pass
    >>> try:
    ...     raise Refused("no column 'txt'; did you mean 'text'?")
    ... except Refused as error:
    ...     error._render_traceback_()[-1]
    "Refused: no column 'txt'; did you mean 'text'?"
    """

    def _render_traceback_(self) -> list[str]:
        assert isinstance(self, BaseException)
        # A magic's cell shows as IPython's generated get_ipython().run_cell_magic(...) line: not the user's.
        frames = [f for f in _traceback.extract_tb(self.__traceback__)
                  if not _internal(f.filename) and not (f.line or "").startswith("get_ipython().run_")]
        lines = ["Traceback (most recent call last):"] if frames else []
        lines += [line.rstrip("\n") for line in _traceback.format_list(frames)]
        return lines + [f"{type(self).__name__}: {self}".rstrip()]


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in .*$')


def readable_traceback(text: str) -> str:
    r"""A row's formatted traceback without modal_magic's frames, with notebook cells' source lines.

    A function defined in a notebook cell runs in a worker process or container that has no copy of
    the cell, so its frames come back as ``File "/tmp/ipykernel_.../....py", line 6`` alone; this
    kernel has the cell's source (IPython keeps it in :mod:`linecache`), so the line is put back.

    Examples
    --------
    >>> import linecache
    >>> linecache.cache["/tmp/ipykernel_1/cell.py"] = (0, None, ["def f(x):\n", "    return 1 / x\n"],
    ...                                                "/tmp/ipykernel_1/cell.py")
    >>> print(readable_traceback('Traceback (most recent call last):\n'
    ...                          f'  File "{_PACKAGE}backends/row_runner.py", line 9, in _call\n'
    ...                          '    value = fn(*args)\n'
    ...                          '  File "/tmp/ipykernel_1/cell.py", line 2, in f\n'
    ...                          'ZeroDivisionError: division by zero'))
    Traceback (most recent call last):
      File "/tmp/ipykernel_1/cell.py", line 2, in f
        return 1 / x
    ZeroDivisionError: division by zero
    """
    if 'File "' not in text:
        return text
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FRAME.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        body = [lines[i]]
        i += 1
        while i < len(lines) and lines[i].startswith("    "):
            body.append(lines[i])
            i += 1
        if _internal(match["file"]):
            continue
        if len(body) == 1:
            source = linecache.getline(match["file"], int(match["line"])).strip()
            if source:
                body.append(f"    {source}")
        out += body
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


class OptionsError(ShortTraceback, ValueError):
    """An option has a wrong name, type or value; raised before any work starts."""


@runtime_checkable
class RowReport(Protocol):
    """What a row's exception may tell the run beyond its type and message.

    A row function that does its own retries or pays for work (an LLM request) raises exceptions
    with these two attributes; the generic layers read them off the *exception* (never off the
    user's function). It is a structural protocol rather than a base class because the exception
    may be raised where modal_magic isn't installed (a Modal container running code pickled by
    value), so it can't inherit from anything here.

    Attributes
    ----------
    row_attempts : int
        Tries the row already made inside one call (e.g. HTTP retries); the row's ``attempts``
        counts them.
    row_usage : tuple[int, float | None] | None
        ``(tokens, cost_usd)`` paid for although the row failed, which the run's meter adds up.
    row_billed_usd : float, optional
        Not part of the protocol's check (read with ``getattr`` where it may be set): on Modal with
        an LLM ``budget_usd``, what the row's tries may have been billed, which the kernel settles
        its batch's allotment with (:mod:`modal_magic.llm.allotments`).

    Examples
    --------
    >>> class Refused(ValueError):
    ...     row_attempts = 3
    ...     row_usage = (12, 0.001)
    >>> isinstance(Refused("no"), RowReport), isinstance(ValueError("no"), RowReport)
    (True, False)
    """

    row_attempts: int
    row_usage: tuple[int, float | None] | None


class ColumnNotFound(ShortTraceback, KeyError):
    """A column the map needs isn't in the DataFrame; the message lists the ones it has."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class ModalSetupError(ShortTraceback, RuntimeError):
    """Modal can't be used as configured (no token, server unreachable, version mismatch, missing secret)."""


class WorkerCrashed(RuntimeError):
    """The worker process (or container) running the row died before returning a result."""


class Cancelled(RuntimeError):
    """The row never ran: the run was stopped (Stop / Ctrl-C, or ``on_error="raise"``) first."""


class UnpicklableResult(TypeError):
    """The function returned a value that can't be sent back from the worker."""


class RowError(str):
    """One row's failure: the ``"Type: message"`` text shown in the DataFrame, plus the details.

    Attributes
    ----------
    type_name : str
        The exception's class name, e.g. ``"ValueError"``.
    message : str
        ``str(exception)``.
    traceback : str
        The formatted traceback, from the worker or container that ran the row.
    attempts : int
        How many times the row was tried.
    exception : BaseException | None
        The exception object, when it could be sent back from where it was raised.

    Examples
    --------
    >>> err = RowError.create("ValueError", "bad input", traceback="...", attempts=2)
    >>> err
    'ValueError: bad input'
    >>> err.attempts
    2
    """

    type_name: str
    message: str
    traceback: str
    attempts: int
    exception: BaseException | None

    @classmethod
    def create(
        cls,
        type_name: str,
        message: str,
        *,
        traceback: str = "",
        attempts: int = 1,
        exception: BaseException | None = None,
    ) -> RowError:
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        text = f"{type_name}: {first_line}" if first_line else type_name
        if len(text) > 300:
            text = text[:297] + "..."
        self = super().__new__(cls, text)
        self.type_name = type_name
        self.message = message
        self.traceback = readable_traceback(traceback)
        self.attempts = attempts
        self.exception = exception
        return self

    @classmethod
    def from_exception(cls, exc: BaseException, *, traceback: str = "", attempts: int = 1) -> RowError:
        """Build the record for an exception raised in this process."""
        return cls.create(type(exc).__name__, str(exc), traceback=traceback, attempts=attempts, exception=exc)

    def with_attempts(self, attempts: int) -> RowError:
        """The same error, recorded as having taken ``attempts`` tries."""
        return RowError.create(
            self.type_name, self.message, traceback=self.traceback, attempts=attempts, exception=self.exception
        )

    def to_exception(self) -> BaseException:
        """The original exception if it came back, else a ``RuntimeError`` carrying the same text."""
        return self.exception if self.exception is not None else RuntimeError(str(self))

    def __reduce__(self) -> tuple[Any, ...]:
        exception = self.exception
        if exception is not None:
            try:
                pickle.dumps(exception)
            except Exception:  # an exception that can't travel still leaves its text and traceback
                exception = None
        return (_rebuild_row_error, (self.type_name, self.message, self.traceback, self.attempts, exception))


def _rebuild_row_error(
    type_name: str, message: str, traceback: str, attempts: int, exception: BaseException | None
) -> RowError:
    return RowError.create(type_name, message, traceback=traceback, attempts=attempts, exception=exception)


class RowFailed(ShortTraceback, RuntimeError):
    """Raised by ``on_error="raise"``: a row failed, so the run was stopped.

    ``label`` is the row's index label, ``position`` its position, ``error`` the :class:`RowError`;
    the original exception (when it came back) is chained as ``__cause__``. Its message ends with
    the row's own traceback; the frame so far (finished rows, the failed one, the rest
    ``Cancelled``) is :func:`modal_magic.last_result`.
    """

    def __init__(self, label: Any, position: int, error: RowError) -> None:
        shown = label.item() if hasattr(label, "item") else label  # a numpy scalar's repr is np.int64(20)
        super().__init__(f"row {shown!r} (position {position}) failed: {error}\n{error.traceback}".rstrip())
        self.label = label
        self.position = position
        self.error = error


class MapInterrupted(ShortTraceback, KeyboardInterrupt):
    """The user pressed Stop (or Ctrl-C): the run stopped and kept what it had finished.

    ``result`` holds the full DataFrame: finished rows with their results, the rest with a
    ``Cancelled`` error; :func:`modal_magic.last_result` returns it too.
    """

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result
