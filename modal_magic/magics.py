"""The IPython face of modal_magic: the ``%%modal_map`` cell magic and its ``%config`` defaults.

``%%modal_map reviews.text --into sentiment`` runs the cell in the user namespace, picks the function
to map (the last top-level ``def``, or ``--fn NAME``), resolves ``DF.COLUMN`` there, and makes one
call into :func:`modal_magic.engine.map_frame`; the result and error columns are then added to ``DF``
in place, or bound to a new name with ``-o NAME``. The magic is a thin adapter: :func:`parse_line`
turns the line into a frozen :class:`CellArgs`, :meth:`ModalMagic.modal_map` resolves names and
binds the result. Every option of :class:`~modal_magic.options.MapOptions` is both a flag and a
traitlet on :class:`ModalMagic`, so ``%config ModalMagic.backend = "threads"`` (or an IPython profile)
sets the default a flag overrides. Mistakes a user can fix raise ``UsageError``: one line, no traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, kwds, magic_arguments
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, Union, validate

from . import options as _options
from .errors import ModalSetupError
from .checks import FunctionError, default_into
from .engine import map_frame
from .retry import rerun_failed
from .runs import RunSpec, runs_columns
from .errors import MapInterrupted
from .options import DEFAULT_BACKEND, OPTION_NAMES, MapOptions, OptionsError

__all__ = ["CellArgs", "ModalMagic", "load", "parse_line", "unload"]

# One sentence per option, shared by the flag's help (`%%modal_map?`) and the traitlet's (`%config ModalMagic`).
_HELP: dict[str, str] = {
    "backend": "Where rows run: 'local' (worker processes), 'threads', 'sequential', 'modal', "
               "or 'modal:APP/FUNCTION' for a deployed Modal function.",
    "gpu": "GPU for each Modal container: 'T4', 'A100-80GB', 'H100:2'...; several are fallbacks, in order.",
    "cpu": "CPU cores reserved for each Modal container.",
    "memory": "Memory for each Modal container, in MiB.",
    "image": "Name of a modal.Image variable in the notebook for the containers to run.",
    "pip": "Packages to pip-install into the Modal image.",
    "apt": "Debian packages to apt-install into the Modal image.",
    "python_version": "Python version of the Modal image, e.g. 3.11.",
    "secrets": "Name of a Modal secret whose variables the function sees.",
    "env": "Environment variables the function sees, KEY=VALUE.",
    "volumes": "Modal volumes to mount, /PATH=VOLUME_NAME.",
    "timeout": "Seconds one row may run before it fails.",
    "retries": "Extra tries for a row that raises or whose worker was lost.",
    "max_containers": "Rows running at once: Modal containers, or local workers (default: the core count).",
    "batch_size": "Rows sent to a worker or container at a time (default: sized from measured row times).",
    "order_outputs": "Have the backend return rows in order; results join back by position either way.",
    "on_error": "'capture': a failed row gets an error in <into>_error; 'raise': stop at the first failed row.",
    "cache": "Reuse stored results of rows that already ran; 'refresh' recomputes and stores them again.",
    "progress": "Show a progress bar.",
    "sample": "Run on the first N rows only, to try the function out.",
    "expand": "Spread dict results into one column per key.",
    "overwrite": "Replace columns of the DataFrame that the result would overwrite.",
}

# How each option is spelled on the magic's line, for messages that name it.
_FLAGS: dict[str, str] = {name: "--" + name.replace("_", "-") for name in (*OPTION_NAMES, "into")}
_FLAGS.update(secrets="--secret", volumes="--volume")


def _flag_help(name: str) -> str:
    # argparse %-formats help strings, hence the doubled %.
    return f"{_HELP[name]} Default: %%config ModalMagic.{name}"


@dataclass(frozen=True)
class CellArgs:
    """What a ``%%modal_map`` line asks for, parsed but not yet resolved in the user namespace.

    Examples
    --------
    >>> args = parse_line("reviews.text --into sentiment --retries 2")
    >>> args.frame, args.columns, args.into, dict(args.options)
    ('reviews', ('text',), 'sentiment', {'retries': 2})
    """

    frame: str  # the DataFrame's name in the user namespace
    columns: tuple[str, ...]  # the column(s) whose values are passed to the function
    star: bool  # --columns: one argument per column (starmap)
    into: str | None = None  # the result column's name (default: the function's name)
    output: str | None = None  # -o NAME: bind a new DataFrame to NAME and leave the frame as it is
    fn: str | None = None  # --fn NAME: the function to map (default: the cell's last top-level def)
    retry_failed: bool = False  # --retry-failed: run only DF's failed rows for INTO
    options: Mapping[str, Any] = field(default_factory=dict)  # only the option flags given on the line

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def errors_call(self) -> str:
        """What the user types to see every failed row of the result."""
        return f"{self.output or self.frame}.modal.errors()"


@magics_class
class ModalMagic(Magics):
    """``%%modal_map``; every traitlet is the default of the option (and flag) of the same name."""

    backend = Unicode(DEFAULT_BACKEND, help=_HELP["backend"]).tag(config=True)
    gpu = Union([Unicode(), List(Unicode())], default_value=None, allow_none=True, help=_HELP["gpu"]).tag(config=True)
    cpu = Float(None, allow_none=True, help=_HELP["cpu"]).tag(config=True)
    memory = Int(None, allow_none=True, help=_HELP["memory"]).tag(config=True)
    image = Unicode(None, allow_none=True, help=_HELP["image"]).tag(config=True)
    pip = List(Unicode(), help=_HELP["pip"]).tag(config=True)
    apt = List(Unicode(), help=_HELP["apt"]).tag(config=True)
    python_version = Unicode(None, allow_none=True, help=_HELP["python_version"]).tag(config=True)
    secrets = List(Unicode(), help="Names of Modal secrets whose variables the function sees.").tag(config=True)
    env = Dict(key_trait=Unicode(), value_trait=Unicode(), help=_HELP["env"]).tag(config=True)
    volumes = Dict(key_trait=Unicode(), value_trait=Unicode(), help=_HELP["volumes"]).tag(config=True)
    timeout = Float(None, allow_none=True, help=_HELP["timeout"]).tag(config=True)
    retries = Int(0, help=_HELP["retries"]).tag(config=True)
    max_containers = Int(None, allow_none=True, help=_HELP["max_containers"]).tag(config=True)
    batch_size = Int(None, allow_none=True, help=_HELP["batch_size"]).tag(config=True)
    order_outputs = Bool(False, help=_HELP["order_outputs"]).tag(config=True)
    on_error = Enum(["capture", "raise"], "capture", help=_HELP["on_error"]).tag(config=True)
    cache = Union([Bool(), Enum(["refresh"])], default_value=True, help=_HELP["cache"]).tag(config=True)
    progress = Bool(True, help=_HELP["progress"]).tag(config=True)
    sample = Int(None, allow_none=True, help=_HELP["sample"]).tag(config=True)
    expand = Bool(False, help=_HELP["expand"]).tag(config=True)
    overwrite = Bool(False, help=_HELP["overwrite"]).tag(config=True)

    @validate(*OPTION_NAMES)
    def _validate_option(self, proposal: dict[str, Any]) -> Any:
        """Check a configured default the way MapOptions checks the option, when it is set."""
        name, value = proposal["trait"].name, proposal["value"]
        if name == "image":  # a variable's name; the variable itself is looked up at each run
            if value is not None and not value.isidentifier():
                raise TraitError(f"ModalMagic.image={value!r}: expected the name of a modal.Image variable")
            return value
        try:
            # Each option alone: combinations (gpu with a local backend...) are checked at run time.
            _options.check_option(name, value)
        except OptionsError as error:
            raise TraitError(f"ModalMagic.{name}: {error}") from None
        return value

    def option_defaults(self) -> dict[str, Any]:
        """The options a flag left out takes: this object's traitlets, by option name."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    @magic_arguments()
    @kwds(argument_default=argparse.SUPPRESS)  # a flag left out is absent, so its traitlet applies
    @argument("target", metavar="DF.COLUMN",
              help="The DataFrame and the column to map over (just DF with --columns).")
    @argument("--columns", nargs="+", metavar="COLUMN",
              help="Starmap: call the function with one argument per column, in this order.")
    @argument("--into", metavar="NAME", help="The result column's name (default: the function's name); "
                                             "errors go to NAME_error.")
    @argument("-o", "--output", metavar="NAME",
              help="Bind the result to a new DataFrame NAME and leave DF unchanged.")
    @argument("--fn", metavar="NAME", help="The function to map (default: the last top-level def in the cell).")
    @argument("--retry-failed", action="store_true",
              help="Run only the rows of DF whose INTO_error holds an error (with this cell's function "
                   "and flags, e.g. more --retries), and fill their results in.")
    @argument_group("Where rows run")
    @argument("--backend", help=_flag_help("backend"))
    @argument("--gpu", nargs="+", action="extend", metavar="GPU", help=_flag_help("gpu"))
    @argument("--cpu", type=float, metavar="CORES", help=_flag_help("cpu"))
    @argument("--memory", type=int, metavar="MIB", help=_flag_help("memory"))
    @argument("--image", metavar="NAME", help=_flag_help("image"))
    @argument("--pip", nargs="+", action="extend", metavar="PACKAGE", help=_flag_help("pip"))
    @argument("--apt", nargs="+", action="extend", metavar="PACKAGE", help=_flag_help("apt"))
    @argument("--python-version", metavar="X.Y", help=_flag_help("python_version"))
    @argument("--secret", dest="secrets", action="append", metavar="NAME",
              help=_flag_help("secrets").replace("Default", "Repeatable. Default"))
    @argument("--env", action="append", metavar="KEY=VALUE",
              help=_flag_help("env").replace("Default", "Repeatable. Default"))
    @argument("--volume", dest="volumes", action="append", metavar="/PATH=NAME",
              help=_flag_help("volumes").replace("Default", "Repeatable. Default"))
    @argument_group("How rows run")
    @argument("--timeout", type=float, metavar="SECONDS", help=_flag_help("timeout"))
    @argument("--retries", type=int, metavar="N", help=_flag_help("retries"))
    @argument("--max-containers", type=int, metavar="N", help=_flag_help("max_containers"))
    @argument("--batch-size", type=int, metavar="N", help=_flag_help("batch_size"))
    @argument("--order-outputs", action=argparse.BooleanOptionalAction, help=_flag_help("order_outputs"))
    @argument("--on-error", choices=["capture", "raise"], help=_flag_help("on_error"))
    @argument("--cache", dest="cache", action="store_const", const=True, help=_flag_help("cache"))
    @argument("--no-cache", dest="cache", action="store_const", const=False,
              help="Recompute every row and store nothing.")
    @argument("--cache-refresh", dest="cache", action="store_const", const="refresh",
              help="Recompute every row and store the new results.")
    @argument("--progress", action=argparse.BooleanOptionalAction, help=_flag_help("progress"))
    @argument("--sample", type=int, metavar="N", help=_flag_help("sample"))
    @argument_group("Result")
    @argument("--expand", action=argparse.BooleanOptionalAction, help=_flag_help("expand"))
    @argument("--overwrite", action=argparse.BooleanOptionalAction, help=_flag_help("overwrite"))
    @cell_magic
    def modal_map(self, line: str, cell: str) -> None:
        """Map the function this cell defines over a DataFrame column, in parallel.

        The cell runs in the notebook's namespace (its functions stay defined); the function
        mapped is the cell's last top-level ``def``, or ``--fn NAME``. The result and error
        columns (``INTO`` and ``INTO_error``) are added to DF in place, or to a new DataFrame
        bound to ``-o NAME``. Failed rows: ``DF.modal.errors()``.

        Every option defaults to its ``ModalMagic`` traitlet, e.g.
        ``%config ModalMagic.backend = "threads"``.

        Examples::

            %%modal_map reviews.text --into sentiment --max-containers 8 --retries 2
            def classify(text):
                ...

            %%modal_map reviews --columns text lang --into translated -o out
            def translate(text, lang):
                ...
        """
        args = parse_line(line)
        user_ns = self.shell.user_ns
        frame = _resolve_frame(user_ns, args)
        options = self._options(args)
        fn = self._define_function(cell, args.fn)
        into = args.into if args.into is not None else default_into(fn)
        try:
            if args.retry_failed:
                out = self._retry_failed(frame, fn, args, into, options)
            else:
                out = map_frame(frame, fn, columns=list(args.columns), star=args.star, into=into,
                                options=options, errors_call=args.errors_call)
        except (OptionsError, FunctionError, ModalSetupError) as error:  # caught before any row ran
            raise UsageError(_in_flag_words(str(error))) from None
        except MapInterrupted as stopped:  # Stop pressed: keep what finished, then say it stopped
            _bind(user_ns, args, frame, stopped.result, into=into, options=options)
            raise
        _bind(user_ns, args, frame, out, into=into, options=options)

    @cell_magic
    def modal_llm(self, line: str, cell: str) -> None:
        """Send the cell (a prompt template with {column} fields) to a chat model once per row."""
        from .llm import run_llm_cell

        run_llm_cell(self, line, cell)

    def _retry_failed(self, frame: pd.DataFrame, fn: Callable[..., Any], args: CellArgs, into: str,
                      options: MapOptions) -> pd.DataFrame:
        error_column = f"{into}_error"
        if error_column not in frame.columns:
            raise UsageError(f"--retry-failed: {args.frame} has no column {error_column!r} yet; run the cell "
                             f"once without --retry-failed (or name the result with --into)")
        result_columns = runs_columns(frame, into) or (into,)
        spec = RunSpec(fn=fn, columns=tuple(args.columns), star=args.star, options=options,
                       error_column=error_column, result_columns=result_columns)
        return rerun_failed(frame, into, spec)

    def _options(self, args: CellArgs) -> MapOptions:
        values = {**self.option_defaults(), **args.options}
        if values["image"] is not None:
            name = values["image"]
            values["image"] = _lookup(self.shell.user_ns, name, flag="--image", kind="a modal.Image")
            if type(values["image"]).__name__ != "Image":
                raise UsageError(f"--image {name}: {name} is a {type(values['image']).__name__}, not a modal.Image")
        try:
            return MapOptions.create(**values)
        except OptionsError as error:
            raise UsageError(_in_flag_words(str(error))) from None

    def _define_function(self, cell: str, fn_name: str | None) -> Callable[..., Any]:
        """Run the cell in the user namespace; return the function it names or defines last.

        Running it there makes the functions ``__main__`` functions, which cloudpickle sends by
        value: worker processes and Modal containers need no copy of the notebook.
        """
        source = self.shell.transform_cell(cell)
        # Cached under a name IPython knows, so tracebacks and syntax errors show the cell's lines.
        filename = self.shell.compile.cache(source, self.shell.execution_count, raw_code=cell)
        try:
            tree = self.shell.compile.ast_parse(source, filename=filename)
        except SyntaxError as error:  # raised from inside a magic, IPython would show its whole stack
            raise UsageError(_syntax_error_text(error)) from None
        defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if fn_name is None and not defined:
            raise UsageError("the cell defines no function: write the function to map in it as a `def` "
                             "(the last top-level def is used), or name one with --fn NAME")
        exec(self.shell.compile(tree, filename, "exec"), self.shell.user_global_ns, self.shell.user_ns)
        if fn_name is None:
            return self.shell.user_ns[defined[-1]]
        fn = _lookup(self.shell.user_ns, fn_name, flag="--fn", kind="a function", preferred=callable)
        if not callable(fn):
            raise UsageError(f"--fn {fn_name}: {fn_name} is a {type(fn).__name__}, not a function")
        return fn


