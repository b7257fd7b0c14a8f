"""A function's identity for the cache: a digest that changes when what the function computes may change.

:func:`function_fingerprint` hashes what decides a function's results: its bytecode and constants,
the values of the globals it reads, its closure cells and default arguments, a ``partial``'s
arguments, a callable instance's class and state. It follows the user's own helpers (functions and
classes defined in the notebook or in modules outside the installed packages) recursively, and
counts installed libraries by name and version. Names, file names, line numbers and the docstring
don't count, so re-running an unchanged cell, or moving the function around, keeps its fingerprint.

Values are hashed by their structure (containers, functions, classes) or, through
:mod:`modal_magic.value_digest`, by their pickle; a value that can't be pickled, or whose own code
raises while it is read, counts by its type and ``repr`` with memory addresses removed (that module
says what the cache can't see then). Which modules are the user's and which are libraries is
:func:`modal_magic.code_origin.is_library_module`'s answer, the one shipping uses. A global the function
assigns (``global x; x = ...``, e.g. a lazily built model) is its own state, not an input: it
counts by name only, so building it on the first run doesn't change the fingerprint of the next.
"""

from __future__ import annotations

import builtins
import dis
import functools
import struct
import sys
import types
from hashlib import blake2b
from typing import Any, Callable, Mapping

from .code_origin import is_library_module, top_package, version_of
from .value_digest import SCALARS, all_scalars, is_handle, pickle_digest, scalars_digest, stable_repr, type_path

__all__ = ["function_fingerprint", "register_identity"]

#: bump when the hashing below changes, so old fingerprints can't match new ones
FINGERPRINT_VERSION = 1

#: classes whose instances say for themselves what decides their results (see register_identity)
_IDENTITIES: dict[type, Callable[[Any], Any]] = {}

# A class's bookkeeping that says nothing about behaviour.
_CLASS_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__",
                         "__firstlineno__", "__static_attributes__"})
_GLOBAL_READS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_GLOBAL_WRITES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})
_ATTRIBUTE_READS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
#: containers longer than this that hold only scalars are hashed through pickle, not item by item
_BULK = 64
#: ints wider than this are hashed by their bytes: well under the 4300 decimal digits past which
#: ``repr`` raises (``sys.set_int_max_str_digits``)
_REPR_INT_BITS = 4096
#: kinds the walk takes apart without running any code of the object's: an exception while
#: hashing one of these is a bug in the walk, never the value's doing
_WALKED_KINDS = frozenset({*SCALARS, tuple, list, dict, set, frozenset, types.FunctionType, types.MethodType,
                           types.CodeType, types.ModuleType, types.BuiltinFunctionType})


def function_fingerprint(fn: Callable[..., Any], *, star: bool, result_options: Mapping[str, Any]) -> str:
    """Return a hex digest that identifies what ``fn`` computes, for keying cached results.

    Parameters
    ----------
    fn : callable
        The user's function: a ``def`` or ``lambda``, a ``functools.partial``, a bound method, a
        callable instance, a class or a builtin.
    star : bool
        Whether each row is passed as several arguments (``starmap``).
    result_options : mapping
        The options that change results (``expand``, ``timeout``, the Modal image...), as plain
        values; options that only change speed (``max_containers``, ``batch_size``...) stay out.

    Examples
    --------
    >>> def double(x):
    ...     return 2 * x
    >>> same = function_fingerprint(double, star=False, result_options={})
    >>> def double(x):  # the same cell run again: a new object, the same behaviour
    ...     return 2 * x
    >>> function_fingerprint(double, star=False, result_options={}) == same
    True
    >>> def double(x):
    ...     return x + x + 0
    >>> function_fingerprint(double, star=False, result_options={}) == same
    False
    """
    hasher = FunctionHasher(own_packages=_packages_of(fn))
    hasher.emit("modal_magic-fingerprint", f"{FINGERPRINT_VERSION}/{sys.version_info[0]}.{sys.version_info[1]}")
    hasher.value(fn, top=True)
    hasher.emit("star", b"1" if star else b"0")
    options = sorted(result_options.items(), key=lambda item: str(item[0]))
    hasher.emit("options", str(len(options)))
    for name, value in options:
        hasher.emit("option", str(name))
        hasher.value(value)
    return hasher.hexdigest()


