"""How many rows go into each batch: measured as the run goes, so batches compute for about the same time.

A batch should compute long enough to amortise its round trip to a worker or container and short
enough to balance the load and show progress; the right number of rows depends on the function and
the machine, so :class:`BatchSizer` starts small, measures each returned batch's seconds per row, and
grows (at most :data:`GROWTH` times per measurement) toward the backend's target seconds per batch;
near the end of a run batches shrink so the workers finish together, but not below an eighth of
that target.
"""

from __future__ import annotations

import math

__all__ = ["BatchSizer", "GROWTH", "TARGET_BATCH_S"]

#: how long a batch should compute for: long enough to amortise a round trip, short enough to balance
TARGET_BATCH_S = 0.05
#: how fast an automatic batch may grow between measurements
GROWTH = 8
#: near the end, batches shrink to balance the workers, down to 1/TAIL_FLOOR of the target's work
TAIL_FLOOR = 8


class BatchSizer:
    """Picks each batch's size from the per-row time measured so far (joblib's auto batching, in short).

    Until a measurement comes back, batches hold ``initial`` rows; each measurement lets the size grow
    by at most ``GROWTH`` toward ``target_s`` of work per batch, never past ``max_size``, and near the
    end batches shrink so the last ones finish together instead of one worker holding the tail.
    """

    def __init__(self, workers: int, fixed: int | None, *, target_s: float = TARGET_BATCH_S,
                 initial: int = 1, max_size: int | None = None) -> None:
        self.workers = max(1, workers)
        self.fixed = fixed
        self.target_s = target_s
        self.initial = max(1, initial if max_size is None else min(initial, max_size))
        self.max_size = max_size
        self.per_row_s: float | None = None
        self.largest_measured = 1

    def observe(self, rows: int, elapsed_s: float) -> None:
        if rows <= 0:
            return
        per_row = max(elapsed_s / rows, 1e-9)
        self.per_row_s = per_row if self.per_row_s is None else 0.7 * self.per_row_s + 0.3 * per_row
        self.largest_measured = max(self.largest_measured, rows)

    def next_size(self, remaining: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_row_s is None:
            return self.initial
        wanted = self.target_s / self.per_row_s
        # The tail is balanced, but never into batches of under an eighth of the target's work: a
        # batch's round trip (tens of milliseconds to a Modal container) would cost more than the
        # imbalance it saves.
        balanced = max(math.ceil(remaining / (2 * self.workers)), wanted / TAIL_FLOOR)
        size = min(wanted, self.largest_measured * GROWTH, balanced)
        if self.max_size is not None:
            size = min(size, self.max_size)
        return max(1, min(int(size), remaining))
