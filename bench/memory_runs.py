"""Probe: does a kernel's memory stay flat over many maps of a closure that holds a big object?

A run's function is kept for ``retry_failed()`` only when the run has failed rows, and then only
for the last :data:`modal_magic.runs.MAX_RUNS` such runs, so 500 maps of a closure holding 8 MB
must grow the process by far less than 500 × 8 MB (the target: under 100 MB). Runs twice: maps
where every row succeeds, and maps where one row in each fails (the worst case). Prints the RSS
before, after, and the growth.

    python bench/memory_runs.py [--maps 500] [--mb 8] [--backend local]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import pandas as pd
import psutil

import modal_magic


def _closure_over(payload: bytes):
    def f(x):
        return 1 // x + len(payload) % 7  # x == 0 fails

    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=500)
    parser.add_argument("--mb", type=int, default=8)
    parser.add_argument("--backend", default="local")
    args = parser.parse_args()
    process = psutil.Process(os.getpid())
    for label, first in (("every row succeeds", 1), ("one row fails per map", 0)):
        df = pd.DataFrame({"x": range(first, 20)})
        df.modal.map(_closure_over(b""), column="x", backend=args.backend, progress=False)  # warm-up
        gc.collect()
        before = process.memory_info().rss
        started = time.perf_counter()
        for _ in range(args.maps):
            payload = os.urandom(args.mb * 2**20)  # distinct each time, so no run is a cache hit
            df.modal.map(_closure_over(payload), column="x", backend=args.backend, progress=False)
            del payload
        gc.collect()
        after = process.memory_info().rss
        print(f"{args.maps} maps ({args.backend}, {label}) of a closure holding {args.mb} MB "
              f"in {time.perf_counter() - started:.1f} s: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB, "
              f"growth {(after - before) / 2**20:.0f} MB (target: under 100 MB)")
    modal_magic.shutdown()


if __name__ == "__main__":
    main()