class FunctionHasher:
    """Hashes what a function computes: walks its code, closure, globals and helpers into one digest.

    Not to be confused with :class:`modal_magic.cache.keys.RowKeyHasher`, which hashes millions of
    row *inputs* vectorised per value type; this one walks one object graph, depth first.
    """

    def __init__(self, own_packages: frozenset[str]) -> None:
        self._h = blake2b(digest_size=32)
        self._seen: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps visited objects alive, so an id can't be reused mid-hash
        self._own_packages = own_packages

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def emit(self, tag: str, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        self._h.update(tag.encode() + b"\0" + struct.pack("<Q", len(data)) + data)

    def _first_visit(self, obj: Any) -> bool:
        """True the first time ``obj`` is met; later visits emit a back-reference (cycles, sharing)."""
        index = self._seen.get(id(obj))
        if index is not None:
            self.emit("ref", str(index))
            return False
        self._seen[id(obj)] = len(self._alive)
        self._alive.append(obj)
        return True

    # --- dispatch ------------------------------------------------------------------------------

    def value(self, obj: Any, *, top: bool = False) -> None:
        """Hash ``obj`` into the digest: by structure, code, pickle or type (see the module docstring)."""
        try:
            self._value(obj, top)
        except RecursionError:
            # nested deeper than the interpreter's stack allows: from there on it counts by its type
            self.emit("too-deep", type_path(type(obj)))
        except Exception:
            if type(obj) in _WALKED_KINDS:
                raise  # the walk itself failed on a plain value: a bug here, never hidden as a marker
            # The object's own code (a property, a __getattr__, a metaclass) raised while it was
            # read: it counts by its type and address-free repr, as a value that can't be pickled
            # does (modal_magic.value_digest says what the cache can't see then).
            self.emit("unhashable", stable_repr(obj))

    def _value(self, obj: Any, top: bool) -> None:
        kind = type(obj)
        if kind in SCALARS:
            self._scalar(obj)
        elif (kind is tuple or kind is list or kind is dict) and len(obj) > _BULK and all_scalars(obj):
            self.emit(f"bulk-{kind.__name__}", scalars_digest(obj))  # a vocabulary, a lookup table: at C speed
        elif kind is tuple or kind is list:
            if self._first_visit(obj):
                self.emit(kind.__name__, str(len(obj)))
                for item in obj:
                    self.value(item)
        elif kind is dict:
            if self._first_visit(obj):
                self.emit("dict", str(len(obj)))
                for key, item in list(obj.items()):
                    self.value(key)
                    self.value(item)
        elif kind is set or kind is frozenset:
            # Set order follows string hashing, which changes per process: hash members apart, sort.
            digests = sorted(self._digest_alone(item) for item in obj)
            self.emit(kind.__name__, b"".join(digests))
        elif kind is types.FunctionType:
            self._function(obj, top)
        elif kind is types.MethodType:
            if self._first_visit(obj):
                self.emit("method")
                self.value(obj.__func__, top=top)
                self.value(obj.__self__)
        elif isinstance(obj, functools.partial):
            if self._first_visit(obj):
                self.emit("partial")
                self.value(obj.func, top=top)
                self.value(obj.args)
                self.value(obj.keywords)
                self.value(dict(vars(obj)) if hasattr(obj, "__dict__") else {})
        elif kind is types.BuiltinFunctionType:
            owner = obj.__self__
            if owner is None or _is_module(owner):
                self.emit("builtin", f"{getattr(obj, '__module__', None)}.{obj.__qualname__}")
            else:  # a bound builtin method such as "".join or a_list.append
                self.emit("builtin-method", obj.__name__)
                self.value(owner)
        elif kind is types.ModuleType:
            self._module(obj)
        elif isinstance(obj, type):
            self._class(obj)
        elif kind is types.CodeType:
            self.emit("code", _code_digest(obj, None))
        elif kind is staticmethod or kind is classmethod:
            self.emit(kind.__name__)
            self.value(obj.__func__)
        elif kind is property:
            self.emit("property")
            for accessor in (obj.fget, obj.fset, obj.fdel):
                self.value(accessor)
        elif kind in (types.MethodDescriptorType, types.WrapperDescriptorType, types.MethodWrapperType,
                      types.MemberDescriptorType, types.GetSetDescriptorType, types.ClassMethodDescriptorType):
            owner = getattr(obj, "__objclass__", None) or type(getattr(obj, "__self__", None))
            self.emit("descriptor", f"{type_path(owner)}.{getattr(obj, '__name__', '?')}")
            if kind is types.MethodWrapperType:
                self.value(obj.__self__)
        elif kind in _IDENTITIES:
            if self._first_visit(obj):
                self.emit("identity", type_path(kind))
                self.value(_IDENTITIES[kind](obj))
        elif is_handle(obj):
            # A random generator, a lock, a client or session, a file: its state changes as the
            # program runs (or differs per process) without changing what the function computes.
            self.emit("handle", type_path(kind))
        else:
            self._object(obj)

    def _scalar(self, obj: Any) -> None:
        kind = type(obj)
        if kind is str:
            self.emit("str", obj)
        elif kind is bytes:
            self.emit("bytes", obj)
        elif kind is int and obj.bit_length() > _REPR_INT_BITS:
            # past Python's limit on int -> str conversion (4300 digits) repr raises; the bytes don't
            self.emit("bigint", obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True))
        else:
            self.emit(kind.__name__, repr(obj))

    def _digest_alone(self, obj: Any) -> bytes:
        inner = FunctionHasher(self._own_packages)
        inner.value(obj)
        return inner._h.digest()

    # --- functions, code, modules, classes ------------------------------------------------------

    def _function(self, fn: types.FunctionType, top: bool) -> None:
        if not self._first_visit(fn):
            return
        module = getattr(fn, "__module__", None)
        if not top and is_library_module(module) and top_package(module) not in self._own_packages:
            self.emit("library-function", f"{module}.{fn.__qualname__}")
            self.emit("version", version_of(module))
            return
        code = fn.__code__
        doc = fn.__doc__ if code.co_consts and code.co_consts[0] is fn.__doc__ else None
        self.emit("function", _code_digest(code, doc))
        self.emit("defaults")
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        cells = fn.__closure__ or ()
        self.emit("closure", str(len(cells)))
        for cell in cells:
            try:
                contents = cell.cell_contents
            except ValueError:
                self.emit("empty-cell")
                continue
            self.value(contents)
        reads, writes = _global_names(code)
        namespace = fn.__globals__
        for name, chains in reads:
            self.emit("global", name)
            if name in writes:
                self.emit("own-state")  # see the module docstring: a lazy cache is not an input
            elif name in namespace:
                found = namespace[name]
                self.value(found)
                if _is_module(found):
                    for chain in chains:
                        self._module_attribute(found, chain)
            elif hasattr(builtins, name):
                self.emit("builtin-name")
            else:
                self.emit("undefined")
        if getattr(fn, "__dict__", None):
            self.emit("attributes")
            self.value(dict(fn.__dict__))

    def _module_attribute(self, module: types.ModuleType, chain: tuple[str, ...]) -> None:
        """Hash what ``module.a.b`` names, so ``helpers.clean(x)`` follows edits to ``clean``."""
        found: Any = module
        path = []
        for attribute in chain:
            if not _is_module(found):
                break
            path.append(attribute)
            try:
                found = getattr(found, attribute)
            except AttributeError:
                # not there (yet): deleted since, or defined later; the function will fail reading
                # it too, and defining it changes the fingerprint
                self.emit("missing-attribute", ".".join(path))
                return
            except Exception as e:  # noqa: BLE001 - a module's own __getattr__ (a lazy loader) may raise anything
                # e.g. transformers' lazy modules raise RuntimeError when a submodule can't load:
                # counted by the path and the exception's type, as an object whose code raises is
                self.emit("unreadable-attribute", f"{'.'.join(path)}:{type(e).__name__}")
                return
        if path and not _is_module(found):
            self.emit("attribute", ".".join(path))
            if (module.__name__, path[0]) in _PROCESS_STATE:
                return  # bookkeeping of this process, never what a row computes
            self.value(found)

    def _module(self, module: types.ModuleType) -> None:
        name = module.__name__
        self.emit("module", name)
        if is_library_module(name):
            self.emit("version", version_of(name))

    def _class(self, cls: type) -> None:
        if not self._first_visit(cls):
            return
        module = getattr(cls, "__module__", None)
        if is_library_module(module) and top_package(module) not in self._own_packages:
            self.emit("library-class", f"{module}.{cls.__qualname__}")
            self.emit("version", version_of(module))
            return
        self.emit("class", cls.__qualname__)
        self.emit("bases", str(len(cls.__bases__)))
        for base in cls.__bases__:
            self.value(base)
        for name, member in list(vars(cls).items()):
            if name in _CLASS_SKIP:
                continue
            self.emit("member", name)
            self.value(member)

    def _object(self, obj: Any) -> None:
        if not self._first_visit(obj):
            return
        cls = type(obj)
        if not is_library_module(getattr(cls, "__module__", None)) or top_package(cls.__module__) in self._own_packages:
            # An instance of the user's class (e.g. a callable object): its class's code and its state.
            self.emit("instance")
            self.value(cls)
            state = getattr(obj, "__dict__", None)
            self.value(dict(state) if isinstance(state, dict) else None)
            slots = [name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())
                     if isinstance(name, str) and name not in ("__dict__", "__weakref__")]
            for name in slots:
                self.emit("slot", name)
                self.value(getattr(obj, name, None))
            if isinstance(obj, (list, tuple, dict, set, frozenset, str, bytes, int, float)):
                self.emit("pickled", pickle_digest(obj))  # the builtin part of e.g. class Row(dict)
            return
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None and callable(obj):  # functools.lru_cache and friends
            self.emit("wrapper", type_path(cls))
            self.value(wrapped)
            return
        self.emit("object", type_path(cls))
        self.emit("version", version_of(cls.__module__))
        self.emit("pickled", pickle_digest(obj))


