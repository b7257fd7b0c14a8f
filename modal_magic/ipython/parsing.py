"""What every modal_magic cell magic shares: its line's grammar, option flags, name lookups and binding.

The magics (:mod:`~modal_magic.ipython.map_magic`, :mod:`~modal_magic.ipython.llm_magic`) are thin
adapters; everything they have in common lives here. Flags, traitlets and help are generated from
the options' declarations (:data:`modal_magic.options.OPTIONS`, :data:`modal_magic.llm.LLM_OPTIONS`):
:func:`add_option_flags` turns each :class:`~modal_magic.declarations.Option` into its argparse flag,
:func:`option_traits` into its ``%config`` traitlet, and :func:`option_flags` reads the parsed
flags back into the options' own shapes. Names on the line are resolved in the user namespace with
did-you-mean hints (:func:`lookup`, :func:`resolve_frame`), results are put back where the line
asked (:func:`bind`), and every mistake a user can fix becomes a one-line ``UsageError``, in flag
words (:func:`in_flag_words`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import shlex
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser
from traitlets import Bool, Dict, Enum, Float, Int, List, TraitType, Unicode, Union

from ..runs import RunSpec
from ..errors import OptionsError
from ..llm.options import LLM_OPTIONS
from .. import join
from ..options import OPTIONS, MapOptions

if TYPE_CHECKING:
    from ..declarations import Option

__all__ = [
    "CellArgs",
    "add_option_flags",
    "bind",
    "define_function",
    "in_flag_words",
    "lookup",
    "make_parser",
    "map_options",
    "option_flags",
    "option_traits",
    "parse_known",
    "resolve_frame",
    "split_line",
    "syntax_error_text",
]


@dataclass(frozen=True)
class CellArgs:
    """What a magic's line asks for, parsed but not yet resolved in the user namespace.

    Examples
    --------
    >>> from modal_magic.ipython.map_magic import parse_line
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
    background: bool = False  # --background: run as a MapJob, fill the columns in when it ends
    estimate: bool = False  # --estimate: time a sample (--sample N, default 200) and project the run
    options: Mapping[str, Any] = field(default_factory=dict)  # only the option flags given on the line

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def errors_call(self) -> str:
        """What the user types to see every failed row of the result."""
        return f"{self.output or self.frame}.modal.errors()"


# --- the line's grammar ----------------------------------------------------------------------------------