def parse_line(line: str) -> CellArgs:
    """Parse the ``%%modal_map`` line into :class:`CellArgs`; raise ``UsageError`` for a bad one.

    Examples
    --------
    >>> args = parse_line("df --columns a b --gpu T4 A10G --env KEY=v -o out --backend modal:app/fn")
    >>> args.columns, args.star, args.output, args.options["gpu"], args.options["env"]
    (('a', 'b'), True, 'out', ['T4', 'A10G'], {'KEY': 'v'})
    """
    try:
        argv = shlex.split(line)
    except ValueError as error:  # e.g. "No closing quotation"
        raise UsageError(f"can't read the %%modal_map line: {error}") from None
    parser = ModalMagic.modal_map.parser
    parsed, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(_unknown_argument(unknown, parser))
    given = vars(parsed)
    frame, _, column = given.pop("target").partition(".")
    if not frame.isidentifier():
        raise UsageError(f"{frame!r} is not a variable name: write DF.COLUMN, e.g. reviews.text")
    columns = given.pop("columns", None)
    if columns and column:
        raise UsageError(f"give the column once: {frame}.{column}, or {frame} --columns {' '.join(columns)}")
    if not columns and not column:
        raise UsageError(f"which column? write {frame}.COLUMN, or {frame} --columns A B to pass several")
    for name, flag in (("output", "-o"), ("fn", "--fn")):
        if name in given and not given[name].isidentifier():
            raise UsageError(f"{flag} {given[name]!r}: expected a variable name")
    options = option_flags(given)
    return CellArgs(
        frame=frame,
        columns=tuple(columns) if columns else (column,),
        star=bool(columns),
        into=given.get("into"),
        output=given.get("output"),
        fn=given.get("fn"),
        retry_failed=bool(given.get("retry_failed")),
        options=options,
    )


