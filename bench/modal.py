"""Benchmark modal_magic on Modal: batching (100,000 tiny rows) and warm containers (5 cells in a row).

Runs against the local Modal-protocol test server (tests/modal_server), so it measures what the
client side and the protocol cost. **Batching**: modal_magic's batched map vs a hand-written
``f.map()``, the number of remote inputs each makes and the time they take (on Modal's cloud every
input also pays a network round trip, so the gap grows there). **Warm cells**: five consecutive
cells of 2,000 rows, with the server simulating a 3-second container start, with ``keep_warm``
(the default) and with ``keep_warm=0`` in the same run; with warm containers each cell after the
first should take at most 10% of the first one's time.

    .venv/bin/python bench/modal.py                  # both parts
    .venv/bin/python bench/modal.py --part warm      # only the warm cells
    .venv/bin/python bench/modal.py --rows 20000     # fewer rows for the batching part
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named modal.py: keep its folder off the path so `import modal` finds the client.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import modal  # noqa: E402
import pandas as pd  # noqa: E402

import modal_magic  # noqa: E402,F401
from tests.modal_server import running_modal_server  # noqa: E402


def tiny(x):
    return x * 2 + 1


def hand_written(server, values: list[int]) -> tuple[float, int, list[int]]:
    """What a Modal user writes by hand: one remote input per row."""
    app = modal.App("bench-hand-written")
    f = app.function(serialized=True)(tiny)
    before = server.inputs_received
    started = time.perf_counter()
    with app.run():
        results = list(f.map(values, order_outputs=True, return_exceptions=True))
    return time.perf_counter() - started, server.inputs_received - before, results


def with_modal_magic(server, values: list[int]) -> tuple[float, int, list[int]]:
    df = pd.DataFrame({"x": values})
    before = server.inputs_received
    started = time.perf_counter()
    out = df.modal.map(tiny, column="x", backend="modal", progress=False, cache=False)
    return time.perf_counter() - started, server.inputs_received - before, out["tiny"].tolist()


def light(x):
    time.sleep(0.0001)  # a tenth of a millisecond of work per row
    return x * 2 + 1


def warm_cells(server, *, cells: int, rows: int, cold_start_s: float) -> int:
    """Five cells in a row on Modal, with and without warm containers; print each cell's time and the ratios."""
    server.container_start_delay_s = cold_start_s
    df = pd.DataFrame({"x": range(rows)})
    expected = [light(x) for x in range(rows)]
    times: dict[int, list[float]] = {}
    for keep_warm in (0, 300):
        times[keep_warm] = []
        for _ in range(cells):
            started = time.perf_counter()
            out = df.modal.map(light, column="x", backend="modal", progress=False, cache=False, max_containers=4,
                               keep_warm=keep_warm)
            times[keep_warm].append(time.perf_counter() - started)
            assert out["light"].tolist() == expected
        modal_magic.shutdown()
    print(f"\n{cells} consecutive cells of {rows:,} rows (0.1 ms each), {cold_start_s:g} s simulated container start\n")
    print(f"{'cell':<6}{'keep_warm=300 (s)':>20}{'ratio to cell 1':>18}{'keep_warm=0 (s)':>18}{'ratio to cell 1':>18}")
    warm, cold = times[300], times[0]
    for i in range(cells):
        print(f"{i + 1:<6}{warm[i]:>20.2f}{warm[i] / warm[0]:>18.3f}{cold[i]:>18.2f}{cold[i] / cold[0]:>18.3f}")
    worst = max(warm[1:]) / warm[0]
    print(f"\nkeep_warm: slowest later cell / first cell = {worst:.3f} (target <= 0.10: "
          f"{'PASS' if worst <= 0.10 else 'FAIL'}); later cells {sum(cold[1:]) / sum(warm[1:]):.1f}x faster "
          f"than with keep_warm=0")
    return 0 if worst <= 0.10 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--part", choices=("batching", "warm", "all"), default="all")
    args = parser.parse_args()
    os.environ.setdefault("MODAL_TEST_SERVER_ECHO_LOGS", "0")
    status = 0
    if args.part in ("warm", "all"):
        with running_modal_server() as server:
            status = warm_cells(server, cells=5, rows=2_000, cold_start_s=3.0)
    if args.part == "warm":
        return status
    values = list(range(args.rows))
    expected = [tiny(v) for v in values]
    with running_modal_server() as server:
        mm_s, mm_inputs, mm_out = with_modal_magic(server, values)
        hw_s, hw_inputs, hw_out = hand_written(server, values)
    assert mm_out == expected and hw_out == expected, "both approaches must return the right values"
    print(f"{args.rows:,} tiny rows (x * 2 + 1) against the local Modal-protocol server\n")
    print(f"{'approach':<38}{'seconds':>10}{'remote inputs':>16}")
    rows = [("hand-written f.map(), one input/row", hw_s, hw_inputs),
            ("df.modal.map(backend='modal')", mm_s, mm_inputs)]
    for name, seconds, inputs in rows:
        print(f"{name:<38}{seconds:>10.2f}{inputs:>16,}")
    speed, fewer = hw_s / mm_s, hw_inputs / max(mm_inputs, 1)
    print(f"\nmodal_magic: {speed:.1f}x faster (target >= 20x: {'PASS' if speed >= 20 else 'FAIL'}), "
          f"{fewer:.0f}x fewer inputs (target >= 100x: {'PASS' if fewer >= 100 else 'FAIL'})")
    return status


if __name__ == "__main__":
    sys.exit(main())
