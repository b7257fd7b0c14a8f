"""A run's outcomes, filed by row position as they arrive: values, errors, cached and cancelled rows, seconds.

The engine hands every finished batch to :class:`Outcomes`, in whatever order batches complete;
each row's value or :class:`~modal_magic.errors.RowError` lands at its position, so joining never
depends on completion order. Rows read from the cache, rows cancelled by Stop or
``on_error="raise"``, rows that under ``expand=True`` returned something other than a dict, and
(with ``timings=True``) each row's seconds are kept here too, for the one summary a run gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import join
from .errors import Cancelled, RowError

__all__ = ["Outcomes"]


@dataclass
class Outcomes:
    """Results and errors filed by position as they arrive."""

    n: int
    expand: bool = False  # a row's value must be a dict: anything else (but None) is that row's error
    values: list[Any] = field(init=False)
    errors: dict[int, RowError] = field(default_factory=dict)
    cached: int = 0
    cancelled: set[int] = field(default_factory=set)  # rows that never ran (Stop, on_error="raise")
    #: each row's seconds where it ran (``timings=True``; NaN until measured), else None
    seconds: np.ndarray | None = None
    #: estimated dollars of Modal container time so far (``backend="modal"`` only)
    compute_usd: float | None = None

    def __post_init__(self) -> None:
        self.values = [None] * self.n
        self._done = bytearray(self.n)

    def time(self, positions: Sequence[int], seconds: list[float] | None) -> None:
        """Record a batch's per-row seconds (when it measured them)."""
        if self.seconds is not None and seconds is not None and len(seconds) == len(positions):
            self.seconds[np.asarray(positions, dtype=np.intp)] = seconds

    def file(self, positions: Sequence[int], values: list[Any], errors: list[tuple]) -> list[int]:
        """Record a batch's outcomes; return the positions that failed."""
        if isinstance(positions, range) and positions.step == 1:
            self.values[positions.start : positions.stop] = values
            self._done[positions.start : positions.stop] = b"\x01" * len(positions)
        else:
            for position, value in zip(positions, values):
                self.values[position] = value
                self._done[position] = 1
        failed = []
        for i, type_name, message, tb, attempts, exc in errors:
            position = positions[i]
            self.values[position] = None
            self.errors[position] = RowError.create(type_name, message, traceback=tb, attempts=attempts, exception=exc)
            failed.append(position)
        if self.expand:  # counted as failed here, so the bar and the summary agree with errors()
            failed += self._not_dicts(positions, values, set(failed))
        return failed

    def _not_dicts(self, positions: Sequence[int], values: list[Any], failed: set[int]) -> list[int]:
        """Under ``expand=True``, file a row that returned something other than a dict as an error."""
        wrong = []
        for position, value in zip(positions, values):
            if position not in failed and value is not None and not isinstance(value, dict):
                self.fail(position, join.not_a_dict(value))
                wrong.append(position)
        return wrong

    def file_cached(self, positions: np.ndarray, values: list[Any]) -> int:
        """Rows whose results came from the cache (their positions, in any order, and values).

        Returns how many of them failed (a non-dict under ``expand=True``).
        """
        if len(positions) == self.n and self.n and positions[0] == 0 and (np.diff(positions) == 1).all():
            self.values = list(values)
            self._done = bytearray(b"\x01" * self.n)
        else:
            for position, value in zip(positions.tolist(), values):
                self.values[position] = value
                self._done[position] = 1
        failed = len(self._not_dicts(positions.tolist(), values, set())) if self.expand else 0
        self.cached += len(positions) - failed
        return failed

    def fail(self, position: int, error: RowError) -> None:
        self.values[position] = None
        self.errors[position] = error
        self._done[position] = 1

    def unfinished(self) -> list[int]:
        return [i for i in range(self.n) if not self._done[i]]

    def cancel_unfinished(self, why: str) -> None:
        """Give every row that never finished a ``Cancelled`` error: no row disappears."""
        for position in self.unfinished():
            self.fail(position, RowError.from_exception(Cancelled(why)))
            self.cancelled.add(position)