def register_identity(cls: type, identity: Callable[[Any], Any]) -> None:
    """Fingerprint instances of ``cls`` (exactly that class) by ``identity(instance)`` alone.

    For a function object of modal_magic's own whose results are decided by a few values it holds
    (an LLM run's request: template, model, parameters), not by modal_magic's code or version: a
    new version of the library then keeps the results it cached, which is the point for answers
    that cost money. ``identity`` returns plain data (and classes, such as a schema, which are
    walked as usual); the class owning it must change that data when what decides a result changes.

    Examples
    --------
    >>> class Doubler:
    ...     def __init__(self, factor, label):
    ...         self.factor, self.label = factor, label
    ...     def __call__(self, x):
    ...         return x * self.factor
    >>> register_identity(Doubler, lambda d: ("doubler", d.factor))
    >>> same = [function_fingerprint(Doubler(2, label), star=False, result_options={}) for label in "ab"]
    >>> same[0] == same[1], same[0] == function_fingerprint(Doubler(3, "a"), star=False, result_options={})
    (True, False)
    >>> del _IDENTITIES[Doubler]
    """
    _IDENTITIES[cls] = identity


def _is_module(obj: Any) -> bool:
    """``isinstance(obj, ModuleType)`` without asking the object (whose ``__class__`` may be a property that raises)."""
    return issubclass(type(obj), types.ModuleType)