def option_flags(given: Mapping[str, Any]) -> dict[str, Any]:
    """The option flags among parsed arguments, in the options' own shapes (``--env K=V`` -> a dict...).

    Shared by ``%%modal_map`` and ``%%modal_llm``, whose flags for the options are the same.
    """
    options = {name: value for name, value in given.items() if name in OPTION_NAMES}
    if "env" in options:
        options["env"] = _pairs(options["env"], flag="--env", form="KEY=VALUE")
    if "volumes" in options:
        options["volumes"] = _pairs(options["volumes"], flag="--volume", form="/PATH=VOLUME_NAME")
    if options.get("gpu") is not None and len(options["gpu"]) == 1:
        options["gpu"] = options["gpu"][0]
    return options


def _syntax_error_text(error: SyntaxError) -> str:
    """``SyntaxError`` as a line number, the message, and the offending line with a caret."""
    text = f"{type(error).__name__} in the cell, line {error.lineno}: {error.msg}"
    if error.text:
        text += f"\n    {error.text.rstrip()}\n    {' ' * max((error.offset or 1) - 1, 0)}^"
    return text


def _pairs(items: list[str], *, flag: str, form: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: expected {form}")
        pairs[key] = value
    return pairs


def _unknown_argument(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    first = unknown[0]
    if not first.startswith("-"):
        return f"unexpected {first!r} on the line: give one DF.COLUMN, and values only after flags that take them"
    known = [s for action in parser._actions for s in action.option_strings]
    close = difflib.get_close_matches(first.split("=")[0], known, n=1)
    return f"unknown flag {first}" + (f"; did you mean {close[0]}?" if close else "; see %%modal_map? for the flags")


def _lookup(user_ns: dict[str, Any], name: str, *, flag: str, kind: str,
            preferred: Callable[[Any], bool] = lambda value: True) -> Any:
    """``user_ns[name]``, or a UsageError suggesting the closest names of the right kind."""
    if name in user_ns:
        return user_ns[name]
    candidates = [k for k, v in user_ns.items() if not k.startswith("_") and preferred(v)]
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UsageError(f"{flag} {name}: nothing named {name!r} is defined in the notebook (expected {kind}){hint}")


def _resolve_frame(user_ns: dict[str, Any], args: CellArgs) -> pd.DataFrame:
    """The DataFrame ``args.frame`` names, after checking it has the columns asked for."""
    name = args.frame
    if name not in user_ns:
        frames = [k for k, v in user_ns.items() if isinstance(v, pd.DataFrame) and not k.startswith("_")]
        close = difflib.get_close_matches(name, frames, n=3)
        if close:
            hint = f"; did you mean {' or '.join(close)}?"
        elif frames:
            hint = f"; DataFrames defined: {', '.join(sorted(frames)[:10])}"
        else:
            hint = "; define it (e.g. with pd.read_csv) before this cell"
        raise UsageError(f"no DataFrame named {name!r} in the notebook{hint}")
    frame = user_ns[name]
    if isinstance(frame, pd.Series):
        raise UsageError(f"{name} is a Series, not a DataFrame: use {name}.to_frame(), or {name}.modal.map(fn)")
    if not isinstance(frame, pd.DataFrame):
        raise UsageError(f"{name} is a {type(frame).__name__}, not a pandas DataFrame")
    for column in args.columns:
        if column in frame.columns:
            continue
        names = [str(c) for c in frame.columns]
        close = difflib.get_close_matches(column, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"{name} has no column {column!r}: {hint}its columns are {', '.join(map(repr, names))}")
    return frame


def _bind(user_ns: dict[str, Any], args: CellArgs, frame: pd.DataFrame, out: pd.DataFrame, *,
          into: str, options: MapOptions) -> None:
    """Put the result where the line asked: a new name with ``-o``, else new columns on ``frame``."""
    if args.output is not None:
        user_ns[args.output] = out
        return
    for name in _result_columns(frame, out, into, options):
        frame[name] = _full_length(out[name], frame.index)
    runs = out.attrs.get(RunSpec.ATTRS_KEY)
    if runs:  # so DF.modal.retry_failed() knows how its columns were made
        frame.attrs[RunSpec.ATTRS_KEY] = {**frame.attrs.get(RunSpec.ATTRS_KEY, {}), **runs}


def _result_columns(frame: pd.DataFrame, out: pd.DataFrame, into: str, options: MapOptions) -> list[Any]:
    """The columns the run added to (or replaced in) ``frame`` to make ``out``."""
    error_column = f"{into}_error"
    if not options.expand:
        return [into, error_column]
    added = [c for c in out.columns if c not in frame.columns]
    if options.overwrite:  # dict keys may have replaced existing columns: those that changed
        rows = frame.iloc[: len(out)]
        added += [c for c in frame.columns if c not in added and not out[c].equals(rows[c])]
    if error_column not in added:
        added.append(error_column)
    return added


def _full_length(column: pd.Series, index: pd.Index) -> pd.Series:
    """``column`` on ``index``, matched by position; rows beyond a ``--sample`` are missing.

    A Series with the frame's own index keeps its dtype when assigned (a bare object array of
    RowErrors would be re-inferred as strings by pandas 3), and matching by position makes
    duplicate labels safe.
    """
    if len(column) < len(index):
        column = column.reset_index(drop=True).reindex(pd.RangeIndex(len(index)))
    return column.set_axis(index)


def _in_flag_words(message: str) -> str:
    """Say ``--max-containers 0`` where a shared options message says ``max_containers=0``.

    Examples
    --------
    >>> _in_flag_words("pass overwrite=True to replace it, or into='another_name'")
    'pass --overwrite to replace it, or --into another_name'
    """
    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        spelled = _FLAGS[name]
        if value == "True":
            return spelled
        if value == "False":
            return "--no-" + spelled[2:]
        if name == "cache" and value.strip("'\"") == "refresh":
            return "--cache-refresh"
        if not value:
            return spelled
        return f"{spelled} {value.strip(chr(39) + chr(34))}"

    return _OPTION_IN_MESSAGE.sub(flag, message)


_OPTION_IN_MESSAGE = re.compile(
    r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")=('[^']*'|\"[^\"]*\"|[\w.+-]*)"
)


def _modal_llm_help() -> None:
    from .llm import magic_help

    ModalMagic.modal_llm.__doc__ = magic_help()


_modal_llm_help()


def load(ipython: Any) -> None:
    """Register ``%%modal_map`` (``%load_ext modal_magic`` calls this); loading twice keeps one copy."""
    unload(ipython)
    ipython.register_magics(ModalMagic)


def unload(ipython: Any) -> None:
    """Remove ``%%modal_map`` and its ``%config`` entry (``%unload_ext modal_magic`` calls this)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop(ModalMagic.__name__, None)
    if magics is None:
        return
    for kind, table in magics.magics.items():
        for name, func in table.items():
            if manager.magics[kind].get(name) == func:
                del manager.magics[kind][name]
    if magics in ipython.configurables:
        ipython.configurables.remove(magics)
