"""Digests of the values a function fingerprint doesn't take apart: library objects, scalar tables, handles.

:class:`~modal_magic.fingerprint.FunctionHasher` walks the user's own code and containers item by
item; what it meets beyond that is summed up here. A library object counts by its pickle (streamed
into the hash, never held in memory twice), a long container of plain scalars by one pickle at C
speed, and an object whose state says nothing about what a function computes (a random generator,
a lock, a client or session, a file) by its type alone.

**A value that can't be hashed.** Pickling and ``repr`` run the object's own code (``__reduce__``,
``__getstate__``, ``__repr__``), which may raise anything. Such a value then counts by its type and
its ``repr`` with memory addresses removed; an object whose ``repr`` raises too counts by its type
alone. Its state changing is then not seen by the cache: a function that depends on such a value
should take it as an argument (or the user passes ``cache="refresh"``).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import sys
from hashlib import blake2b
from typing import Any

from .code_origin import is_library_module, top_package

__all__ = ["all_scalars", "is_handle", "pickle_digest", "scalars_digest", "stable_repr", "type_path"]

#: what makes a repr differ between processes: memory addresses, in hex or (``id()``) in decimal
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}|(?<![0-9.])[0-9]{12,}(?![0-9.])")
SCALARS = (type(None), bool, int, float, complex, str, bytes)
_SCALAR_SET = frozenset(SCALARS)
#: library packages whose objects are connections to the outside (clients, sessions, channels):
#: which server answers is in the request a function builds, never in the client object's state
_HANDLE_PACKAGES = frozenset({"httpx", "requests", "aiohttp", "urllib3", "openai", "anthropic", "grpc",
                              "grpclib", "modal", "ssl", "socket", "selectors", "sqlite3", "multiprocessing",
                              "concurrent", "asyncio", "threading", "queue", "logging", "weakref", "io", "_io"})


class _HashWriter(io.RawIOBase):
    """A file-like sink that hashes what a pickler writes, so a large global is never held twice."""

    def __init__(self) -> None:
        self.h = blake2b(digest_size=16)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.h.update(data)
        return len(data)


def pickle_digest(obj: Any) -> bytes:
    """Hash of ``obj``'s pickle (cloudpickle for what pickle refuses), else of its address-free repr.

    Examples
    --------
    >>> pickle_digest([1, 2]) == pickle_digest([1, 2]), pickle_digest([1, 2]) == pickle_digest([2, 1])
    (True, False)
    """
    import cloudpickle

    for pickler in (pickle.Pickler, cloudpickle.Pickler):
        sink = _HashWriter()
        try:
            pickler(sink, protocol=5).dump(obj)
        except Exception:  # noqa: BLE001 - the object's own __reduce__/__getstate__ refused, with any type
            continue  # the next pickler, then the repr (see the module docstring)
        return b"p" + sink.h.digest()
    return b"r" + stable_repr(obj).encode("utf-8", "surrogatepass")


def all_scalars(obj: tuple | list | dict) -> bool:
    """Whether a tuple, list or dict holds only plain scalars (keys and values for a dict)."""
    if type(obj) is dict:
        return all(type(k) in _SCALAR_SET for k in obj) and all(type(v) in _SCALAR_SET for v in obj.values())
    return all(type(item) in _SCALAR_SET for item in obj)


def scalars_digest(obj: tuple | list | dict) -> bytes:
    """Digest of a container of plain scalars; without pickle's memo, so identity doesn't count."""
    sink = _HashWriter()
    pickler = pickle.Pickler(sink, protocol=5)
    pickler.fast = True
    pickler.dump(obj)
    return sink.h.digest()


def stable_repr(obj: Any) -> str:
    """``obj``'s type and ``repr`` with memory addresses removed: the same in every process.

    Examples
    --------
    >>> stable_repr(object()).startswith("builtins.object:<object object at 0x?>")
    True
    """
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - the object's own __repr__ raised, with any type
        text = "<unrepresentable>"  # it counts by its type alone (see the module docstring)
    return f"{type_path(type(obj))}:{_ADDRESS.sub('0x?', text)}"


def type_path(cls: Any) -> str:
    """``module.QualifiedName`` of a class (``?`` for what it lacks)."""
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', '?'))}"


@functools.lru_cache(maxsize=2)
def _handle_types(with_numpy: bool) -> tuple[type, ...]:
    import random
    import threading

    found: list[type] = [random.Random, type(threading.Lock()), type(threading.RLock()), io.IOBase]
    if with_numpy:  # only when the program imported it: hashing must not import numpy
        numpy = sys.modules["numpy"]
        found += [numpy.random.Generator, numpy.random.RandomState, numpy.random.BitGenerator]
    return tuple(found)


def is_handle(obj: Any) -> bool:
    """Whether ``obj`` is a library object whose state is not an input to what a function computes.

    Random generators (whose state moves with every draw: ``random.random`` is a bound method of
    one, and any helper that retries with jitter reaches it), locks, files, and the objects of
    networking, concurrency and logging libraries. The user's own classes are never handles.

    Examples
    --------
    >>> import random, threading
    >>> is_handle(random.Random(1)), is_handle(threading.Lock()), is_handle([1])
    (True, True, False)
    """
    cls = type(obj)
    module = getattr(cls, "__module__", None)
    if not is_library_module(module):
        return False
    if top_package(module) in _HANDLE_PACKAGES:
        return True
    return isinstance(obj, _handle_types("numpy" in sys.modules))
