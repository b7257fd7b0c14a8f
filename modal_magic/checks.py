"""Checks on the user's function, made before any row runs, with messages that say what to do.

A map that fails after an hour because the function can't be pickled, takes the wrong number of
arguments or is a generator wastes the hour. These checks run in the kernel, in milliseconds.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import cloudpickle

from .errors import ShortTraceback
from .shipping import dumps_function

__all__ = ["FunctionError", "check_function", "check_picklable", "default_into"]


class FunctionError(ShortTraceback, TypeError):
    """The function can't be mapped as given (not callable, wrong arity, a generator, unpicklable)."""


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def default_into(fn: Callable[..., Any]) -> str:
    """The result column's default name: the function's ``__name__``, or ``"result"`` for a lambda.

    Examples
    --------
    >>> def score(text): ...
    >>> default_into(score), default_into(lambda x: x)
    ('score', 'result')
    """
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        return "result"
    return name


def check_function(fn: Any, n_args: int, *, what: str) -> bool:
    """Check that ``fn`` can be called once per row with ``n_args`` positional arguments.

    ``what`` names where the arguments come from, for the message (e.g. ``"columns=['a', 'b']"``).
    Returns whether ``fn`` is an ``async def`` function.
    """
    if not callable(fn):
        raise FunctionError(f"expected a function to call once per row, got {type(fn).__name__} {fn!r:.60}")
    target = fn.func if isinstance(fn, __import__("functools").partial) else fn
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        raise FunctionError(
            f"{_name(fn)} is a generator function (it uses `yield`), so a row would get a generator "
            "instead of a value; return the value instead (e.g. `return list(...)`)"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; the call itself will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(*range(n_args))
        except TypeError:
            params = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            raise FunctionError(
                f"{_name(fn)}{signature} can't take {n_args} positional argument{'s' * (n_args != 1)} "
                f"from {what}; it takes {len(params)}. Pick as many columns as the function has parameters"
                + (" (use df.modal.starmap(fn, columns=[...]) for several)" if n_args == 1 and len(params) > 1 else "")
            ) from None
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None))


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def check_picklable(fn: Callable[..., Any], *, where: str,
                    otherwise: str = ", or run with backend='threads', which doesn't pickle") -> bytes:
    """Pickle ``fn`` with cloudpickle, or name the global or closure variable that can't be.

    ``where`` says where the function was going and ``otherwise`` what else the user can do (for the
    message). Returns the pickled bytes, the user's own modules by value
    (:func:`modal_magic.shipping.dumps_function`).
    """
    try:
        return dumps_function(fn)
    except Exception as error:
        culprit = _find_unpicklable(fn)
        detail = f" it uses {culprit}, which can't be pickled" if culprit else f" {type(error).__name__}: {error}"
        raise FunctionError(
            f"{_name(fn)} can't be sent to {where}:{detail}. Create that object inside the function "
            f"(or in a module the function imports){otherwise}"
        ) from error


def _find_unpicklable(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    suspects: list[tuple[str, Any]] = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            suspects.append((f"the closure variable `{name}`", cell.cell_contents))
        except ValueError:  # an empty cell (the variable isn't assigned yet)
            continue
    fn_globals = getattr(fn, "__globals__", {})
    for name in sorted(_referenced_names(code)):
        if name in fn_globals:
            suspects.append((f"the global `{name}`", fn_globals[name]))
    for label, value in suspects:
        if isinstance(value, types.ModuleType):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{label} ({type(value).__module__}.{type(value).__qualname__})"
    return None
