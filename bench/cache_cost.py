"""Probe: what the result cache costs on a first run, how fast a fully cached re-run is, and that
cheap rows don't pay for it.

W5's workload (``bench/local.py``): 1,000,000 random 220-character strings and a regex that counts
e-mail addresses in each (~5-10 µs a row), local processes, default options otherwise. Four
runs, timed in ``--repeat`` rounds in which they take turns: ``cache=False``; a first run with the cache
(``cache="refresh"``: every row computed, keyed, MAC'd and stored); a re-run where every row is
cached (in the same kernel, which remembers the rows' keys); and the same re-run as a restarted
kernel does it, keying every row again. Targets (issue 13): the first run at most 10% over ``cache=False``; the cached re-run
under 15% of the first run.

Then W6's kind of row (issue 12): ``--cheap-rows`` rows of ``x * 2 + 1``, which are too cheap to
store: ``Series.apply``, ``cache=False``, default options, and a re-run with default options
(which must not be slower than the first: nothing was stored, so nothing is keyed or read).

Each line gives the best wall seconds and CPU seconds (this process and its worker processes),
the ratio of those bests, and the median over rounds of each round's ratio (the runs of one round
are adjacent in time, so it is the figure a burst of load from elsewhere moves least; on a machine
shared with other work the wall ratios wander, the CPU ones less). The cache's own CPU a
row (keying, storing, keying again and reading back as a new kernel would, in this process
without workers) is printed too: the cost
that the ratios above are made of, and the least noisy figure here.

    python bench/cache_cost.py [--rows 1000000] [--cheap-rows 2000000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import random
import re
import tempfile
import time
import warnings
from dataclasses import dataclass

import pandas as pd
import psutil

import modal_magic
from modal_magic.cache.default import default_cache
from modal_magic.cache.key_memo import KEY_MEMO

_EMAILS = re.compile(r"\b[a-z]+@[a-z]+\.(?:com|org|net)\b")


def count_emails(text: str) -> int:
    """W5's row: a regex over a short string."""
    return len(_EMAILS.findall(text))


def double_plus_one(x: int) -> int:
    """W6's row: as little work as a row can have."""
    return x * 2 + 1


def make_short_texts(rows: int, chars: int = 220, seed: int = 5) -> list[str]:
    """The same strings as ``bench/local.py``'s W5."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz @."
    text = "".join(rng.choices(alphabet, k=max(chars * 2, 2_000_000)))
    span = len(text) - chars
    return [text[start : start + chars] for start in (rng.randrange(span) for _ in range(rows))]


def _cpu_s() -> float:
    """CPU seconds of this process and its live children (the worker pool lives across runs)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class Timed:
    """One run's wall and CPU seconds in each round."""

    walls: list[float]
    cpus: list[float]

    @property
    def best(self) -> tuple[float, float]:
        return min(self.walls), min(self.cpus)

    def median_ratio(self, base: Timed) -> tuple[float, float]:
        """The median over rounds of this run's time over ``base``'s in the same round (wall, CPU):
        rounds are adjacent in time, so a burst of load from elsewhere mostly cancels out."""
        return (statistics.median(a / b for a, b in zip(self.walls, base.walls)),
                statistics.median(a / b for a, b in zip(self.cpus, base.cpus)))


