"""How the user's function travels to another process: with the user's own modules by value.

cloudpickle sends a function defined in a notebook by value, but one from a module it can import
(``pkg/scoring.py`` next to the notebook) by reference: the worker or container imports the module
afresh, so state the notebook changed (``scoring.SETTINGS["scale"] = 5``) silently isn't seen there,
and ``Series.apply`` and the default backend would give different answers. Here the user's own
modules (imported, but neither installed nor the standard library) are pickled by value while the
function is serialized, so the other side runs the code and module state exactly as the kernel holds
them. When that can't be done (the function reaches a module-level object that can't be pickled), the
function goes by reference as before and one warning says what differs.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from typing import Any, Callable, Iterator

import cloudpickle

from .code_origin import module_origin

__all__ = ["ModuleStateWarning", "by_value", "by_value_packages", "dumps_function", "own_packages"]

#: never shipped by value: modal_magic's own code is importable wherever it runs rows, or is
#: shipped by the backend itself (the Modal row runner)
_NEVER_BY_VALUE = frozenset({"modal_magic"})


class ModuleStateWarning(UserWarning):
    """The user's module had to go by reference: the workers import it afresh, without the kernel's changes."""


def own_packages() -> list[str]:
    """The imported top-level packages and modules that are the user's own code (not installed at all).

    Examples
    --------
    >>> "pandas" in own_packages(), "json" in own_packages()
    (False, False)
    """
    found = []
    for name, module in list(sys.modules.items()):
        if "." in name or name in _NEVER_BY_VALUE or not isinstance(module, types.ModuleType):
            continue
        if getattr(module, "__name__", None) != name:
            # an alias, such as the ``__mp_main__`` that multiprocessing adds for ``__main__``:
            # cloudpickle registers a module under its own name, so the alias would be a duplicate
            continue
        if module_origin(name) == "own":  # an editable install is importable in the workers too
            found.append(name)
    return found


@contextlib.contextmanager
def by_value(names: list[str] | None = None) -> Iterator[list[str]]:
    """While inside, cloudpickle pickles the user's own modules (or ``names``) by value.

    Yields the package names registered; they are unregistered on the way out, so nothing else that
    pickles in this process is affected.

    Examples
    --------
    >>> with by_value() as names:
    ...     isinstance(names, list)
    True
    """
    registered: list[tuple[Any, types.ModuleType]] = []
    try:
        for name in own_packages() if names is None else names:
            module = sys.modules.get(name)
            if module is None:
                continue
            for pickler in _picklers():
                # by the module's own name: an alias (``__mp_main__``) is the module registered once
                if module.__name__ in pickler.list_registry_pickle_by_value():
                    continue  # registered already (by an enclosing run, or as an alias): its owner unregisters it
                pickler.register_pickle_by_value(module)
                registered.append((pickler, module))
        yield list(dict.fromkeys(module.__name__ for _, module in registered))
    finally:
        for pickler, module in registered:
            pickler.unregister_pickle_by_value(module)


def _picklers() -> list[Any]:
    """Every cloudpickle that may pickle the function: ours, and the copy Modal's client vendors.

    Modal serializes functions with ``modal._vendor.cloudpickle``, which keeps its own by-value
    registry; it is only consulted when modal has been imported (a Modal run), never imported here.
    """
    picklers = [cloudpickle]
    vendored = sys.modules.get("modal._vendor.cloudpickle")
    if vendored is not None and vendored is not cloudpickle:
        picklers.append(vendored)
    return picklers


def dumps_function(fn: Callable[..., Any] | Any) -> bytes:
    """Pickle ``fn`` for another process, the user's own modules by value (see the module docstring).

    Falls back to pickling those modules by reference, with a :class:`ModuleStateWarning`, when a
    module-level object the function reaches can't be pickled by value. Errors from the fallback
    (an unpicklable closure variable, say) propagate to the caller.

    Examples
    --------
    >>> import pickle
    >>> pickle.loads(dumps_function(len)) is len
    True
    """
    return _dumps(fn)[0]


def by_value_packages(fn: Callable[..., Any] | Any) -> list[str]:
    """The own packages to register by value while something else (Modal's client) pickles ``fn``.

    Empty, after a :class:`ModuleStateWarning`, when ``fn`` can't be pickled with them by value.
    """
    return _dumps(fn)[1]


def _dumps(fn: Any) -> tuple[bytes, list[str]]:
    try:
        with by_value() as names:
            return cloudpickle.dumps(fn, protocol=5), names
    except Exception as by_value_error:
        data = cloudpickle.dumps(fn, protocol=5)  # raises for what can't be sent at all
        warnings.warn(
            f"{getattr(fn, '__qualname__', type(fn).__name__)} uses your own module(s), which couldn't be "
            f"sent by value ({type(by_value_error).__name__}: {by_value_error}); worker processes and "
            "containers import them afresh, so changes this kernel made to their module-level state "
            "(settings, caches) are not seen there. Pass such values as arguments, or use "
            "backend='threads', which runs in this process.",
            ModuleStateWarning,
            stacklevel=5,
        )
        return data, []
