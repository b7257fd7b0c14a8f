"""The run's options: one immutable, validated object shared by the accessor and the magics.

Every entry point (``df.modal.map``, ``df.modal.starmap``, ``series.modal.map``, ``%%modal_map``)
turns its keyword arguments or flags into a :class:`MapOptions` through :meth:`MapOptions.create`,
which checks names, types and ranges before any work starts and says what to do when something is
wrong. The names mirror Modal's own words (``gpu``, ``secrets``, ``max_containers``, ``timeout``...).

Each option is declared once, as a field of :class:`MapOptions` made by
:func:`~modal_magic.declarations.option`: its name, type, default, check, help, how it is spelled on
a magic's line and what kind of ``%config`` traitlet it is. :data:`OPTIONS` reads those
declarations back, from which the validation here, the accessors' signatures and, on the IPython
side, the ``ModalMagic`` traitlets, the ``%%modal_map`` flags and their help are all generated.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from .declarations import Flag, Option, declared_options, option, unknown_option
from .errors import OptionsError

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_LLM_CONCURRENCY",
    "DEFAULT_MODAL_CONTAINERS",
    "MAX_THREADS",
    "PROCESSES_PER_CORE",
    "OPTIONS",
    "OPTION_NAMES",
    "Flag",
    "MapOptions",
    "Option",
    "OptionsError",
    "check_option",
    "cores",
    "declared_options",
    "invalid",
    "non_negative_int",
    "option",
    "positive_int",
    "positive_number",
    "process_ceiling",
    "strings",
    "true_or_false",
]

DEFAULT_BACKEND = "local"
LOCAL_BACKENDS = ("local", "threads", "sequential")

# --- how many rows run at once: every default and cap of max_containers, in one place -----------
# Each backend reads its default and its cap from here, and says so in its docstring; a cap
# lowers a larger max_containers with a one-time warning (backends.base.capped_concurrency).

#: Modal containers a run plans its batches for when ``max_containers`` isn't given (Modal
#: itself scales further when the work is there)
DEFAULT_MODAL_CONTAINERS = 32
#: batches in flight at once to a deployed function (``backend="modal:APP/NAME"``) without ``max_containers``
DEFAULT_DEPLOYED_CONCURRENCY = 8
#: requests in flight at once for ``df.modal.llm`` when ``max_containers`` isn't given
DEFAULT_LLM_CONCURRENCY = 64
#: local worker processes per core at most: past that, CPU work only gains memory use
PROCESSES_PER_CORE = 2
#: threads one run starts at most: past a few hundred, switching and memory cost more than the
#: extra concurrency gives (an ``async def`` function suits thousands of requests in flight)
MAX_THREADS = 256


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count).

    Examples
    --------
    >>> cores() >= 1
    True
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_ceiling() -> int:
    """The most local worker processes one run may use: :data:`PROCESSES_PER_CORE` per core.

    Examples
    --------
    >>> process_ceiling() == PROCESSES_PER_CORE * cores()
    True
    """
    return PROCESSES_PER_CORE * cores()


OnError = Literal["capture", "raise"]
CacheMode = bool | Literal["refresh"]

# --- per-option checks: each takes (name, value) and returns the normalised value or raises ----------
# The public ones are shared with other option sets (modal_magic.llm.options) so a rule and its
# message live in one place.


def invalid(name: str, value: Any, expected: str) -> OptionsError:
    """The error for ``name=value``, saying what was expected."""
    return OptionsError(f"{name}={value!r} is not valid: expected {expected}")


def _check_backend(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(name, value, "a backend name such as 'local', 'threads' or 'modal'")
    if value.startswith("modal:"):
        target = value.removeprefix("modal:")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", target):
            raise invalid(name, value, "'modal:APP_NAME/FUNCTION_NAME' for a deployed Modal function")
        return value
    from .backends import backend_names

    known = backend_names()
    if value not in known:
        close = difflib.get_close_matches(value, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise OptionsError(
            f"unknown backend {value!r}: {hint}choose one of {', '.join(map(repr, known))} "
            "or 'modal:APP/FUNCTION' for a deployed function"
        )
    return value


def positive_int(name: str, value: Any) -> int | None:
    """A whole number of at least 1, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, value, "a whole number of at least 1, or None")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """A whole number of at least 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(name, value, "a whole number of at least 0")
    return value


def positive_number(name: str, value: Any) -> float | None:
    """A finite number greater than 0 (as a float), or None."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            or not math.isfinite(value)):
        raise invalid(name, value, "a number greater than 0, or None")
    return float(value)


