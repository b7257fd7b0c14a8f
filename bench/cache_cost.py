"""Probe: what the result cache costs on a first run, and how fast a fully cached re-run is.

1,000,000 rows of a ~10 µs function (a regex over a short string), local processes. Three timings,
each the best of ``--repeat``: ``cache=False``; a first run with the cache (``cache="refresh"``:
every row computed, keyed, MAC'd and stored); a re-run where every row is cached. Targets (issue
13): the first run at most 10% over ``cache=False``; the cached re-run under 15% of the first run.

    python bench/cache_cost.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import pandas as pd

import modal_magic

WORD = re.compile(r"(\w+)@(\w+)\.(com|org|net)\b")


def extract(text):
    found = WORD.search(text)
    return found.group(2) if found else None


def _best(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MODAL_MAGIC_CACHE_DIR", tempfile.mkdtemp(prefix="mm-cache-cost-"))
    texts = [f"please write to the support team user{i % 5000}@site{i % 977}.{('com', 'org', 'net')[i % 3]} or call {i}" for i in range(args.rows)]
    df = pd.DataFrame({"text": texts})
    per_row = _best(lambda: [extract(t) for t in texts[:100_000]], 1) / 100_000
    print(f"{args.rows:,} rows, {per_row * 1e6:.1f} µs a row in one process")

    def run(cache):
        return lambda: df.modal.map(extract, column="text", progress=False, cache=cache)

    run(False)()  # warm the workers
    off = _best(run(False), args.repeat)
    print(f"cache=False          {off:7.2f} s", flush=True)
    first = _best(run("refresh"), args.repeat)
    print(f"first run, cached    {first:7.2f} s   {first / off - 1:+.1%} over cache=False (target: at most +10%)",
          flush=True)
    hit = _best(run(True), args.repeat)
    cached = modal_magic.last_run().cached  # rows that measured under CHEAP_ROW_S per batch aren't stored
    print(f"re-run (cached)      {hit:7.2f} s   {hit / first:.1%} of the first run (target: under 15%); "
          f"{cached:,} of {args.rows:,} rows from the cache")
    modal_magic.shutdown()


if __name__ == "__main__":
    main()
