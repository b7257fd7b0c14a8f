"""The run's options: one immutable, validated object shared by the accessor and the magics.

Every entry point (``df.modal.map``, ``df.modal.starmap``, ``series.modal.map``, ``%%modal_map``)
turns its keyword arguments or flags into a :class:`MapOptions` through :meth:`MapOptions.create`,
which checks names, types and ranges before any work starts and says what to do when something is
wrong. The names mirror Modal's own words (``gpu``, ``secrets``, ``max_containers``, ``timeout``...).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

__all__ = ["MapOptions", "OptionsError", "OPTION_NAMES", "DEFAULT_BACKEND", "check_option"]

DEFAULT_BACKEND = "local"
LOCAL_BACKENDS = ("local", "threads", "sequential")

OnError = Literal["capture", "raise"]
CacheMode = bool | Literal["refresh"]


class OptionsError(ValueError):
    """An option has a wrong name, type or value; raised before any work starts."""


@dataclass(frozen=True)
class MapOptions:
    """How to run one map: where, with what resources, and what to do on failure.

    Build it with :meth:`create`, which validates; the dataclass itself is frozen so a run can't
    change its options half-way.

    Examples
    --------
    >>> opts = MapOptions.create(backend="threads", max_containers=16, retries=2)
    >>> opts.max_containers, opts.retries
    (16, 2)
    >>> opts.replace(retries=5).retries
    5
    """

    backend: str = DEFAULT_BACKEND
    # Modal resources and image (ignored by the local backends).
    gpu: str | list[str] | None = None
    cpu: float | None = None
    memory: int | None = None
    image: Any = None
    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    python_version: str | None = None
    secrets: tuple[Any, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    volumes: Mapping[str, Any] = field(default_factory=dict)
    # Execution.
    timeout: float | None = None
    retries: int = 0
    max_containers: int | None = None
    batch_size: int | None = None
    order_outputs: bool = False
    on_error: OnError = "capture"
    cache: CacheMode = True
    progress: bool = True
    sample: int | None = None
    # Result shape.
    expand: bool = False
    overwrite: bool = False

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
        modal_magic.options.OptionsError: unknown option 'max_container'; did you mean 'max_containers'?
        """
        unknown = [k for k in kwargs if k not in OPTION_NAMES]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; options are: {', '.join(OPTION_NAMES)}"
            raise OptionsError(f"unknown option {name!r}{hint}")
        start = base if base is not None else cls()
        values = {f.name: getattr(start, f.name) for f in dataclasses.fields(cls)}
        for name, value in kwargs.items():
            values[name] = _CHECKS[name](name, value)
        _check_combination(values)
        return cls(**values)

    def replace(self, **kwargs: Any) -> MapOptions:
        """Return a validated copy with some options changed."""
        return MapOptions.create(self, **kwargs)

    @property
    def is_modal(self) -> bool:
        """True when the run goes to Modal (an ephemeral app or a deployed function)."""
        return self.backend == "modal" or self.backend.startswith("modal:")

    def workers(self) -> int:
        """How many rows may run at once on a local backend (``max_containers`` or the core count)."""
        return self.max_containers or (os.cpu_count() or 1)


# --- per-option checks: each takes (name, value) and returns the normalised value or raises ----------


def _fail(name: str, value: Any, expected: str) -> OptionsError:
    return OptionsError(f"{name}={value!r} is not valid: expected {expected}")


def _check_backend(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(name, value, "a backend name such as 'local', 'threads' or 'modal'")
    if value.startswith("modal:"):
        target = value.removeprefix("modal:")
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", target):
            raise _fail(name, value, "'modal:APP_NAME/FUNCTION_NAME' for a deployed Modal function")
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


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(name, value, "a whole number of at least 1, or None")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(name, value, "a whole number of at least 0")
    return value


def _positive_number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(name, value, "a number of seconds greater than 0, or None")
    if not math.isfinite(value):  # inf would overflow the timers; None already means "no limit"
        raise _fail(name, value, "a finite number of seconds greater than 0, or None for no limit")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


def _check_cache(name: str, value: Any) -> CacheMode:
    if value is True or value is False or value == "refresh":
        return value
    raise _fail(name, value, "True, False or 'refresh'")


def _strings(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    items = tuple(value)
    if not all(isinstance(v, str) and v for v in items):
        raise _fail(name, value, "a list of non-empty strings")
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
    raise _fail(name, value, "a GPU type such as 'T4', 'A100-80GB' or 'H100:2', or a list of them as fallbacks")


def _check_cpu(name: str, value: Any) -> float | None:
    return _positive_number(name, value)


def _check_memory(name: str, value: Any) -> int | None:
    return _positive_int(name, value)


def _check_python_version(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"3\.\d{1,2}", value):
        raise _fail(name, value, "a Python version such as '3.11'")
    return value


def _check_secrets(name: str, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        value = [value]
    for v in value:
        if isinstance(v, str):
            if not v:
                raise _fail(name, value, "secret names (non-empty strings) or modal.Secret objects")
        elif type(v).__name__ != "Secret":
            raise _fail(name, value, "secret names (strings) or modal.Secret objects")
    return tuple(value)


def _check_env(name: str, value: Any) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(name, value, "a dict of environment variable names to string values")
    return dict(value)


def _check_volumes(name: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(name, value, "a dict of mount paths to volume names, e.g. {'/data': 'my-volume'}")
    for path, vol in value.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise _fail(name, value, "absolute mount paths as keys, e.g. {'/data': 'my-volume'}")
        if not (isinstance(vol, str) and vol) and type(vol).__name__ != "Volume":
            raise _fail(name, value, "volume names or modal.Volume objects as values")
    return dict(value)


def _check_image(name: str, value: Any) -> Any:
    if value is None or type(value).__name__ == "Image":
        return value
    raise _fail(name, value, "a modal.Image (or use pip=/apt=/python_version= to describe one)")


def _check_on_error(name: str, value: Any) -> OnError:
    if value not in ("capture", "raise"):
        raise _fail(name, value, "'capture' (errors become a column) or 'raise' (stop at the first error)")
    return value


_CHECKS = {
    "backend": _check_backend,
    "gpu": _check_gpu,
    "cpu": _check_cpu,
    "memory": _check_memory,
    "image": _check_image,
    "pip": _strings,
    "apt": _strings,
    "python_version": _check_python_version,
    "secrets": _check_secrets,
    "env": _check_env,
    "volumes": _check_volumes,
    "timeout": _positive_number,
    "retries": _non_negative_int,
    "max_containers": _positive_int,
    "batch_size": _positive_int,
    "order_outputs": _flag,
    "on_error": _check_on_error,
    "cache": _check_cache,
    "progress": _flag,
    "sample": _positive_int,
    "expand": _flag,
    "overwrite": _flag,
}

OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MapOptions))
assert set(OPTION_NAMES) == set(_CHECKS), "every option needs a check"


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
    modal_magic.options.OptionsError: retries=-1 is not valid: expected a whole number of at least 0
    """
    if name not in _CHECKS:
        raise OptionsError(f"unknown option {name!r}")
    return _CHECKS[name](name, value)


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
    if values["image"] is not None and (values["pip"] or values["apt"] or values["python_version"]):
        raise OptionsError(
            "image= is a complete modal.Image; add packages to it with image.pip_install(...) "
            "instead of also passing pip=/apt=/python_version="
        )
