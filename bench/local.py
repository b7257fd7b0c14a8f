"""modal_magic's local backends against the tools a user would otherwise pick, in one table.

Four workloads (tiny rows, CPU-bound rows, I/O-bound rows, large string rows) run through
``Series.apply``, ``multiprocessing.Pool.map``, joblib, pandarallel, mapply and modal_magic's
``local`` and ``threads`` backends, all from one process on one machine, so the ratios between rows
of the table mean something even where the absolute seconds are noisy. Each cell is the best of
``--reps`` timed calls after one warm-up call, and a workload's cells are timed in interleaved
rounds, so that load from elsewhere on the machine spreads over all of them. Every cell's results
are checked against ``Series.apply``'s once, outside the timing. The run ends with one PASS/FAIL
line per target; the exit code is 0 whatever they say (this is a report), and 2 when the
interpreter is not the benchmark's environment (pandas 2.3, where pandarallel and mapply work; see
``bench/README.md``)::

    .venv-bench/bin/python bench/local.py            # everything, a few minutes
    .venv-bench/bin/python bench/local.py --quick    # smaller inputs, 2 repetitions
    .venv-bench/bin/python bench/local.py --only W1,W3

Three workloads at scale measure modal_magic against ``Series.apply`` and ``multiprocessing``
only, so they run in any environment with modal_magic (no peers needed), and each can run alone:

* **W5** 1,000,000 rows of a ~10 µs regex, default options: within 10% of ideal (``Series.apply`` /
  cores), printed beside ``multiprocessing.Pool.map`` with a chunksize; and issue 13's cache
  targets: the default options' first run (an empty cache) within 10% of ``cache=False`` (the
  median of the rounds' ratios), a fully cached re-run under 15% of the first run.
* **W6** 10,000,000 rows of a trivial function, default options: no slower than ``Series.apply``
  and a peak RSS at most 1.5x its own; each side runs once in a fresh subprocess (peak RSS is a
  process's lifetime high-water mark).
* **SOAK** 20 consecutive 5,000,000-row maps of 100-character strings in one process: every one
  finishes, none slower than 2x the median, RSS flat (the last within 10% of the second). The maps
  run with ``cache=False``, so every one goes through the worker pool (with the cache on, the same
  frame mapped again is read back from the cache and never reaches the pool); ``--soak-cache``
  soaks the default options instead: one computed map, then cached re-runs.

::

    .venv/bin/python bench/local.py --only W5
    .venv/bin/python bench/local.py --only W6,SOAK
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import math
import os
import tempfile
import platform
import random
import re
import statistics
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
# This folder also holds modal.py and llm.py: keep it off the path so `import modal` finds the client.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
REQUIREMENTS = HERE / "requirements-peers.txt"
#: packages whose absence means "this is not the benchmark's environment"
PEERS = ("pandarallel", "mapply", "joblib")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

#: W2: how long one row's CPU work should take
CPU_ROW_S = 0.005
#: W3: rows in flight at once, and each row's wait
IO_CONCURRENCY = 64
IO_SLEEP_S = 0.05
#: W4: characters per row
TEXT_ROW_CHARS = 10 * 1024

#: W5: rows, and characters per row of the regex's input
W5_ROWS = 1_000_000
W5_CHARS = 220
#: W6 and the soak: rows
W6_ROWS = 10_000_000
SOAK_ROWS = 5_000_000
SOAK_RUNS = 20
SOAK_CHARS = 100

#: limits on modal_magic's time over the reference time
W2_LIMIT = 1.10  # x ideal (Series.apply / cores)
W5_LIMIT = 1.10  # x ideal (Series.apply / cores)
W5_CACHE_LIMIT = 1.10  # the default options' first run (the cache keying and storing every row) x cache=False
W5_RERUN_LIMIT = 0.15  # a fully cached re-run x the first run
W6_TIME_LIMIT = 1.0  # x Series.apply
W6_MEMORY_LIMIT = 1.5  # x Series.apply's peak RSS
SOAK_SLOWEST = 2.0  # x the median run
SOAK_RSS_GROWTH = 1.10  # last run's RSS over the second's
W3_LIMIT = 1.15  # x ideal (ceil(rows / 64) x 50 ms)
BAR_LIMIT = 1.03  # progress=True over progress=False


# --- the environment -------------------------------------------------------------------------------


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_environment() -> list[str]:
    """What makes this interpreter unfit for the benchmark (empty in the bench environment)."""
    problems = []
    pandas_version = _installed("pandas")
    if pandas_version is None:
        problems.append("pandas is not installed")
    elif int(pandas_version.split(".")[0]) >= 3:
        problems.append(f"pandas is {pandas_version}; pandarallel and mapply need pandas 2.3")
    missing = [name for name in PEERS if _installed(name) is None]
    if missing:
        problems.append("not installed: " + ", ".join(missing))
    if _installed("modal_magic") is None:
        problems.append("modal_magic is not installed")
    return problems


def how_to_run(problems: list[str]) -> str:
    return "\n".join([
        f"bench/local.py runs in its own environment, and {sys.executable} is not it:",
        *(f"  - {p}" for p in problems),
        "",
        "Create it once (pandas 2.3.3 and the peers, pinned in bench/requirements-peers.txt),",
        "then run the benchmark with its interpreter, from the repository root:",
        "",
        f"  cd {HERE.parent}",
        "  python3 -m venv .venv-bench",
        "  .venv-bench/bin/pip install --no-deps -r bench/requirements-peers.txt",
        "  .venv-bench/bin/pip install --no-deps -e .",
        "  .venv-bench/bin/python bench/local.py [--quick] [--only W1,W3]",
    ])


def version_drift() -> list[str]:
    """Key packages whose installed version differs from its pin (the run still goes ahead)."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return [f"{name} {_installed(name)} (pinned {pins[name]})"
            for name in ("pandas", "numpy", "pandarallel", "mapply", "joblib", "cloudpickle")
            if name in pins and _installed(name) != pins[name]]


