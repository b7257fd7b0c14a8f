"""Whose code a module is: an installed library, an editable install, or the user's own.

One answer serves two places that must agree. A module is a **library** when it is built in or in
the standard library, when its file lies under the interpreter's library folders (the standard
library, site-packages, the user site), or when it belongs to an installed distribution that is
not editable. An **editable** install (``pip install -e .``) is the user's package in development,
importable wherever the kernel's environment is. Anything else imported is the user's **own**
code (a notebook's ``__main__``, ``pkg/scoring.py`` next to it).

The cache's function fingerprint hashes editable and own code by its bytecode (an edit
invalidates cached rows) and a library by its name and version. Shipping sends only own code by
value (with the state the kernel gave it): a library or an editable install is importable where
the workers run, and pickling a large package in development by value would be slow or fail.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import site
import sys
import sysconfig
from typing import Literal

__all__ = ["Origin", "is_library_module", "module_origin", "top_package", "version_of"]


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(getattr(site, "getsitepackages", lambda: [])())  # absent in some embedded interpreters
    roots.add(getattr(site, "USER_SITE", None))
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


LIBRARY_ROOTS = _library_roots()

Origin = Literal["library", "editable", "own"]

#: (module name, its file) -> answer; keyed by the file so a module imported later, or from
#: somewhere else, is looked at again
_answers: dict[tuple[str, str | None], Origin] = {}
_ANSWERS_LIMIT = 8192


def top_package(module_name: str | None) -> str:
    """The top-level package of a dotted module name (``"a.b.c"`` -> ``"a"``)."""
    return (module_name or "").partition(".")[0]


def is_library_module(module_name: str | None) -> bool:
    """Whether a module is installed library code, hashed by name and version rather than by code.

    Parameters
    ----------
    module_name : str or None
        A module's ``__name__`` (``fn.__module__``); the module is looked up in ``sys.modules``.

    Returns
    -------
    bool
        True for built-in and standard-library modules, for modules under site-packages, and for
        modules of installed (not editable) distributions; False for ``__main__`` (a notebook),
        for the user's modules next to the notebook and for editable installs.

    Examples
    --------
    >>> is_library_module("json"), is_library_module("pandas"), is_library_module("__main__")
    (True, True, False)
    """
    return module_origin(module_name) == "library"


def module_origin(module_name: str | None) -> Origin:
    """Whose code a module is: ``"library"``, ``"editable"`` (an editable install) or ``"own"``.

    Examples
    --------
    >>> module_origin("json"), module_origin("__main__")
    ('library', 'own')
    """
    if not module_name or module_name == "__main__" or module_name.startswith("__main__."):
        return "own"
    top = top_package(module_name)
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return "library"
    file = _file_of(module_name)
    key = (module_name, file)
    found = _answers.get(key)
    if found is None:
        found = _decide(top, file)
        if len(_answers) >= _ANSWERS_LIMIT:
            _answers.clear()
        _answers[key] = found
    return found


def _file_of(module_name: str) -> str | None:
    """The module's file, or a namespace package's first folder; None when neither is known."""
    module = sys.modules.get(module_name) or sys.modules.get(top_package(module_name))
    file = getattr(module, "__file__", None)
    if isinstance(file, str) and file:
        return file
    folders = getattr(module, "__path__", None)
    for folder in list(folders) if folders is not None else []:
        if isinstance(folder, str) and folder:
            return folder
    return None


def _decide(top: str, file: str | None) -> Origin:
    if file is None:
        # Built in, frozen, or made at run time without a file (Cython's ``_cython_3_*``
        # modules): nothing a worker could import or a user would edit.
        return "library"
    if os.path.realpath(file).startswith(LIBRARY_ROOTS):
        return "library"
    distributions = _distributions_of(top)
    if not distributions:
        return "own"
    return "editable" if any(_is_editable(d) for d in distributions) else "library"


@functools.lru_cache(maxsize=1)
def _package_distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _distributions_of(top: str) -> list[str]:
    return _package_distributions().get(top, [])


@functools.lru_cache(maxsize=256)
def _is_editable(distribution: str) -> bool:
    """Whether an installed distribution is an editable install (``pip install -e``, PEP 660)."""
    try:
        text = importlib.metadata.distribution(distribution).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not text:
        return False
    try:
        info = json.loads(text)
    except ValueError:  # a broken record says nothing: count the distribution as installed
        return False
    return isinstance(info, dict) and bool((info.get("dir_info") or {}).get("editable"))


def forget() -> None:
    """Drop every remembered answer (after installing or removing packages in a running kernel)."""
    _answers.clear()
    _package_distributions.cache_clear()
    _is_editable.cache_clear()
    version_of.cache_clear()


@functools.lru_cache(maxsize=1024)
def version_of(module_name: str | None) -> str:
    """The version of the distribution a module comes from; the Python version for the stdlib.

    ``"unknown"`` when no installed distribution provides the module: a library is then counted by
    its name alone, and upgrading it doesn't change what depends on its version.

    Examples
    --------
    >>> version_of("json").startswith("python-")
    True
    """
    top = top_package(module_name)
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return f"python-{sys.version.split()[0]}"
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        pass  # the import name differs from the distribution's (``sklearn`` from ``scikit-learn``)
    found = []
    for distribution in _distributions_of(top):
        try:
            found.append(f"{distribution}-{importlib.metadata.version(distribution)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # listed by a stale record but not installed
    return ",".join(found) or "unknown"
