"""An estimate before the big run: time a sample of rows, project the whole frame's wall time and dollars.

:func:`estimate_frame` (``df.modal.estimate``, ``series.modal.estimate``, ``%%modal_map ... --estimate``)
runs ``sample`` rows spread evenly over the frame (not just the head, which is often unlike the
rest) with the options of the real run and ``timings=True``, through the ordinary engine: the
sample's results are cached like any map's, so the real run doesn't pay for them again. The
:class:`Estimate` it returns shows the per-row time (median and the p10–p90 spread), the projected
wall time at the run's parallelism (``max_containers``, or what the backend would use) and, on
Modal, the projected dollars from :func:`modal_magic.costs.container_rate`: container-seconds are
rows × the mean row time, plus each container's start-up and the idle time Modal bills before it
scales down. The projections' ranges are 90% bootstrap intervals of the mean row time. On local
backends no dollar figure is shown (nothing is billed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import costs
from .checks import default_into
from .engine import check_columns, map_frame
from .options import DEFAULT_MODAL_CONTAINERS, MAX_THREADS, MapOptions, OptionsError, process_ceiling

__all__ = ["CONTAINER_START_S", "DEFAULT_SAMPLE", "SCALEDOWN_WINDOW_S", "Estimate", "estimate_frame", "planned_parallelism",
           "spread_positions"]

#: seconds a Modal container is assumed to take from start to its first row (a small image; a large
#: model's loading is part of the first rows' time, which the sample measures)
CONTAINER_START_S = 2.0
#: seconds a Modal container stays up, billed, after its last input where nothing sets it (Modal's default
#: ``scaledown_window``); a map's containers stay ``keep_warm`` seconds, which the estimate counts instead
SCALEDOWN_WINDOW_S = 60.0
#: bootstrap resamples of the sample's row times for the intervals
BOOTSTRAP_ROUNDS = 2000
#: rows an estimate times when not told
DEFAULT_SAMPLE = 200
#: fewer timed rows than this (the rest came from the cache) make the estimate say it is rough
MIN_TIMED = 10
#: result values shown in the estimate's text
SHOWN_VALUES = 3


def spread_positions(n: int, sample: int) -> np.ndarray:
    """``sample`` row positions spread evenly over ``n`` rows, first and last included.

    Examples
    --------
    >>> spread_positions(10, 4).tolist()
    [0, 3, 6, 9]
    >>> spread_positions(3, 200).tolist()
    [0, 1, 2]
    """
    if n <= sample:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, sample).round().astype(np.intp))


def planned_parallelism(options: MapOptions, is_async: bool) -> int:
    """How many rows the run would compute at once: what the backend would start for these options.

    Examples
    --------
    >>> planned_parallelism(MapOptions.create(backend="modal", max_containers=10), False)
    10
    >>> planned_parallelism(MapOptions.create(backend="sequential"), False)
    1
    """
    if options.is_modal:
        return options.max_containers or DEFAULT_MODAL_CONTAINERS
    if is_async:
        return options.local_concurrency()
    if options.backend == "sequential":
        return 1
    if options.backend == "threads":
        return min(options.local_concurrency(), MAX_THREADS)
    return min(options.local_concurrency(), process_ceiling())


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _mean_interval(times: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """A 90% bootstrap interval for the mean of ``times``."""
    if len(times) < 2:
        return float(times.mean()), float(times.mean())
    rng = np.random.default_rng(seed)
    means = rng.choice(times, size=(BOOTSTRAP_ROUNDS, len(times)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [5, 95])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """What a sample of rows says about the whole run: its time, its dollars (on Modal), its results.

    Times are per row where the row ran; ``wall_s`` and ``usd`` are ``(low, likely, high)``, the
    outer two a 90% bootstrap interval. ``usd`` is ``None`` where nothing is billed (local backends)
    or no row was timed. ``result`` is the sample's own output frame.

    Examples
    --------
    >>> import modal_magic, pandas as pd
    >>> df = pd.DataFrame({"x": range(1000)})
    >>> est = df.modal.estimate(lambda v: v * 2, column="x", sample=20, backend="threads", progress=False)
    >>> est.rows, est.sampled, est.errors
    (1000, 20, 0)
    """

    rows: int
    sampled: int
    timed: int  # sample rows that ran now (the others came from the cache, untimed)
    median_s: float
    p10_s: float
    p90_s: float
    mean_s: float
    parallelism: int
    wall_s: tuple[float, float, float]
    container_seconds: tuple[float, float, float] | None
    usd: tuple[float, float, float] | None
    rate: costs.ContainerRate | None
    backend: str
    values: tuple[Any, ...]
    errors: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    result: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    idle_s: float = SCALEDOWN_WINDOW_S  # each container's billed idle before scale-down (the run's keep_warm)

    def __repr__(self) -> str:
        lines = [f"Estimate for {self.rows:,} rows on backend={self.backend!r}, from a sample of {self.sampled} "
                 f"spread over the frame"]
        if self.timed == 0:
            lines.append("  per row: not measured (every sampled row came from the cache); "
                         "pass cache='refresh' to time them again")
        else:
            cached = ""
            if self.timed < self.sampled:
                cached = f" ({self.sampled - self.timed} came from the cache, untimed)"
            if self.timed < min(MIN_TIMED, self.sampled):
                cached += (f"; only {self.timed} timed, so the projection is rough: pass cache='refresh' to time "
                           "the whole sample again")
            lines.append(f"  per row: median {_duration(self.median_s)}, p10–p90 {_duration(self.p10_s)}–"
                         f"{_duration(self.p90_s)}, mean {_duration(self.mean_s)}{cached}")
            low, likely, high = self.wall_s
            lines.append(f"  wall time: ≈ {_duration(likely)} (90%: {_duration(low)}–{_duration(high)}) "
                         f"at {self.parallelism} {'containers' if self.rate is not None else 'rows at once'}")
        if self.usd is not None and self.rate is not None and self.container_seconds is not None:
            low, likely, high = self.usd
            at_most = "at most " if self.rate.at_most else ""
            lines.append(f"  cost (estimate): ≈ {at_most}{costs.dollars(likely)} (90%: {costs.dollars(low)}–"
                         f"{costs.dollars(high)}) for ≈ {self.container_seconds[1]:,.0f} container-seconds")
            lines.append(f"    at {costs.dollars(self.rate.usd_per_second * 3600)}/h per container "
                         f"({self.rate.resources}; Modal's list prices as of {costs.AS_OF}), including each "
                         f"container's ≈{CONTAINER_START_S:g} s start and {self.idle_s:g} s idle "
                         "before scale-down (keep_warm)")
        shown = ", ".join(_short(v) for v in self.values) or "none succeeded"
        lines.append(f"  sample returned: {shown}")
        if self.errors:
            kinds = ", ".join(f"{name} ×{count}" for name, count in self.errors_by_type.items())
            lines.append(f"  errors: {self.errors} of {self.sampled} ({kinds}); see est.result.modal.errors()")
        else:
            lines.append("  errors: none")
        return "\n".join(lines)


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def estimate_frame(frame: pd.DataFrame, fn: Callable[..., Any], *, columns: Sequence[Any], star: bool,
                   into: str | None, sample: int = DEFAULT_SAMPLE, options: MapOptions) -> Estimate:
    """Run ``sample`` rows spread over ``frame`` with ``options`` and project the whole run from them.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"x": range(100)})
    >>> est = estimate_frame(df, lambda v: 1 // (v % 50), columns=["x"], star=False, into="y", sample=10,
    ...                      options=MapOptions.create(backend="sequential", progress=False))
    >>> est.sampled, est.errors, est.usd is None
    (10, 1, True)
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise OptionsError(f"sample={sample!r} is not valid: expected how many rows to time, a whole number of at "
                           "least 1")
    if options.sample is not None:
        raise OptionsError("an estimate picks its own rows, spread over the frame: give their number as "
                           "estimate(..., sample=N), without the map option sample=")
    if options.backend.startswith("modal:"):
        raise OptionsError(f"an estimate times each row where it runs, which the deployed function "
                           f"backend={options.backend!r} doesn't report; estimate the function itself with "
                           "backend='modal' and the same gpu=/cpu=/memory=")
    check_columns(frame, list(columns))
    if into is None:
        into = default_into(fn) if fn is not None else options.backend.rpartition("/")[2].replace("-", "_")
    positions = spread_positions(len(frame), sample)
    sub = frame.iloc[positions]
    out = map_frame(sub, fn, columns=list(columns), star=star, into=into, options=options.replace(timings=True))
    times = out[f"{into}_seconds"].to_numpy(dtype=np.float64)
    times = times[~np.isnan(times)]
    errors = out[f"{into}_error"].notna()
    failed = out.loc[errors, f"{into}_error"]
    by_type: dict[str, int] = {}
    for error in failed:
        name = getattr(error, "type_name", type(error).__name__)
        by_type[name] = by_type.get(name, 0) + 1
    succeeded = out.loc[~errors]
    if into in out.columns:
        values = tuple(succeeded[into].iloc[:SHOWN_VALUES].tolist())
    else:  # expand=True: the dicts' keys became columns
        made = [c for c in out.columns if c not in sub.columns and c not in (f"{into}_error", f"{into}_seconds")]
        values = tuple(succeeded[made].iloc[:SHOWN_VALUES].to_dict("records"))
    is_async = _is_async(fn)
    parallel = max(1, min(planned_parallelism(options, is_async), len(frame)))
    rate = costs.container_rate(options.gpu, cpu=options.cpu, memory=options.memory) if options.backend == "modal" \
        else None
    n = len(frame)
    if len(times):
        mean = float(times.mean())
        low, high = _mean_interval(times)
        means = (low, mean, high)
        start = CONTAINER_START_S if options.is_modal else 0.0
        wall = tuple(n * m / parallel + start for m in means)
        if rate is not None:
            overhead = parallel * (CONTAINER_START_S + options.keep_warm)  # the idle Modal bills after the run
            container_s = tuple(n * m + overhead for m in means)
            usd = tuple(rate.cost(s) for s in container_s)
        else:
            container_s = usd = None
        median, p10, p90 = (float(v) for v in np.percentile(times, [50, 10, 90]))
    else:
        mean = median = p10 = p90 = math.nan
        wall = (math.nan,) * 3
        container_s = usd = None
    return Estimate(
        rows=n, sampled=len(sub), timed=len(times), median_s=median, p10_s=p10, p90_s=p90, mean_s=mean,
        parallelism=parallel, wall_s=wall, container_seconds=container_s, usd=usd, rate=rate,  # type: ignore[arg-type]
        backend=options.backend, values=values, errors=int(errors.sum()), errors_by_type=by_type, result=out,
        idle_s=float(options.keep_warm),
    )


def _is_async(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)