# --- bytecode ---------------------------------------------------------------------------------------

_code_digests: dict[tuple[types.CodeType, Any], bytes] = {}
_code_globals: dict[types.CodeType, tuple[tuple[tuple[str, tuple[tuple[str, ...], ...]], ...], frozenset[str]]] = {}
_MEMO_LIMIT = 4096


#: module attributes that hold the process's own bookkeeping: ``sys.modules`` grows whenever anything
#: is imported (an LLM client's first request imports a dozen modules), so hashing it made a
#: function that reads it get a new fingerprint, and miss the cache, on every run
_PROCESS_STATE = frozenset({("sys", "modules"), ("sys", "path_importer_cache")})


def _code_digest(code: types.CodeType, docstring: str | None) -> bytes:
    """Digest of what a code object does: bytecode, constants, names; not its name, file or lines."""
    key = (code, docstring)
    found = _code_digests.get(key)
    if found is not None:
        return found
    consts = list(code.co_consts)
    if docstring is not None:
        consts[0] = None
    h = FunctionHasher(frozenset())
    h.emit("code", struct.pack("<5q", code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                               code.co_flags, len(consts)))
    h.emit("bytecode", code.co_code)
    h.emit("exceptions", getattr(code, "co_exceptiontable", b""))
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        h.emit("names", "\0".join(names))
    for const in consts:
        if type(const) is types.CodeType:
            h.emit("nested", _code_digest(const, None))
        else:
            h.value(const)
    digest = h._h.digest()
    if len(_code_digests) > _MEMO_LIMIT:
        _code_digests.clear()
    _code_digests[key] = digest
    return digest


