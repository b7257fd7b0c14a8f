"""Benchmark: 100,000 tiny rows on Modal, modal_magic's batched map vs a hand-written ``f.map()``.

Runs against the local Modal-protocol test server (tests/modal_server), so it measures what the
client side and the protocol cost: the number of remote inputs each approach makes and the time
they take. On Modal's cloud every input also pays a network round trip, so the gap grows there.

    .venv/bin/python bench/modal.py            # 100,000 rows
    .venv/bin/python bench/modal.py --rows 20000
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    values = list(range(args.rows))
    expected = [tiny(v) for v in values]
    os.environ.setdefault("MODAL_TEST_SERVER_ECHO_LOGS", "0")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