def _interleaved(runs: list, repeat: int) -> list[Timed]:
    """Wall and CPU seconds of each run, timed round-robin ``repeat`` times, so that load from
    elsewhere on the machine spreads over all of them."""
    timed = [Timed([], []) for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            cpu, started = _cpu_s(), time.perf_counter()
            run()
            timed[i].walls.append(time.perf_counter() - started)
            timed[i].cpus.append(_cpu_s() - cpu)
    return timed


def kernel_cpu_per_row(texts: list[str], repeat: int) -> tuple[float, float]:
    """The cache's own CPU per row in this process, no workers: key and store every row as a run's
    batches return, then key and look up every row as a re-run does (best of ``repeat``)."""
    from modal_magic.cache import RowCache, RowKeyHasher
    from modal_magic.cache.rows import RunCache

    values = [len(t) for t in texts]
    store_s, read_s = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as directory, RowCache(directory) as cache:
            started = time.process_time()
            run = RunCache(cache, RowKeyHasher("fp"), texts, star=False, refresh=False)
            for start in range(0, len(texts), 5000):
                stop = min(len(texts), start + 5000)
                run.save(range(start, stop), values[start:stop], [], 1e-5 * (stop - start))
            run.flush()
            store_s.append(time.process_time() - started)
            KEY_MEMO.forget()  # as in a new kernel: every row is keyed and matched to be looked up
            cache._found = None
            started = time.process_time()
            rows, _ = RunCache(cache, RowKeyHasher("fp"), texts, star=False, refresh=False).hits()
            read_s.append(time.process_time() - started)
            assert len(rows) == len(texts), f"{len(rows)} of {len(texts)} rows read back"
    return min(store_s) / len(texts), min(read_s) / len(texts)


def _line(label: str, measured: Timed, base: Timed | None = None, against: str = "", target: str = "") -> str:
    wall, cpu = measured.best
    text = f"{label:<34} {wall:7.2f} s wall {cpu:7.2f} s CPU"
    if base is not None:
        median_wall, median_cpu = measured.median_ratio(base)
        text += (f"   best {wall / base.best[0]:5.3f}x / {cpu / base.best[1]:5.3f}x, median of rounds "
                 f"{median_wall:5.3f}x / {median_cpu:5.3f}x {against}")
    return text + (f" ({target})" if target else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cheap-rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    # A function of this script's own module can't travel to workers by value: that is expected here.
    warnings.filterwarnings("ignore", message=".*couldn't be sent by value")
    os.environ["MODAL_MAGIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="mm-cache-cost-")
    texts = make_short_texts(args.rows)
    df = pd.DataFrame({"x": texts})
    sample = texts[:100_000]
    started = time.perf_counter()
    [count_emails(t) for t in sample]
    per_row = (time.perf_counter() - started) / len(sample)
    print(f"W5 kind: {args.rows:,} rows, {per_row * 1e6:.1f} µs a row in one process; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall / CPU ratios")

    def run(frame, fn, cache):
        return lambda: frame.modal.map(fn, column="x", progress=False, cache=cache)

    run(df, count_emails, False)()  # warm the workers
    cached = []

    def rerun(new_kernel: bool):
        def go():
            if new_kernel:  # what a restarted kernel has: no keys, no lookup remembered from the last run
                KEY_MEMO.forget()
                default_cache()._found = None
            run(df, count_emails, True)()
            cached.append(modal_magic.last_run().cached)
        return go

    off, first, hit, cold = _interleaved([run(df, count_emails, False), run(df, count_emails, "refresh"),
                                          rerun(False), rerun(True)], args.repeat)
    print(_line("cache=False", off))
    print(_line("first run, cache on", first, off, "of cache=False", "target: at most 1.10x"))
    print(_line("re-run, cached", hit, first, "of the first run", "target: under 0.15x") +
          f"; {min(cached):,} of {args.rows:,} rows from the cache", flush=True)
    print(_line("re-run in a new kernel, cached", cold, first, "of the first run") + " (every row keyed and matched)",
          flush=True)

    store_s, read_s = kernel_cpu_per_row(texts[:300_000], args.repeat)
    print(f"the cache's own CPU a row, no workers: {store_s * 1e9:,.0f} ns to key and store it, "
          f"{read_s * 1e9:,.0f} ns to key it and read it back", flush=True)

    if args.cheap_rows:
        cheap = pd.DataFrame({"x": range(args.cheap_rows)})
        print(f"W6 kind: {args.cheap_rows:,} rows of x * 2 + 1 (too cheap to store)")
        cached = []
        apply, nocache, default, again = _interleaved(
            [lambda: cheap["x"].apply(double_plus_one), run(cheap, double_plus_one, False),
             run(cheap, double_plus_one, "refresh"),
             lambda: (run(cheap, double_plus_one, True)(), cached.append(modal_magic.last_run().cached))],
            args.repeat)
        print(_line("Series.apply", apply))
        print(_line("cache=False", nocache, apply, "of Series.apply"))
        print(_line("default options, first run", default, apply, "of Series.apply", "target: at most 1.0x"))
        print(_line("default options, re-run", again, default, "of the first run", "target: at most 1.0x") +
              f"; at most {max(cached):,} rows from the cache", flush=True)
    modal_magic.shutdown()


if __name__ == "__main__":
    main()