def make_parser(magic: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser for ``%%magic``: flags left out are absent, abbreviations are refused.

    Examples
    --------
    >>> make_parser("modal_map", "Map a function.").format_usage().split()[1]
    '%%modal_map'
    """
    # MagicArgumentParser raises UsageError instead of exiting; its help formatter prefixes the
    # usage line with one "%", so the prog carries the other: a cell magic reads %%name.
    parser = MagicArgumentParser(prog=f"%{magic}", description=description, argument_default=argparse.SUPPRESS,
                                 add_help=False)
    # An abbreviation (--max-container for --max-containers) would silently mean some other flag
    # once a longer one is added; refused, it gets a did-you-mean from parse_known instead.
    parser.allow_abbrev = False
    return parser


def _flag_help(o: Option, config_class: str | None) -> str:
    text = o.help
    if o.flag is not None and o.flag.form in ("repeat", "pairs"):
        text += " Repeatable."
    if config_class is not None:
        text += f" Default: %%config {config_class}.{o.name}"  # argparse %-formats help, hence %%
    elif o.default not in (None, (), {}):
        text += f" Default: {o.default!r}."
    return text


def add_option_flags(parser: argparse.ArgumentParser, options: Iterable[Option], *,
                     config_class: str | None = None) -> None:
    """Add each option's flag, under its group's heading; help says where its default comes from.

    ``config_class`` names the traitlets class whose values are the defaults (``ModalMagic``), for
    options that have ``%config`` traitlets.
    """
    groups: dict[str, Any] = {}
    for o in options:
        if o.flag is None:
            continue
        if o.flag.group not in groups:
            groups[o.flag.group] = parser.add_argument_group(o.flag.group)
        group = groups[o.flag.group]
        spelling, form, help = o.flag_spelling, o.flag.form, _flag_help(o, config_class)
        if form == "cache":
            group.add_argument(spelling, dest=o.name, action="store_const", const=True, help=help)
            group.add_argument(f"--no-{spelling[2:]}", dest=o.name, action="store_const", const=False,
                               help="Recompute every row and store nothing.")
            group.add_argument(f"{spelling}-refresh", dest=o.name, action="store_const", const="refresh",
                               help="Recompute every row and store the new results.")
        elif form == "switch":
            group.add_argument(spelling, dest=o.name, action=argparse.BooleanOptionalAction, help=help)
        elif form == "many":
            group.add_argument(spelling, dest=o.name, nargs="+", action="extend", metavar=o.flag.metavar, help=help)
        elif form in ("repeat", "pairs"):
            group.add_argument(spelling, dest=o.name, action="append", metavar=o.flag.metavar, help=help)
        else:
            group.add_argument(spelling, dest=o.name, type=o.flag.type, metavar=o.flag.metavar,
                               choices=list(o.choices) or None, help=help)


def split_line(line: str, magic: str) -> list[str]:
    """The line's words as a shell would split them; a ``UsageError`` for an unclosed quote."""
    try:
        return shlex.split(line)
    except ValueError as error:  # e.g. "No closing quotation"
        raise UsageError(f"can't read the %%{magic} line: {error}") from None


def parse_known(parser: argparse.ArgumentParser, argv: list[str], *, stray: str) -> dict[str, Any]:
    """Parse ``argv``; anything unknown is a ``UsageError`` (a flag gets the closest real one).

    ``stray`` is the message for a word that isn't a flag, where no positional is expected.
    """
    parsed, unknown = parser.parse_known_args(argv)
    if unknown:
        first = unknown[0]
        if not first.startswith("-"):
            raise UsageError(f"unexpected {first!r} on the line: {stray}")
        known = [s for action in parser._actions for s in action.option_strings]
        word = first.split("=")[0]
        # An abbreviation means the flag it starts; otherwise the closest spelling.
        close = [k for k in known if k.startswith(word)][:1] or difflib.get_close_matches(word, known, n=1)
        magic = parser.prog.lstrip("%")
        raise UsageError(f"unknown flag {first}"
                         + (f"; did you mean {close[0]}?" if close else f"; see %%{magic}? for the flags"))
    return vars(parsed)


def option_flags(given: Mapping[str, Any], options: Iterable[Option] = OPTIONS) -> dict[str, Any]:
    """The option flags among parsed arguments, in the options' own shapes (``--env K=V`` -> a dict...).

    Examples
    --------
    >>> option_flags({"env": ["KEY=v"], "gpu": ["T4"], "into": "x"})
    {'gpu': 'T4', 'env': {'KEY': 'v'}}
    """
    values = {}
    for o in options:
        if o.name not in given:
            continue
        value = given[o.name]
        if o.flag is not None and o.flag.form == "pairs":
            value = _pairs(value, flag=o.flag_spelling, form=o.flag.metavar or "KEY=VALUE")
        elif o.trait == "gpu" and value is not None and len(value) == 1:
            value = value[0]  # one GPU is a string; several are fallbacks
        values[o.name] = value
    return values


def _pairs(items: list[str], *, flag: str, form: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {item!r}: expected {form}")
        pairs[key] = value
    return pairs


# --- %config traitlets -----------------------------------------------------------------------------------


def _trait(o: Option) -> TraitType:
    optional = o.default is None
    kinds: dict[str, Callable[[], TraitType]] = {
        "text": lambda: Unicode(o.default, allow_none=optional),
        "name": lambda: Unicode(None, allow_none=True),
        "number": lambda: Float(o.default, allow_none=optional),
        "whole": lambda: Int(o.default, allow_none=optional),
        "switch": lambda: Bool(o.default),
        "texts": lambda: List(Unicode(), default_value=list(o.default)),
        "pairs": lambda: Dict(key_trait=Unicode(), value_trait=Unicode()),
        "choice": lambda: Enum(list(o.choices), o.default),
        "gpu": lambda: Union([Unicode(), List(Unicode())], default_value=None, allow_none=True),
        "cache": lambda: Union([Bool(), Enum(["refresh"])], default_value=o.default),
    }
    return kinds[o.trait]().tag(config=True)


def option_traits(options: Iterable[Option]) -> dict[str, TraitType]:
    """One configurable traitlet per option, with the option's default and help.

    Examples
    --------
    >>> traits = option_traits(OPTIONS)
    >>> type(traits["retries"]).__name__, traits["retries"].default_value
    ('Int', 0)
    """
    traits = {}
    for o in options:
        trait = _trait(o)
        trait.help = o.help
        traits[o.name] = trait
    return traits


# --- names in the notebook -------------------------------------------------------------------------------


def lookup(user_ns: dict[str, Any], name: str, *, flag: str, kind: str,
           preferred: Callable[[Any], bool] = lambda value: True) -> Any:
    """``user_ns[name]``, or a UsageError suggesting the closest names of the right kind."""
    if name in user_ns:
        return user_ns[name]
    candidates = [k for k, v in user_ns.items() if not k.startswith("_") and preferred(v)]
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UsageError(f"{flag} {name}: nothing named {name!r} is defined in the notebook (expected {kind}){hint}")


def resolve_frame(user_ns: dict[str, Any], args: CellArgs) -> pd.DataFrame:
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


def map_options(user_ns: dict[str, Any], defaults: Mapping[str, Any], given: Mapping[str, Any]) -> MapOptions:
    """The map options of a cell: the flags given over the configured defaults, validated.

    ``image`` is the name of a ``modal.Image`` variable on the line and in ``%config``; it is looked
    up here, at each run.
    """
    values = {**defaults, **given}
    if values.get("image") is not None:
        name = values["image"]
        values["image"] = lookup(user_ns, name, flag="--image", kind="a modal.Image")
        if type(values["image"]).__name__ != "Image":
            raise UsageError(f"--image {name}: {name} is a {type(values['image']).__name__}, not a modal.Image")
    try:
        return MapOptions.create(**values)
    except OptionsError as error:
        raise UsageError(in_flag_words(str(error))) from None


# --- the result ------------------------------------------------------------------------------------------


def bind(user_ns: dict[str, Any], args: CellArgs, frame: pd.DataFrame, out: pd.DataFrame, *,
         into: str, options: MapOptions) -> None:
    """Put the result where the line asked: a new name with ``-o``, else new columns on ``frame``."""
    if args.output is not None:
        user_ns[args.output] = out
        return
    error_column = f"{into}_error"
    for name in _result_columns(frame, out, into, options):
        frame[name] = _full_length(out[name], frame.index, errors=name == error_column)
    runs = out.attrs.get(RunSpec.ATTRS_KEY)
    if runs:  # so DF.modal.retry_failed() knows how its columns were made
        frame.attrs[RunSpec.ATTRS_KEY] = {**frame.attrs.get(RunSpec.ATTRS_KEY, {}), **runs}


def _result_columns(frame: pd.DataFrame, out: pd.DataFrame, into: str, options: MapOptions) -> list[Any]:
    """The columns the run added to (or replaced in) ``frame`` to make ``out``."""
    error_column = f"{into}_error"
    timed = [f"{into}_seconds"] if options.timings else []
    if not options.expand:
        return [into, error_column, *timed]
    added = [c for c in out.columns if c not in frame.columns]
    if options.overwrite:  # dict keys may have replaced existing columns: those that changed
        rows = frame.iloc[: len(out)]
        added += [c for c in frame.columns if c not in added and not out[c].equals(rows[c])]
    if error_column not in added:
        added.append(error_column)
    return added + [c for c in timed if c not in added]


def _full_length(column: pd.Series, index: pd.Index, *, errors: bool = False) -> pd.Series:
    """``column`` on ``index``, matched by position; rows beyond a ``--sample`` are missing.

    A Series with the frame's own index keeps its dtype when assigned (a bare object array of
    RowErrors would be re-inferred as strings by pandas 3), and matching by position makes
    duplicate labels safe. The rows a ``--sample`` left out are missing the way a failed row is:
    ``None`` in the error column, a nullable dtype (``Int64``...) in a result column, never a
    float column of NaN.
    """
    if len(column) < len(index):
        missing = range(len(column), len(index))
        values = column.astype(object).tolist() + [None] * len(missing)
        if errors:
            return pd.Series(values, index=index, dtype=object)
        holes = {i for i, v in enumerate(values) if v is None or v is pd.NA or (isinstance(v, float) and v != v)}
        holes |= set(missing)
        values = [None if i in holes else v for i, v in enumerate(values)]
        return join.result_series(values, holes, index)
    return column.set_axis(index)


# --- messages in flag words ------------------------------------------------------------------------------

# How each option is spelled on a line, for messages that name it: both magics' options.
_FLAGS: dict[str, str] = {"into": "--into", **{o.name: o.flag_spelling for o in (*OPTIONS, *LLM_OPTIONS)
                                                if o.flag is not None}}
_OPTION_IN_MESSAGE = re.compile(
    r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")=('[^']*'|\"[^\"]*\"|[\w.+-]*)"
)


def in_flag_words(message: str) -> str:
    """Say ``--max-containers 0`` where a shared options message says ``max_containers=0``.

    Examples
    --------
    >>> in_flag_words("pass overwrite=True to replace it, or into='another_name'")
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


def define_function(shell: Any, cell: str, fn_name: str | None, *, what: str) -> Callable[..., Any]:
    """Run a magic's cell in the user namespace; return the function it names (``--fn``) or defines last.

    ``what`` names the function the magic wants, for the message when the cell defines none.

    Running it there makes the functions ``__main__`` functions, which cloudpickle sends by value:
    worker processes and Modal containers need no copy of the notebook.
    """
    source = shell.transform_cell(cell)
    # Cached under a name IPython knows, so tracebacks and syntax errors show the cell's lines.
    filename = shell.compile.cache(source, shell.execution_count, raw_code=cell)
    try:
        tree = shell.compile.ast_parse(source, filename=filename)
    except SyntaxError as error:  # raised from inside a magic, IPython would show its whole stack
        raise UsageError(syntax_error_text(error)) from None
    defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if fn_name is None and not defined:
        raise UsageError(f"the cell defines no function: write {what} in it as a `def` "
                         "(the last top-level def is used), or name one with --fn NAME")
    exec(shell.compile(tree, filename, "exec"), shell.user_global_ns, shell.user_ns)
    if fn_name is None:
        return shell.user_ns[defined[-1]]
    fn = lookup(shell.user_ns, fn_name, flag="--fn", kind="a function", preferred=callable)
    if not callable(fn):
        raise UsageError(f"--fn {fn_name}: {fn_name} is a {type(fn).__name__}, not a function")
    return fn


def syntax_error_text(error: SyntaxError) -> str:
    """``SyntaxError`` as a line number, the message, and the offending line with a caret."""
    text = f"{type(error).__name__} in the cell, line {error.lineno}: {error.msg}"
    if error.text:
        text += f"\n    {error.text.rstrip()}\n    {' ' * max((error.offset or 1) - 1, 0)}^"
    return text
