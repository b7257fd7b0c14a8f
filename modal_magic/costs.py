"""What Modal compute costs: a dated table of Modal's public per-second rates, and a container's rate from the options.

Modal bills containers per second, from start to scale-down, for what they reserve: each GPU by
type, CPU by physical core and memory by GiB (the request, or the usage where it is higher).
:data:`MODAL_RATES` holds the public list prices as of :data:`AS_OF`; a workspace with other rates
(a discount, a region multiplier, non-preemptible containers) overrides them in place, e.g.
``modal_magic.costs.MODAL_RATES["H100"] = 0.00095``. The installed Modal client (1.6) reports a
workspace's costs per app and hour (``modal.billing``), not its rates, so the dollars shown during
a run are computed here from these rates and labelled an estimate. :func:`container_rate` turns a
run's ``gpu``, ``cpu`` and ``memory`` into dollars per container-second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .gpu import parse_gpu

__all__ = ["AS_OF", "DEFAULT_CPU_CORES", "DEFAULT_MEMORY_MIB", "MODAL_DEFAULT_TIMEOUT_S", "MODAL_RATES", "ContainerRate",
           "billed", "container_rate", "dollars", "input_timeout_s"]

#: when :data:`MODAL_RATES` was read from modal.com/pricing
AS_OF = "2026-06"
#: US dollars per second: per GPU of each type, per physical CPU core, per GiB of memory
MODAL_RATES: dict[str, float] = {
    "B200": 0.001736,
    "B200+": 0.001736,
    "H200": 0.001261,
    "H100": 0.001097,
    "H100!": 0.001097,
    "A100-80GB": 0.000694,
    "A100-40GB": 0.000583,
    "A100": 0.000583,
    "L40S": 0.000542,
    "A10G": 0.000306,
    "A10": 0.000306,
    "L4": 0.000222,
    "T4": 0.000164,
    "cpu_core": 0.0000131,
    "memory_gib": 0.00000222,
}
#: what a Modal function reserves when ``cpu=`` / ``memory=`` are not given
DEFAULT_CPU_CORES = 0.125
DEFAULT_MEMORY_MIB = 128
#: seconds Modal lets one input run when the function sets no ``timeout`` (Modal's default)
MODAL_DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class ContainerRate:
    """Dollars per second for one container, and what they pay for.

    ``at_most`` is true where the GPU isn't known in advance (fallbacks, ``"any"``): the rate is
    then that of the dearest GPU the container may get.

    Examples
    --------
    >>> rate = container_rate("T4", cpu=None, memory=None)
    >>> round(rate.usd_per_second * 3600, 4), rate.resources
    (0.5973, 'T4 + 0.125 CPU + 0.125 GiB')
    """

    usd_per_second: float
    resources: str
    at_most: bool = False

    def cost(self, container_seconds: float) -> float:
        """Dollars for ``container_seconds`` of containers with these resources."""
        return self.usd_per_second * container_seconds


def _gpu_rate(gpu: Any) -> tuple[float, str, bool]:
    if gpu is None:
        return 0.0, "", False
    choices: Iterable[str] = [gpu] if isinstance(gpu, str) else list(gpu)
    priced = []
    for choice in choices:
        gpu_type, count = parse_gpu(choice)
        if gpu_type == "ANY":
            dearest = max(v for k, v in MODAL_RATES.items() if k not in ("cpu_core", "memory_gib"))
            priced.append((dearest * count, "any GPU", True))
        else:
            priced.append((MODAL_RATES[gpu_type] * count, f"{count}×{gpu_type}" if count > 1 else gpu_type, False))
    usd, words, unknown = max(priced)
    return usd, words, unknown or len(priced) > 1


def container_rate(gpu: Any, *, cpu: float | None, memory: int | None) -> ContainerRate:
    """The rate of a container with these options (``gpu`` as the ``gpu=`` option takes it).

    Examples
    --------
    >>> container_rate(["H100", "A100-80GB"], cpu=2, memory=8192).at_most
    True
    >>> container_rate(None, cpu=4, memory=None).resources
    '4 CPU + 0.125 GiB'
    """
    gpu_usd, gpu_words, at_most = _gpu_rate(gpu)
    cores = cpu if cpu is not None else DEFAULT_CPU_CORES
    gib = (memory if memory is not None else DEFAULT_MEMORY_MIB) / 1024
    usd = gpu_usd + cores * MODAL_RATES["cpu_core"] + gib * MODAL_RATES["memory_gib"]
    parts = [p for p in (gpu_words, f"{cores:g} CPU", f"{gib:g} GiB") if p]
    return ContainerRate(usd, " + ".join(parts), at_most)


def billed(rate: ContainerRate, container_seconds: Callable[[], float | None]) -> Callable[[], float | None]:
    """The dollars of ``container_seconds()`` at ``rate``, read afresh at each call (``None`` while
    that is ``None``): a finished run's keep_warm tail is projected while its containers are up and
    exact once they have stopped.

    Examples
    --------
    >>> bill = billed(container_rate(None, cpu=1.0, memory=0), lambda: 100.0)
    >>> round(bill(), 6)
    0.00131
    """
    def usd() -> float | None:
        seconds = container_seconds()
        return None if seconds is None else rate.cost(seconds)
    return usd


def dollars(usd: float) -> str:
    """A dollar figure for a bar or a summary: cents above a dollar, four significant figures below.

    Examples
    --------
    >>> dollars(12.3456), dollars(0.0123456), dollars(0.5), dollars(0.00001605), dollars(0)
    ('$12.35', '$0.01235', '$0.5', '$0.00001605', '$0')
    """
    if usd == 0:
        return "$0"
    if usd >= 1:
        return f"${usd:,.2f}"
    decimals = 3 - math.floor(math.log10(usd))  # four significant figures, never an exponent
    return "$" + f"{usd:.{decimals}f}".rstrip("0")


def input_timeout_s(timeout: float | None, retries: int, batch_rows: int) -> int:
    """The seconds Modal lets one input of ``batch_rows`` rows run: the Modal function's ``timeout=``.

    Each row may take ``timeout`` seconds per try, plus the backoff between tries; with no
    ``timeout`` it is Modal's own default per input. This is also the most container time one
    input can be billed for, which a map's ``budget_usd`` books before sending it.

    Examples
    --------
    >>> input_timeout_s(None, 0, 10), input_timeout_s(2.0, 0, 1), input_timeout_s(30.0, 1, 4)
    (300, 10, 250)
    """
    if timeout is None:
        return MODAL_DEFAULT_TIMEOUT_S
    budget = timeout * batch_rows * (retries + 1) + 5 * retries
    return int(min(max(math.ceil(budget) + 5, 10), 24 * 3600))
