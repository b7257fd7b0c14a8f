"""``%%modal_map``: map the function a cell defines over a DataFrame column, with ``%config`` defaults.

``%%modal_map reviews.text --into sentiment`` runs the cell in the user namespace, picks the function
to map (the last top-level ``def``, or ``--fn NAME``), resolves ``DF.COLUMN`` there, and makes one
call into :func:`modal_magic.engine.map_frame`; the result and error columns are then added to ``DF``
in place, or bound to a new name with ``-o NAME``. The magic is a thin adapter: :func:`parse_line`
turns the line into a frozen :class:`~modal_magic.ipython.parsing.CellArgs`,
:meth:`ModalMagic.modal_map` resolves names and binds the result. Every option of
:class:`~modal_magic.options.MapOptions` is both a flag and a traitlet on :class:`ModalMagic`, both
generated from the option's declaration, so ``%config ModalMagic.backend = "threads"`` (or an
IPython profile) sets the default a flag overrides. Mistakes a user can fix raise ``UsageError``.
"""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import TraitError, validate

from ..checks import FunctionError, default_into
from ..engine import map_frame
from ..estimate import DEFAULT_SAMPLE, Estimate, estimate_frame
from ..retry import rerun_failed
from ..runs import RunSpec, runs_columns
from ..errors import MapInterrupted, ModalSetupError, OptionsError, RowError
from ..jobs import MapJob, start_job
from ..options import OPTION_NAMES, OPTIONS, MapOptions, check_option
from .parsing import (CellArgs, add_option_flags, bind, define_function, in_flag_words, make_parser, map_options,
                      option_flags, option_traits, parse_known, resolve_frame, split_line)

__all__ = ["ModalMagic", "parse_line"]

_DOC = """\
Map the function this cell defines over a DataFrame column, in parallel.

The cell runs in the notebook's namespace (its functions stay defined); the function mapped is
the cell's last top-level ``def``, or ``--fn NAME``. The result and error columns (``INTO`` and
``INTO_error``) are added to DF in place, or to a new DataFrame bound to ``-o NAME``. Failed rows:
``DF.modal.errors()``.

Every option defaults to its ``ModalMagic`` traitlet, e.g. ``%config ModalMagic.backend = "threads"``.
"""

_EXAMPLES = """\
Examples::

    %%modal_map reviews.text --into sentiment --max-containers 8 --retries 2
    def classify(text):
        ...

    %%modal_map reviews --columns text lang --into translated -o out
    def translate(text, lang):
        ...

    %modal_map reviews.text --fn classify --into sentiment    # the line form: a function defined earlier
"""


def _parser() -> Any:
    parser = make_parser("modal_map", _DOC)
    parser.add_argument("target", metavar="DF.COLUMN",
                        help="The DataFrame and the column to map over (just DF with --columns).")
    parser.add_argument("--columns", nargs="+", metavar="COLUMN",
                        help="Starmap: call the function with one argument per column, in this order.")
    parser.add_argument("--into", metavar="NAME", help="The result column's name (default: the function's name); "
                                                       "errors go to NAME_error.")
    parser.add_argument("-o", "--output", metavar="NAME",
                        help="Bind the result to a new DataFrame NAME and leave DF unchanged.")
    parser.add_argument("--fn", metavar="NAME",
                        help="The function to map (default: the last top-level def in the cell).")
    parser.add_argument("--background", action="store_true",
                        help="Run in the background: the cell returns a MapJob at once (other cells can run); "
                             "the columns are filled in when it ends (job.result() waits for it).")
    parser.add_argument("--retry-failed", action="store_true",
                        help="Run only the rows of DF whose INTO_error holds an error (with this cell's function "
                             "and flags, e.g. more --retries), and fill their results in.")
    parser.add_argument("--estimate", action="store_true",
                        help="Don't run the whole column: time a sample of rows spread over DF (--sample N, "
                             "default 200) and show the projected wall time and, on Modal, dollars. The sample's "
                             "results are cached for the real run; DF is left unchanged.")
    add_option_flags(parser, OPTIONS, config_class="ModalMagic")
    return parser


#: The ``%%modal_map`` parser, generated once from the option declarations.
PARSER = _parser()

#: One ``%config`` traitlet per map option, made from the declarations. ``ModalMagic`` is the class
#: users configure (``%config ModalMagic.x``): traitlets reads a class's section for every
#: configurable class in its MRO, so inherited traits are configured under the subclass's name.
MapOptionTraits = type("MapOptionTraits", (Magics,), option_traits(OPTIONS))