def positive_seconds(name: str, value: Any) -> float | None:
    """A number of seconds greater than 0 (as a float), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise invalid(name, value, "a number of seconds greater than 0, or None")
    if not math.isfinite(value):  # inf would overflow the timers; None already means "no limit"
        raise invalid(name, value, "a finite number of seconds greater than 0, or None for no limit")
    return float(value)


def true_or_false(name: str, value: Any) -> bool:
    """Exactly True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False")
    return value


def _check_cache(name: str, value: Any) -> CacheMode:
    if value is True or value is False or value == "refresh":
        return value
    raise invalid(name, value, "True, False or 'refresh'")


def strings(name: str, value: Any) -> tuple[str, ...]:
    """One non-empty string or a list of them, as a tuple; None is empty."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    items = tuple(value)
    if not all(isinstance(v, str) and v for v in items):
        raise invalid(name, value, "a list of non-empty strings")
    return items


def _check_gpu(name: str, value: Any) -> str | list[str] | None:
    if value is None:
        return None
    from .gpu import parse_gpu

    if isinstance(value, str):
        parse_gpu(value)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        for v in value:
            parse_gpu(v)
        return list(value)
    raise invalid(name, value, "a GPU type such as 'T4', 'A100-80GB' or 'H100:2', or a list of them as fallbacks")


def _check_cpu(name: str, value: Any) -> float | None:
    return positive_number(name, value)


def _check_memory(name: str, value: Any) -> int | None:
    return positive_int(name, value)


def _check_python_version(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"3\.\d{1,2}", value):
        raise invalid(name, value, "a Python version such as '3.11'")
    return value


def _check_secrets(name: str, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        value = [value]
    for v in value:
        if isinstance(v, str):
            if not v:
                raise invalid(name, value, "secret names (non-empty strings) or modal.Secret objects")
        elif type(v).__name__ != "Secret":
            raise invalid(name, value, "secret names (strings) or modal.Secret objects")
    return tuple(value)


def _check_env(name: str, value: Any) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise invalid(name, value, "a dict of environment variable names to string values")
    return dict(value)


def _check_volumes(name: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid(name, value, "a dict of mount paths to volume names, e.g. {'/data': 'my-volume'}")
    for path, vol in value.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise invalid(name, value, "absolute mount paths as keys, e.g. {'/data': 'my-volume'}")
        if not (isinstance(vol, str) and vol) and type(vol).__name__ != "Volume":
            raise invalid(name, value, "volume names or modal.Volume objects as values")
    return dict(value)


def _check_image(name: str, value: Any) -> Any:
    if value is None or type(value).__name__ == "Image":
        return value
    raise invalid(name, value, "a modal.Image (or use pip=/apt=/python_version= to describe one)")


def _check_keep_warm(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, value, "a number of seconds: 0 (containers stop with the run) or 2 to 3600")
    if value != 0 and not 2 <= value <= 3600:
        raise invalid(name, value, "0 (containers stop with the run) or between 2 and 3600 seconds "
                                   "(Modal keeps idle containers at most an hour)")
    return int(math.ceil(value))


def _check_on_error(name: str, value: Any) -> OnError:
    if value not in ("capture", "raise"):
        raise invalid(name, value, "'capture' (errors become a column) or 'raise' (stop at the first error)")
    return value


_PLACE = "Where rows run"
_RESULT = "Result"


@dataclass(frozen=True)
class MapOptions:
    """How to run one map: where, with what resources, and what to do on failure.

    Build it with :meth:`create`, which validates; the dataclass itself is frozen so a run can't
    change its options half-way. Each field is an option's one declaration (see :func:`option`).

    Examples
    --------
    >>> opts = MapOptions.create(backend="threads", max_containers=16, retries=2)
    >>> opts.max_containers, opts.retries
    (16, 2)
    >>> opts.replace(retries=5).retries
    5
    """

    backend: str = option(
        DEFAULT_BACKEND, _check_backend,
        "Where rows run: 'local' (worker processes), 'threads', 'sequential', 'modal', "
        "or 'modal:APP/FUNCTION' for a deployed Modal function.",
        trait="text", flag=Flag(group=_PLACE))
    # Modal resources and image (ignored by the local backends).
    gpu: str | list[str] | None = option(
        None, _check_gpu,
        "GPU for each Modal container: 'T4', 'A100-80GB', 'H100:2'...; several are fallbacks, in order.",
        trait="gpu", flag=Flag("many", metavar="GPU", group=_PLACE))
    cpu: float | None = option(
        None, _check_cpu, "CPU cores reserved for each Modal container.",
        trait="number", flag=Flag(type=float, metavar="CORES", group=_PLACE))
    memory: int | None = option(
        None, _check_memory, "Memory for each Modal container, in MiB.",
        trait="whole", flag=Flag(type=int, metavar="MIB", group=_PLACE))
    image: Any = option(
        None, _check_image, "A modal.Image for the containers to run (on a magic's line: the name of a "
        "modal.Image variable in the notebook).",
        trait="name", flag=Flag(metavar="NAME", group=_PLACE))
    pip: tuple[str, ...] = option(
        (), strings, "Packages to pip-install into the Modal image.",
        trait="texts", flag=Flag("many", metavar="PACKAGE", group=_PLACE))
    apt: tuple[str, ...] = option(
        (), strings, "Debian packages to apt-install into the Modal image.",
        trait="texts", flag=Flag("many", metavar="PACKAGE", group=_PLACE))
    python_version: str | None = option(
        None, _check_python_version, "Python version of the Modal image, e.g. 3.11.",
        trait="text", flag=Flag(metavar="X.Y", group=_PLACE))
    secrets: tuple[Any, ...] = option(
        (), _check_secrets, "Modal secrets whose variables the function sees (names or modal.Secret objects).",
        trait="texts", flag=Flag("repeat", spelling="--secret", metavar="NAME", group=_PLACE))
    env: Mapping[str, str] = option(
        {}, _check_env, "Environment variables the function sees, KEY=VALUE.",
        trait="pairs", flag=Flag("pairs", metavar="KEY=VALUE", group=_PLACE))
    volumes: Mapping[str, Any] = option(
        {}, _check_volumes, "Modal volumes to mount, /PATH=VOLUME_NAME.",
        trait="pairs", flag=Flag("pairs", spelling="--volume", metavar="/PATH=VOLUME_NAME", group=_PLACE))
    keep_warm: int = option(
        300, _check_keep_warm,
        "Seconds Modal containers (and their app) stay up after a run, for the next cell to reuse; "
        "0 stops them with the run. Idle containers are billed.",
        trait="whole", flag=Flag(type=int, metavar="SECONDS", group=_PLACE))
    # Execution.
    timeout: float | None = option(
        None, positive_seconds, "Seconds one row may run before it fails.",
        trait="number", flag=Flag(type=float, metavar="SECONDS"))
    retries: int = option(
        0, non_negative_int, "Extra tries for a row that raises or whose worker was lost.",
        trait="whole", flag=Flag(type=int, metavar="N"))
    max_containers: int | None = option(
        None, positive_int,
        "Rows running at once: Modal containers (default 32), or local worker processes or threads "
        "(default: the core count; at most twice the cores, or 256 threads).",
        trait="whole", flag=Flag(type=int, metavar="N"))
    batch_size: int | None = option(
        None, positive_int,
        "Rows sent to a worker or container at a time (default: sized from measured row times).",
        trait="whole", flag=Flag(type=int, metavar="N"))
    order_outputs: bool = option(
        False, true_or_false, "Have the backend return rows in order; results join back by position either way.",
        trait="switch", flag=Flag("switch"))
    on_error: OnError = option(
        "capture", _check_on_error,
        "'capture': a failed row gets an error in <into>_error; 'raise': stop at the first failed row.",
        trait="choice", choices=("capture", "raise"))
    cache: CacheMode = option(
        True, _check_cache,
        "Reuse stored results of rows that already ran; 'refresh' recomputes and stores them again.",
        trait="cache", flag=Flag("cache"))
    progress: bool = option(True, true_or_false, "Show a progress bar.", trait="switch", flag=Flag("switch"))
    wait: bool = option(
        True, true_or_false,
        "False: return a MapJob at once and run in the background (job.result() gives the frame); "
        "on a magic's line: --background.",
        trait="switch", flag=None)
    budget_usd: float | None = option(
        None, positive_number,
        "Modal only: send no batch that could take the run's container time past this many dollars "
        "(each batch books its worst case, its timeout at the container's rate); rows not sent fail with "
        "BudgetExceeded, finished rows are kept and cached.",
        trait="number", flag=Flag(type=float, metavar="USD"))
    sample: int | None = option(
        None, positive_int, "Run on the first N rows only, to try the function out.",
        trait="whole", flag=Flag(type=int, metavar="N"))
    # Result shape.
    timings: bool = option(
        False, true_or_false,
        "Add <into>_seconds: each row's wall time where it ran (NaN for cached rows and rows that never ran).",
        trait="switch", flag=Flag("switch", group=_RESULT))
    expand: bool = option(
        False, true_or_false, "Spread dict results into one column per key.",
        trait="switch", flag=Flag("switch", group=_RESULT))
    overwrite: bool = option(
        False, true_or_false, "Replace columns of the DataFrame that the result would overwrite.",
        trait="switch", flag=Flag("switch", group=_RESULT))

    @classmethod
    def create(cls, base: MapOptions | None = None, **kwargs: Any) -> MapOptions:
        """Validate keyword options (over ``base``'s values, or the defaults) into an options object.

        Raises
        ------
        OptionsError
            For an unknown option (with the closest known name) or a value of the wrong type or range.

        Examples
        --------
        >>> MapOptions.create(backend="threads").backend
        'threads'
        >>> MapOptions.create(max_container=4)
        Traceback (most recent call last):
        ...
        modal_magic.errors.OptionsError: unknown option 'max_container'; did you mean 'max_containers'?
        """
        unknown = [k for k in kwargs if k not in _BY_NAME]
        if unknown:
            raise unknown_option(unknown[0], OPTION_NAMES)
        start = base if base is not None else cls()
        values = {name: getattr(start, name) for name in OPTION_NAMES}
        for name, value in kwargs.items():
            values[name] = _BY_NAME[name].check(name, value)
        _check_combination(values)
        return cls(**values)

    def replace(self, **kwargs: Any) -> MapOptions:
        """Return a validated copy with some options changed."""
        return MapOptions.create(self, **kwargs)

    @property
    def is_modal(self) -> bool:
        """True when the run goes to Modal (an ephemeral app or a deployed function)."""
        return self.backend == "modal" or self.backend.startswith("modal:")

    def local_concurrency(self) -> int:
        """How many rows may run at once on a local backend: ``max_containers``, else one per core.

        The backends cap it (:func:`process_ceiling`, :data:`MAX_THREADS`).
        """
        return self.max_containers or cores()


#: Every option of a map, in declaration order.
OPTIONS: tuple[Option, ...] = declared_options(MapOptions)
OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS)
_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def check_option(name: str, value: Any) -> Any:
    """Check one option on its own (e.g. a configured default) and return its normalised value.

    Combinations (``gpu`` with a local backend...) are checked when the whole options object is built.

    Examples
    --------
    >>> check_option("pip", "requests")
    ('requests',)
    >>> check_option("retries", -1)
    Traceback (most recent call last):
    ...
    modal_magic.errors.OptionsError: retries=-1 is not valid: expected a whole number of at least 0
    """
    if name not in _BY_NAME:
        raise unknown_option(name, OPTION_NAMES)
    return _BY_NAME[name].check(name, value)


def _check_combination(values: dict[str, Any]) -> None:
    backend = values["backend"]
    modal_only = [n for n in ("gpu", "cpu", "memory", "image", "python_version") if values[n] is not None]
    modal_only += [n for n in ("pip", "apt", "secrets", "volumes") if values[n]]
    if modal_only and backend in LOCAL_BACKENDS:
        raise OptionsError(
            f"{', '.join(modal_only)} only appl{'y' if len(modal_only) > 1 else 'ies'} on Modal, "
            f"but backend={backend!r} runs on this machine; "
            "add backend='modal' to run there"
        )
    if values["budget_usd"] is not None and backend != "modal":
        where = ("a deployed function's resources aren't known here" if backend.startswith("modal:")
                 else f"backend={backend!r} runs on this machine, which bills nothing")
        raise OptionsError(
            f"budget_usd= caps what Modal containers cost, but {where}, so no cost is known; "
            "leave budget_usd out, or run with backend='modal'"
        )
    if values["timings"] and backend.startswith("modal:"):
        raise OptionsError(
            f"timings=True measures each row where it runs, but backend={backend!r} calls a deployed "
            "function that doesn't report it; leave timings out, or map the function itself with backend='modal'"
        )
    if values["image"] is not None and (values["pip"] or values["apt"] or values["python_version"]):
        raise OptionsError(
            "image= is a complete modal.Image; add packages to it with image.pip_install(...) "
            "instead of also passing pip=/apt=/python_version="
        )