# --- the functions mapped over the rows ------------------------------------------------------------
# Module level, so every tool can ship them (by reference under fork, by value with cloudpickle).


def double_plus_one(x: int) -> int:
    """W1: as little work as a row can have."""
    return x * 2 + 1


def spin(n: int) -> int:
    """W2: ``n`` rounds of pure-Python arithmetic (``n`` is calibrated to about 5 ms)."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


def sleep_50ms(x: int) -> int:
    """W3: blocking I/O, played by a sleep."""
    time.sleep(IO_SLEEP_S)
    return x


async def sleep_50ms_async(x: int) -> int:
    """W3: the same wait, awaited."""
    await asyncio.sleep(IO_SLEEP_S)
    return x


def word_count(text: str) -> int:
    """W4: a 10 KB string in, an int out; allocation-heavy."""
    return len(text.split())


_EMAILS = re.compile(r"\b[a-z]+@[a-z]+\.(?:com|org|net)\b")


def count_emails(text: str) -> int:
    """W5: a regex over a short string, about 10 µs."""
    return len(_EMAILS.findall(text))


def make_short_texts(rows: int, chars: int, seed: int = 5) -> list[str]:
    """``rows`` distinct random strings of ``chars`` characters (letters, spaces, ``@`` and dots)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz @."
    text = "".join(rng.choices(alphabet, k=max(chars * 2, 2_000_000)))
    span = len(text) - chars
    return [text[start : start + chars] for start in (rng.randrange(span) for _ in range(rows))]


def calibrate_spin(target_s: float = CPU_ROW_S) -> int:
    """The ``n`` that makes ``spin(n)`` take ``target_s`` in this process (best of 5, refined 3 times)."""
    n = 20_000
    for _ in range(3):
        fastest = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            spin(n)
            fastest = min(fastest, time.perf_counter() - started)
        n = max(1, int(n * target_s / fastest))
    return n