@magics_class
class ModalMagic(MapOptionTraits):  # type: ignore[misc,valid-type]
    """``%%modal_map``; every traitlet is the default of the option (and flag) of the same name."""

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
            check_option(name, value)
        except OptionsError as error:
            raise TraitError(f"ModalMagic.{name}: {error}") from None
        return value

    def update_config(self, config: Any) -> None:
        """Take ``%config ModalMagic.x = ...``; a refused value is said as a magic says a mistake.

        IPython's ``%config`` hands an exception from here to ``logging.error``, which prints
        ``ERROR:root:...``; shown as a ``UsageError`` it reads like every other mistake.
        """
        try:
            super().update_config(config)
        except TraitError as error:
            self.shell.show_usage_error(UsageError(str(error)))

    def option_defaults(self) -> dict[str, Any]:
        """The options a flag left out takes: this object's traitlets, by option name."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    @line_cell_magic
    def modal_map(self, line: str, cell: str | None = None) -> MapJob | Estimate | None:
        args = parse_line(line)
        if cell is None and args.fn is None:  # %modal_map, the line form: the function is defined already
            raise UsageError("%modal_map (one %) maps a function defined earlier: name it with --fn NAME, "
                             "or use %%modal_map with the function's def in the cell")
        user_ns = self.shell.user_ns
        frame = resolve_frame(user_ns, args)
        options = map_options(user_ns, self.option_defaults(), args.options)
        if args.background:
            options = options.replace(wait=False)
        fn = define_function(self.shell, cell or "", args.fn, what="the function to map")
        into = args.into if args.into is not None else default_into(fn)
        if args.estimate:
            return self._estimate(frame, fn, args, into, options)

        def run() -> pd.DataFrame:
            if args.retry_failed:
                return self._retry_failed(frame, fn, args, into, options)
            return map_frame(frame, fn, columns=list(args.columns), star=args.star, into=into,
                             options=options, errors_call=args.errors_call, magic=True)

        try:
            if not options.wait:
                job = start_job(run, title=into)
                job.add_done_callback(lambda job: _bind_when_done(job, user_ns, args, frame, into, options))
                return job
            out = run()
        except (OptionsError, FunctionError, ModalSetupError) as error:  # caught before any row ran
            raise UsageError(in_flag_words(str(error))) from None
        except MapInterrupted as stopped:  # Stop pressed: keep what finished, then say where it is
            bind(user_ns, args, frame, stopped.result, into=into, options=options)
            raise MapInterrupted(stopped_message(stopped, args, into), stopped.result) from None
        bind(user_ns, args, frame, out, into=into, options=options)
        return None

    modal_map.__doc__ = PARSER.format_help() + "\n" + _EXAMPLES

    def _estimate(self, frame: pd.DataFrame, fn: Callable[..., Any], args: CellArgs, into: str,
                  options: MapOptions) -> Estimate:
        """``--estimate``: the sample's projection, shown as the cell's output (and bound to ``-o NAME``)."""
        if args.retry_failed:
            raise UsageError("--estimate and --retry-failed don't go together: estimate the whole column, "
                             "or retry its failed rows")
        sample = options.sample or DEFAULT_SAMPLE
        try:
            estimate = estimate_frame(frame, fn, columns=list(args.columns), star=args.star, into=into,
                                      sample=sample, options=options.replace(sample=None))
        except (OptionsError, FunctionError, ModalSetupError) as error:
            raise UsageError(in_flag_words(str(error))) from None
        if args.output is not None:
            self.shell.user_ns[args.output] = estimate
        return estimate

    def _retry_failed(self, frame: pd.DataFrame, fn: Callable[..., Any], args: CellArgs, into: str,
                      options: MapOptions) -> pd.DataFrame:
        error_column = f"{into}_error"
        if error_column not in frame.columns:
            raise UsageError(f"--retry-failed: {args.frame} has no column {error_column!r} yet; run the cell "
                             f"once without --retry-failed (or name the result with --into)")
        result_columns = runs_columns(frame, into) or (into,)
        spec = RunSpec(fn=fn, columns=tuple(args.columns), star=args.star, options=options,
                       error_column=error_column, result_columns=result_columns)
        return rerun_failed(frame, into, spec, errors_call=args.errors_call, magic=True)

def stopped_message(stopped: MapInterrupted, args: CellArgs, into: str) -> str:
    """What a magic says when Stop ends its run: how far it got, and where the finished rows went.

    Examples
    --------
    >>> import pandas as pd
    >>> from modal_magic.errors import RowError
    >>> frame = pd.DataFrame({"y_error": [None, RowError.create("Cancelled", "stopped")]})
    >>> stopped_message(MapInterrupted("stopped", frame), parse_line("df.x"), "y")
    'stopped after 1 of 2 rows; the finished rows are in df (the other 1 have a Cancelled error): run the cell again to finish them; finished rows come from the cache'
    """
    frame = stopped.result
    errors = frame[f"{into}_error"].tolist() if f"{into}_error" in frame.columns else []
    cancelled = sum(isinstance(e, RowError) and e.type_name == "Cancelled" for e in errors)
    where = args.output or args.frame
    return (f"stopped after {len(frame) - cancelled:,} of {len(frame):,} rows; the finished rows are in {where} "
            f"(the other {cancelled:,} have a Cancelled error): run the cell again to finish them; finished rows "
            "come from the cache")


def _bind_when_done(job: MapJob, user_ns: dict[str, Any], args: CellArgs, frame: pd.DataFrame, into: str,
                    options: MapOptions) -> None:
    """A ``--background`` cell's columns, filled in (or bound to ``-o NAME``) when its job ends."""
    try:
        out = job.result()
    except MapInterrupted as stopped:  # cancelled: keep what finished, as Stop does in the foreground
        out = stopped.result
    except Exception:  # job.result() raises it again for whoever asks; there is nothing to fill in
        return
    bind(user_ns, args, frame, out, into=into, options=options)


def parse_line(line: str) -> CellArgs:
    """Parse the ``%%modal_map`` line into :class:`CellArgs`; raise ``UsageError`` for a bad one.

    Examples
    --------
    >>> args = parse_line("df --columns a b --gpu T4 A10G --env KEY=v -o out --backend modal:app/fn")
    >>> args.columns, args.star, args.output, args.options["gpu"], args.options["env"]
    (('a', 'b'), True, 'out', ['T4', 'A10G'], {'KEY': 'v'})
    """
    given = parse_known(PARSER, split_line(line, "modal_map"),
                        stray="give one DF.COLUMN, and values only after flags that take them")
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
    return CellArgs(
        frame=frame,
        columns=tuple(columns) if columns else (column,),
        star=bool(columns),
        into=given.get("into"),
        output=given.get("output"),
        fn=given.get("fn"),
        retry_failed=bool(given.get("retry_failed")),
        background=bool(given.get("background")),
        estimate=bool(given.get("estimate")),
        options=option_flags(given, OPTIONS),
    )