def _global_names(code: types.CodeType) -> tuple[tuple[tuple[str, tuple[tuple[str, ...], ...]], ...], frozenset[str]]:
    """The globals a code object (and the functions nested in it) reads, in order, and those it assigns.

    Each read comes with the attribute chains that follow it (``np.linalg.norm`` gives
    ``("np", (("linalg", "norm"),))``), so a module global can be followed to what is used of it.
    """
    found = _code_globals.get(code)
    if found is not None:
        return found
    reads: dict[str, dict[tuple[str, ...], None]] = {}
    writes: set[str] = set()
    pending = [code]
    while pending:
        current = pending.pop(0)
        instructions = list(dis.get_instructions(current))
        for i, instruction in enumerate(instructions):
            if instruction.opname in _GLOBAL_READS:
                chain = []
                for following in instructions[i + 1:]:
                    if following.opname not in _ATTRIBUTE_READS:
                        break
                    chain.append(following.argval)
                reads.setdefault(instruction.argval, {})[tuple(chain)] = None
            elif instruction.opname in _GLOBAL_WRITES:
                writes.add(instruction.argval)
        pending.extend(c for c in current.co_consts if type(c) is types.CodeType)
    result = (tuple((name, tuple(chain for chain in chains if chain)) for name, chains in reads.items()),
              frozenset(writes))
    if len(_code_globals) > _MEMO_LIMIT:
        _code_globals.clear()
    _code_globals[code] = result
    return result


# --- which package the mapped function comes from ------------------------------------------------


def _packages_of(fn: Any) -> frozenset[str]:
    """The top-level package the mapped function comes from: its own helpers are hashed by code too."""
    target = fn
    for _ in range(8):  # unwrap partials and bound methods
        if isinstance(target, functools.partial):
            target = target.func
        elif isinstance(target, types.MethodType):
            target = target.__func__
        else:
            break
    module = getattr(target, "__module__", None)
    if not isinstance(module, str) or module == "__main__":
        module = getattr(type(target), "__module__", None)
    top = top_package(module if isinstance(module, str) else None)
    return frozenset({top}) if top and top not in ("__main__", "builtins") else frozenset()