def make_texts(rows: int, chars: int = TEXT_ROW_CHARS, seed: int = 4) -> list[str]:
    """``rows`` distinct strings of ``chars`` characters of pseudo-words: slices of one long text.

    Distinct objects matter: pickle sends an object repeated within one payload only once, which
    would flatter every process-based tool.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(5_000)]
    text = " ".join(rng.choices(vocabulary, k=400_000))  # about 2.6 MB
    span = len(text) - chars
    return [text[start : start + chars] for start in (rng.randrange(span) for _ in range(rows))]


# --- the ways of running a workload: frame -> results ---------------------------------------------


class _TerminalSink(io.TextIOBase):
    """Swallows text but says it's a terminal, so the text bar redraws as often as it would live."""

    def isatty(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def series_apply(fn: Callable) -> Callable:
    return lambda df: df["x"].apply(fn)


def pool_map(fn: Callable) -> Callable:
    """What one writes in a cell: a Pool for the call, chunks of n / (4 x cores) rows."""

    def run(df):
        import multiprocessing

        import pandas as pd

        values = df["x"].tolist()
        with multiprocessing.Pool(CORES) as pool:
            out = pool.map(fn, values, chunksize=max(1, len(values) // (4 * CORES)))
        return pd.Series(out, index=df.index)

    return run


def joblib_parallel(fn: Callable, **parallel: Any) -> Callable:
    def run(df):
        import pandas as pd
        from joblib import Parallel, delayed

        out = Parallel(**parallel)(delayed(fn)(x) for x in df["x"])
        return pd.Series(out, index=df.index)

    return run


_pandarallel_ready = False


def pandarallel_apply(fn: Callable) -> Callable:
    def run(df):
        global _pandarallel_ready
        from pandarallel import pandarallel

        if not _pandarallel_ready:
            pandarallel.initialize(nb_workers=CORES, progress_bar=False, verbose=0)
            _pandarallel_ready = True
        return df["x"].parallel_apply(fn)

    return run


def mapply_apply(fn: Callable) -> Callable:
    def run(df):
        from mapply.mapply import mapply

        return mapply(df["x"], fn, n_workers=CORES, progressbar=False)

    return run


def executor_map(fn: Callable, workers: int) -> Callable:
    def run(df):
        import pandas as pd

        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(fn, df["x"]))
        return pd.Series(out, index=df.index)

    return run


def modal_magic_map(fn: Callable, **options: Any) -> Callable:
    """``df.modal.map`` without a bar, or with the text bar drawn to a terminal that discards it."""
    bar = options.setdefault("progress", False)

    def run(df):
        import modal_magic  # noqa: F401  (registers df.modal)

        stderr = sys.stderr
        if bar:  # the bar does all its work, without interleaving with the table
            sys.stderr = _TerminalSink()
        try:
            return df.modal.map(fn, column="x", **{"cache": False, **options})
        finally:
            sys.stderr = stderr

    return run


def cache_cells(fn: Callable) -> list[Cell]:
    """modal_magic local with the result cache: a first run (everything computed and stored), and a
    re-run where every row comes from the cache (filled once, untimed, before the first timing)."""
    filled: list[bool] = []

    def fill_once(frame_holder: list[Any]) -> None:
        if not filled:
            modal_magic_map(fn, backend="local", cache="refresh")(frame_holder[0])
            filled.append(True)

    holder: list[Any] = []
    hit = Cell("mm_cache_hit", "modal_magic local, cache: re-run, every row cached",
               modal_magic_map(fn, backend="local", cache=True), before=lambda: fill_once(holder))
    hit.frame_holder = holder  # type: ignore[attr-defined]
    return [
        Cell("mm_cache_first", "modal_magic local, cache: first run (compute + store)",
             modal_magic_map(fn, backend="local", cache="refresh")),
        hit,
    ]


def fresh_cache_dir() -> None:
    """Point the result cache at a new, empty directory (untimed, before a call that must compute every row)."""
    os.environ["MODAL_MAGIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="modal-magic-bench-cache-")


def stop_local_workers() -> None:
    import modal_magic

    modal_magic.shutdown()


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One row of the table: a way of running the workload, and what it measured."""

    key: str
    label: str
    run: Callable[[Any], Any] | None  # None: a computed reference (the ideal), not run
    before: Callable[[], None] | None = None  # untimed, before each call
    times: list[float] = field(default_factory=list)
    error: str | None = None
    fixed_s: float | None = None  # a computed reference's time
    note: str = ""

    @property
    def best(self) -> float | None:
        if self.fixed_s is not None:
            return self.fixed_s
        return min(self.times) if self.times and self.error is None else None


@dataclass
class Target:
    """One target: modal_magic's time over a reference time, at most ``limit``."""

    workload: str
    cell: str  # the key of the cell it judges
    text: str
    ratio: float | None  # None: not measured (an error), which fails
    limit: float
    against: str  # what the ratio divides by, in a few words
    detail: str

    @property
    def verdict(self) -> str:
        return "PASS" if self.ratio is not None and self.ratio <= self.limit else "FAIL"


@dataclass
class Workload:
    key: str
    title: str
    frame: Any
    cells: list[Cell]
    baseline: str  # the key of the cell the ratio column divides by
    warmup_rows: int
    expected: list[Any] | None = None  # None: Series.apply's results, once it has run
    cold: Cell | None = None
    targets: list[Target] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average when it started and ended
    #: more rounds for a workload whose calls take milliseconds: a 3% target there is under a
    #: millisecond, inside one scheduler hiccup, and only a best of many separates it from noise
    rep_factor: int = 1

    def cell(self, key: str) -> Cell:
        return next(c for c in self.cells if c.key == key)


class CellTimeout(Exception):
    """A call ran past --cell-timeout (raised from SIGALRM in the main thread)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CellTimeout("took longer than --cell-timeout")


def _call(cell: Cell, frame: Any, limit_s: float) -> tuple[float, Any]:
    gc.collect()
    if cell.before is not None:
        cell.before()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)  # a hung peer becomes an error in its cell
    try:
        started = time.perf_counter()
        out = cell.run(frame)  # type: ignore[misc]
        return time.perf_counter() - started, out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _short(error: BaseException) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 110 else text[:107] + "..."


def _values(out: Any) -> list[Any]:
    """The results as a list, from a Series or from modal_magic's frame (whose error column must be empty)."""
    import pandas as pd

    if isinstance(out, pd.DataFrame):  # x, <function name>, <function name>_error
        name = next(c for c in out.columns if c != "x" and not c.endswith("_error"))
        failed = out[f"{name}_error"].notna()
        if failed.any():
            raise AssertionError(f"{int(failed.sum())} rows failed, e.g. {out.loc[failed, f'{name}_error'].iloc[0]}")
        out = out[name]
    return list(out)


def _check(work: Workload, out: Any) -> None:
    values = _values(out)
    if work.expected is None:
        work.expected = values
    elif values != work.expected:
        differ = sum(a != b for a, b in zip(values, work.expected)) + abs(len(values) - len(work.expected))
        raise AssertionError(f"wrong results: {differ} of {len(work.expected)} rows differ from Series.apply's")


def measure(work: Workload, reps: int, limit_s: float, log: Callable[..., None]) -> None:
    """Warm each cell up once, time ``reps`` interleaved rounds, then the cold starts; check results once."""
    runnable = [c for c in work.cells if c.run is not None]
    log(f"{work.key}: warm-up")
    warm_frame = work.frame.iloc[: work.warmup_rows]
    for cell in runnable:
        log(f"{work.key}: warm-up, {cell.label}", detail=True)
        try:
            _call(cell, warm_frame, limit_s)
        except Exception as e:  # a tool that can't run gets its error in its cell; the table goes on
            cell.error = _short(e)
    for rep in range(reps):
        log(f"{work.key}: round {rep + 1}/{reps}")
        # every other round runs backwards, so no cell always follows the same one (and its teardown)
        for cell in runnable if rep % 2 == 0 else runnable[::-1]:
            if cell.error is None:
                log(f"{work.key}: round {rep + 1}/{reps}, {cell.label}", detail=True)
                _timed_call(work, cell, limit_s, check=rep == 0)
    if work.cold is not None:
        log(f"{work.key}: cold starts")
        for rep in range(reps):
            if work.cold.error is None:
                _timed_call(work, work.cold, limit_s, check=rep == 0)


def _timed_call(work: Workload, cell: Cell, limit_s: float, *, check: bool) -> None:
    try:
        elapsed, out = _call(cell, work.frame, limit_s)
        if check:
            _check(work, out)
    except Exception as e:
        cell.error = _short(e)
        return
    cell.times.append(elapsed)


# --- the workloads ---------------------------------------------------------------------------------


def cpu_cells(fn: Callable, *, bar: bool) -> list[Cell]:
    """Series.apply, the process-based peers and modal_magic, for a function of one column."""
    cells = [
        Cell("apply", "Series.apply", series_apply(fn)),
        Cell("pool", "multiprocessing.Pool.map, chunksize=n/(4*cores)", pool_map(fn)),
        Cell("joblib", f"joblib Parallel(n_jobs={CORES}, batch_size='auto')",
             joblib_parallel(fn, n_jobs=CORES, batch_size="auto")),
        Cell("pandarallel", f"pandarallel parallel_apply, nb_workers={CORES}", pandarallel_apply(fn)),
        Cell("mapply", f"mapply, n_workers={CORES}", mapply_apply(fn)),
        Cell("mm_local", "modal_magic local", modal_magic_map(fn, backend="local")),
    ]
    if bar:
        cells.append(Cell("mm_local_bar", "modal_magic local, progress=True",
                          modal_magic_map(fn, backend="local", progress=True)))
    cells.append(Cell("mm_threads", "modal_magic threads", modal_magic_map(fn, backend="threads")))
    return cells


def cold_cell(fn: Callable) -> Cell:
    return Cell("mm_cold", "modal_magic local, cold: 1st call after shutdown()",
                modal_magic_map(fn, backend="local"), before=stop_local_workers)


def build(key: str, quick: bool, log: Callable[..., None]) -> Workload:
    import pandas as pd

    if key == "W1":
        n = 20_000 if quick else 200_000
        frame = pd.DataFrame({"x": range(n)})
        cells = cpu_cells(double_plus_one, bar=True) + cache_cells(double_plus_one)
        cells[-1].frame_holder.append(frame)  # type: ignore[attr-defined]
        return Workload("W1", f"{n:,} tiny rows: x * 2 + 1 (ints)", frame,
                        cells, baseline="apply", warmup_rows=n,
                        cold=cold_cell(double_plus_one), rep_factor=5)
    if key == "W2":
        n = 400 if quick else 2_000
        log("W2: calibrating the 5 ms loop")
        loops = calibrate_spin()
        frame = pd.DataFrame({"x": [loops] * n})
        cells = cpu_cells(spin, bar=True) + cache_cells(spin)
        cells[-1].frame_holder.append(frame)  # type: ignore[attr-defined]
        cells.insert(1, Cell("ideal", f"ideal: Series.apply / {CORES} cores", None))
        return Workload("W2", f"{n:,} rows of ~5 ms pure-Python CPU work: spin({loops:,})",
                        frame, cells, baseline="ideal",
                        warmup_rows=max(2 * CORES, n // 10), cold=cold_cell(spin))
    if key == "W3":
        n = 1_000
        ideal = math.ceil(n / IO_CONCURRENCY) * IO_SLEEP_S
        cells = [
            Cell("ideal", f"ideal: ceil({n:,}/{IO_CONCURRENCY}) x {IO_SLEEP_S * 1000:g} ms", None, fixed_s=ideal,
                 note=f"(Series.apply would take {n * IO_SLEEP_S:g} s; not run)"),
            Cell("executor", f"ThreadPoolExecutor({IO_CONCURRENCY}).map", executor_map(sleep_50ms, IO_CONCURRENCY)),
            Cell("joblib", f"joblib Parallel(n_jobs={IO_CONCURRENCY}, backend='threading')",
                 joblib_parallel(sleep_50ms, n_jobs=IO_CONCURRENCY, backend="threading")),
            Cell("mm_threads", f"modal_magic threads, max_containers={IO_CONCURRENCY}",
                 modal_magic_map(sleep_50ms, backend="threads", max_containers=IO_CONCURRENCY)),
            Cell("mm_async", f"modal_magic async def, max_containers={IO_CONCURRENCY}",
                 modal_magic_map(sleep_50ms_async, max_containers=IO_CONCURRENCY)),
        ]
        return Workload("W3", f"{n:,} rows of a {IO_SLEEP_S * 1000:g} ms sleep (I/O), {IO_CONCURRENCY} at once",
                        pd.DataFrame({"x": range(n)}), cells, baseline="ideal",
                        warmup_rows=2 * IO_CONCURRENCY, expected=list(range(n)))
    if key == "W4":
        n = 4_000 if quick else 20_000
        log(f"W4: making {n:,} strings of {TEXT_ROW_CHARS:,} characters")
        return Workload("W4", f"{n:,} rows of 10 KB strings: len(s.split())", pd.DataFrame({"x": make_texts(n)}),
                        cpu_cells(word_count, bar=False), baseline="apply", warmup_rows=n // 10,
                        cold=cold_cell(word_count))
    if key == "W5":
        n = W5_ROWS // 10 if quick else W5_ROWS
        log(f"W5: making {n:,} strings of {W5_CHARS} characters")
        cells = [
            Cell("apply", "Series.apply", series_apply(count_emails)),
            Cell("ideal", f"ideal: Series.apply / {CORES} cores", None),
            Cell("pool", "multiprocessing.Pool.map, chunksize=n/(4*cores)", pool_map(count_emails)),
            # each call starts from an empty cache: with default options a re-run would read every row back
            Cell("mm_local", "modal_magic local, default options (empty cache)",
                 modal_magic_map(count_emails, cache=True), before=fresh_cache_dir),
            # right after it (or, in a backwards round, with the last round's cache): every row cached
            Cell("mm_rerun", "modal_magic local, default options, re-run (cached)",
                 modal_magic_map(count_emails, cache=True)),
            Cell("mm_nocache", "modal_magic local, cache=False", modal_magic_map(count_emails)),
        ]
        return Workload("W5", f"{n:,} rows of a ~10 µs regex: len(re.findall(...))",
                        pd.DataFrame({"x": make_short_texts(n, W5_CHARS)}), cells, baseline="ideal",
                        warmup_rows=n // 20)
    raise ValueError(f"no workload {key!r}")


PEER_KEYS = ("pool", "joblib", "pandarallel", "mapply")
#: every workload --only knows, in the order they run; the first four compare with the peers
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "SOAK")
PEER_WORKLOADS = ("W1", "W2", "W3", "W4")


def judge(work: Workload) -> None:
    """Work out the workload's targets from its measured cells."""
    mm = work.cell("mm_local").best if work.key != "W3" else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def fastest_of(keys: tuple[str, ...]) -> tuple[Cell | None, str]:
        measured = [work.cell(k) for k in keys if work.cell(k).best is not None]
        failed = [k for k in keys if work.cell(k).best is None]
        skipped = f"; not compared (failed): {', '.join(failed)}" if failed else ""
        return (min(measured, key=lambda c: c.best) if measured else None), skipped  # type: ignore[arg-type, return-value]

    if work.key in ("W1", "W4"):
        keys = ("apply", *PEER_KEYS) if work.key == "W1" else PEER_KEYS
        rival, skipped = fastest_of(keys)
        rival_s = rival.best if rival else None
        text = ("modal_magic local no slower than Series.apply and every peer" if work.key == "W1"
                else "modal_magic local no slower than the fastest peer")
        work.targets.append(Target(work.key, "mm_local", text, ratio(mm, rival_s), 1.0,
                                   "vs fastest of apply+peers" if work.key == "W1" else "vs fastest peer",
                                   f"{_s(mm)} vs {rival.label if rival else '-'} {_s(rival_s)}{skipped}"))
    if work.key == "W2":
        apply_s = work.cell("apply").best
        ideal = work.cell("ideal")
        ideal.fixed_s = apply_s / CORES if apply_s else None
        work.targets.append(Target("W2", "mm_local", f"modal_magic local within {W2_LIMIT - 1:.0%} of ideal",
                                   ratio(mm, ideal.fixed_s), W2_LIMIT, "vs ideal",
                                   f"{_s(mm)} vs ideal {_s(ideal.fixed_s)} = Series.apply {_s(apply_s)} / {CORES}"))
    if work.key == "W5":
        apply_s = work.cell("apply").best
        ideal = work.cell("ideal")
        ideal.fixed_s = apply_s / CORES if apply_s else None
        pool_s = work.cell("pool").best
        work.targets.append(Target("W5", "mm_local", f"modal_magic local within {W5_LIMIT - 1:.0%} of ideal",
                                   ratio(mm, ideal.fixed_s), W5_LIMIT, "vs ideal",
                                   f"{_s(mm)} vs ideal {_s(ideal.fixed_s)}; Pool.map {_s(pool_s)}"))
        # Issue 13's targets. The first run's cost is judged on each round's pair (the two calls of a
        # round run close together), the median of them: a lucky round of one cell moves the bests.
        local, nocache, rerun = work.cell("mm_local"), work.cell("mm_nocache"), work.cell("mm_rerun")
        pairs = [a / b for a, b in zip(local.times, nocache.times)] if local.error is None and nocache.error is None else []
        work.targets.append(Target("W5", "mm_local", "the cache's first run within "
                                   f"{W5_CACHE_LIMIT - 1:.0%} of cache=False (median of the rounds' ratios)",
                                   statistics.median(pairs) if pairs else None, W5_CACHE_LIMIT, "vs cache=False",
                                   "rounds: " + ", ".join(f"{p:.3f}" for p in pairs)))
        work.targets.append(Target("W5", "mm_rerun", f"a fully cached re-run under {W5_RERUN_LIMIT:.0%} of the "
                                   "first run", ratio(rerun.best, mm), W5_RERUN_LIMIT, "vs first run",
                                   f"cached re-run {_s(rerun.best)} vs first run {_s(mm)}"))
    if work.key == "W3":
        ideal_s = work.cell("ideal").best
        for key in ("mm_threads", "mm_async"):
            cell = work.cell(key)
            work.targets.append(Target("W3", key, f"{cell.label} within {W3_LIMIT - 1:.0%} of ideal",
                                       ratio(cell.best, ideal_s), W3_LIMIT, "vs ideal",
                                       f"{_s(cell.best)} vs ideal {_s(ideal_s)}"))
    if any(c.key == "mm_cache_first" for c in work.cells):
        first, hit = work.cell("mm_cache_first").best, work.cell("mm_cache_hit").best
        if work.key == "W1":
            work.targets.append(Target("W1", "mm_cache_first", "the cache's cost on a first run is no more "
                                       "than the uncached time again", ratio(first, mm), 2.0, "vs cache=False",
                                       f"cache first run {_s(first)} vs cache=False {_s(mm)}"))
        else:
            work.targets.append(Target(work.key, "mm_cache_first", "the cache costs under 3% on a first run",
                                       ratio(first, mm), 1.03, "vs cache=False",
                                       f"cache first run {_s(first)} vs cache=False {_s(mm)}"))
            work.targets.append(Target(work.key, "mm_cache_hit", "a fully cached re-run takes under 5% of the "
                                       "first run", ratio(hit, first), 0.05, "vs first run",
                                       f"cached re-run {_s(hit)} vs first run {_s(first)}"))
    if any(c.key == "mm_local_bar" for c in work.cells):
        bar = work.cell("mm_local_bar").best
        work.targets.append(Target(work.key, "mm_local_bar", f"progress bar costs under {BAR_LIMIT - 1:.0%}",
                                   ratio(bar, mm), BAR_LIMIT, "vs progress=False",
                                   f"progress=True {_s(bar)} vs progress=False {_s(mm)}"))


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


# --- W6 and the soak: fresh processes, peak memory ---------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def w6_cell(which: str, rows: int) -> dict[str, Any]:
    """One W6 side in this (fresh) process: build the frame, time one call, report the peak RSS."""
    import pandas as pd

    import modal_magic  # noqa: F401  (registers df.modal)

    frame = pd.DataFrame({"x": range(rows)})
    gc.collect()
    before = _rss_mb()
    started = time.perf_counter()
    if which == "apply":
        out = frame["x"].apply(double_plus_one)
        values = out
    else:
        options = {"cache": False} if which == "mm_nocache" else {}
        out = frame.modal.map(double_plus_one, column="x", progress=False, **options)
        assert out["double_plus_one_error"].isna().all()
        values = out["double_plus_one"]
    elapsed = time.perf_counter() - started
    assert values.iloc[-1] == 2 * (rows - 1) + 1
    modal_magic.shutdown()  # the workers' high-water mark is known once they have exited
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": elapsed, "peak_mb": _peak_rss_mb(), "frame_mb": before, "workers_peak_mb": workers}


def _fresh(which: str, rows: int, limit_s: float) -> dict[str, Any]:
    import json

    # run as a script, as a user's code is: its functions then travel to the workers by value
    command = [sys.executable, str(Path(__file__).resolve()), "--w6-cell", which, "--w6-rows", str(rows)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {limit_s:g} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:110]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_w6(quick: bool, limit_s: float, log: Callable[..., None]) -> tuple[list[str], list[Target]]:
    rows = W6_ROWS // 10 if quick else W6_ROWS
    sides = {"apply": "Series.apply", "mm": "modal_magic local, default options",
             "mm_nocache": "modal_magic local, cache=False"}
    measured = {}
    for key in sides:
        log(f"W6: {sides[key]} in a fresh process")
        measured[key] = _fresh(key, rows, limit_s)
    lines = [f"W6  {rows:,} rows of a trivial function (x * 2 + 1), one call each in a fresh process"]
    apply = measured["apply"]
    for key, label in sides.items():
        m = measured[key]
        if "error" in m:
            lines.append(f"  {label:<{NAME_W - 2}}    ERROR  {m['error']}")
            continue
        ratio_s = f"{m['seconds'] / apply['seconds']:6.2f}x" if "seconds" in apply else "      -"
        lines.append(f"  {label:<{NAME_W - 2}} {m['seconds']:8.3f} {ratio_s}  peak RSS {m['peak_mb']:,.0f} MB "
                     f"(frame alone {m['frame_mb']:,.0f} MB; workers' peak {m['workers_peak_mb']:,.0f} MB)")
    mm = measured["mm"]
    ok = "error" not in mm and "error" not in apply
    targets = [
        Target("W6", "mm", "modal_magic local (defaults) no slower than Series.apply",
               mm["seconds"] / apply["seconds"] if ok else None, W6_TIME_LIMIT, "vs Series.apply",
               f"{_s(mm.get('seconds'))} vs {_s(apply.get('seconds'))}"),
        Target("W6", "mm", f"modal_magic local (defaults) peak RSS at most {W6_MEMORY_LIMIT:g}x Series.apply's",
               mm["peak_mb"] / apply["peak_mb"] if ok else None, W6_MEMORY_LIMIT, "vs Series.apply",
               f"{mm.get('peak_mb', 0):,.0f} MB vs {apply.get('peak_mb', 0):,.0f} MB"),
    ]
    return lines, targets


def word_count_short(text: str) -> int:
    """The soak's row: a 100-character string in, its word count out."""
    return len(text.split())


def run_soak(quick: bool, limit_s: float, log: Callable[..., None], *, cache: bool = False
             ) -> tuple[list[str], list[Target]]:
    import pandas as pd

    import modal_magic  # noqa: F401  (registers df.modal)

    rows, runs = (SOAK_ROWS // 10, 5) if quick else (SOAK_ROWS, SOAK_RUNS)
    log(f"SOAK: making {rows:,} strings of {SOAK_CHARS} characters")
    frame = pd.DataFrame({"x": make_short_texts(rows, SOAK_CHARS, seed=6)})
    times: list[float] = []
    rss: list[float] = []
    error = None
    for i in range(runs):
        log(f"SOAK: map {i + 1}/{runs}")
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit_s)
        try:
            started = time.perf_counter()
            out = frame.modal.map(word_count_short, column="x", progress=False, cache=cache)
            times.append(time.perf_counter() - started)
            failed = int(out["word_count_short_error"].notna().sum())
            if failed:
                raise AssertionError(f"{failed} rows failed")
        except Exception as e:  # a hang or a failure ends the soak: it is the finding
            error = f"map {i + 1}: {_short(e)}"
            break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        del out
        gc.collect()
        rss.append(_rss_mb())
    median = sorted(times)[len(times) // 2] if times else None
    lines = [f"SOAK  {runs} consecutive maps of {rows:,} rows of {SOAK_CHARS}-character strings: len(s.split()), "
             f"{'default options (cache on: re-runs read the cache)' if cache else 'cache=False'}",
             "  seconds: " + " ".join(f"{t:.2f}" for t in times),
             "  RSS after each (MB): " + " ".join(f"{r:,.0f}" for r in rss)]
    if error:
        lines.append(f"  ERROR  {error}")
    targets = [
        Target("SOAK", "soak", f"every one of {runs} maps finishes", 1.0 if not error and len(times) == runs else None,
               1.0, "finished", f"{len(times)} of {runs}"),
        Target("SOAK", "soak", f"none slower than {SOAK_SLOWEST:g}x the median",
               max(times) / median if median and not error else None, SOAK_SLOWEST, "vs median",
               f"slowest {_s(max(times) if times else None)} vs median {_s(median)}"),
        Target("SOAK", "soak", f"RSS flat (last within {SOAK_RSS_GROWTH - 1:.0%} of the second)",
               rss[-1] / rss[1] if len(rss) > 1 and not error else None, SOAK_RSS_GROWTH, "vs 2nd map",
               f"{rss[-1] if rss else 0:,.0f} MB vs {rss[1] if len(rss) > 1 else 0:,.0f} MB"),
    ]
    return lines, targets


# --- the table -------------------------------------------------------------------------------------

NAME_W = 58
#: a workload whose repetitions of one cell (of 0.2 s or more) differ by more than this gets a warning
NOISY = 0.25


def columns_line(reps: int) -> str:
    return f"{'workload / implementation':<{NAME_W}} {'best s':>8} {'ratio':>7}  {'each rep (s)':<{6 * reps + 2}} target"


def render(work: Workload, reps: int) -> list[str]:
    base = work.cell(work.baseline)
    targets = {t.cell: t for t in work.targets}
    warm = work.cell("mm_local").best if work.cold else None
    lines = [f"{work.key}  {work.title}   [ratio: time / {base.label.split(':')[0]}]"]
    for cell in [*work.cells, *([work.cold] if work.cold else [])]:
        name = f"  {cell.label}"
        if cell.error is not None:
            lines.append(f"{name:<{NAME_W}}    ERROR  {cell.error}")
            continue
        best = cell.best
        best_text = "-" if best is None else f"{best:.3f}"
        ratio = f"{best / base.best:6.2f}x" if best is not None and base.best else "      -"
        shown = cell.times if len(cell.times) <= 5 else sorted(cell.times)[:5]
        each = " ".join(f"{t:.3f}" for t in shown) if cell.times else "(computed)"
        if len(cell.times) > 5:
            each = f"{each} (5 best of {len(cell.times)})"
        target = targets.get(cell.key)
        remark = cell.note
        if target is not None:
            shown = "-" if target.ratio is None else f"{target.ratio:.3f}"
            remark = f"{target.verdict} {shown} {target.against} (limit {target.limit:.2f})"
        elif cell is work.cold and best is not None and warm is not None:
            remark = f"+{best - warm:.3f} s over a warm call"
        lines.append(f"{name:<{NAME_W}} {best_text:>8} {ratio}  {each:<{6 * reps + 2}} {remark}".rstrip())
    spread = max((max(c.times) / min(c.times) - 1 for c in work.cells if len(c.times) > 1 and min(c.times) >= 0.2),
                 default=0.0)
    if spread > NOISY:
        lines.append(f"  ! noisy: the repetitions of one cell differ by up to {spread:.0%} (1-min load average "
                     f"{work.load[0]:.1f} -> {work.load[1]:.1f} on {CORES} cores): the machine was busy at times; "
                     "if the ratios look off, rerun when it is quiet")
    return lines


def header(quick: bool, reps: int) -> list[str]:
    import pandas as pd

    versions = ", ".join(f"{n} {_installed(n)}" for n in ("pandarallel", "mapply", "joblib", "modal_magic"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"modal_magic local benchmark: {CORES} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, pandas {pd.__version__}, {versions}",
        f"wall seconds, best of {reps} after 1 warm-up, cells interleaved round by round"
        f"{', --quick' if quick else ''}; ratio < 1 is faster; load average at start: {load}",
    ]
    drift = version_drift()
    if drift:
        lines.append("not the pinned versions: " + ", ".join(drift))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="modal_magic's local backends against Series.apply, "
                                     "multiprocessing, joblib, pandarallel and mapply.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs (W1 20k rows, W2 400, W4 4k) and 2 repetitions")
    parser.add_argument("--only", default=",".join(ALL_WORKLOADS),
                        help="workloads to run, e.g. W1,W3 or W5 or SOAK (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default 3; 2 with --quick)")
    parser.add_argument("--cell-timeout", type=float, default=300.0,
                        help="seconds one call may take before its cell shows an error (default 300)")
    parser.add_argument("--soak-cache", action="store_true",
                        help="soak with the default options (the cache on) instead of cache=False")
    parser.add_argument("--w6-cell", choices=("apply", "mm", "mm_nocache"), help=argparse.SUPPRESS)
    parser.add_argument("--w6-rows", type=int, default=W6_ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.w6_cell:  # one side of W6, in the fresh process run_w6 started
        import json

        print(json.dumps(w6_cell(args.w6_cell, args.w6_rows)))
        return 0

    wanted = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    selected = [w for w in ALL_WORKLOADS if w in wanted]
    if not selected or wanted - set(ALL_WORKLOADS):
        parser.error(f"--only takes {', '.join(ALL_WORKLOADS)} separated by commas, not {args.only!r}")
    problems = check_environment()
    if problems and any(w in PEER_WORKLOADS for w in selected):  # W5, W6 and the soak need no peers
        print(how_to_run(problems), file=sys.stderr)
        return 2
    reps = args.reps or (2 if args.quick else 3)
    if reps < 1:
        parser.error("--reps must be at least 1")
    # The cache rows start from an empty cache of their own, and leave the user's alone.
    os.environ["MODAL_MAGIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="modal-magic-bench-cache-")

    tty = sys.stderr.isatty()

    def log(message: str, detail: bool = False) -> None:
        """Where the run is, on stderr: every step on a terminal (one line, redrawn), phases in a log."""
        if tty:
            sys.stderr.write(f"\r\033[K  ... {message}")
            sys.stderr.flush()
        elif not detail:
            print(f"  ... {message}", file=sys.stderr, flush=True)

    rule = "-" * (NAME_W + 62 + 6 * reps)
    print("\n".join([*header(args.quick, reps), rule, columns_line(reps)]), flush=True)
    workloads = []
    extra_targets: list[Target] = []
    for key in selected:
        if key in ("W6", "SOAK"):
            if key == "W6":
                lines, targets = run_w6(args.quick, args.cell_timeout, log)
            else:
                lines, targets = run_soak(args.quick, args.cell_timeout, log, cache=args.soak_cache)
            extra_targets.extend(targets)
            if tty:
                sys.stderr.write("\r\033[K")
            print("\n".join([rule, *lines]), flush=True)
            continue
        work = build(key, args.quick, log)
        load_before = os.getloadavg()[0]
        measure(work, reps * work.rep_factor, args.cell_timeout, log)
        work.load = (load_before, os.getloadavg()[0])
        judge(work)
        work.frame = None  # W4's strings are 200 MB
        workloads.append(work)
        if tty:
            sys.stderr.write("\r\033[K")
        print("\n".join([rule, *render(work, reps)]), flush=True)
    stop_local_workers()
    print(rule)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\nTARGETS")
    for target in [*(t for work in workloads for t in work.targets), *extra_targets]:
        shown = "-" if target.ratio is None else f"{target.ratio:.3f}"
        print(f"{target.verdict}  {target.workload}  {target.text}: {shown} (limit {target.limit:.2f}); "
              f"{target.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
