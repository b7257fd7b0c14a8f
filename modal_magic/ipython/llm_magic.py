"""``%%modal_llm``: send the cell, a prompt template with ``{column}`` fields, to a chat model once per row.

A thin adapter over :func:`modal_magic.llm.llm_frame`: :func:`parse_llm_line` reads the line into a
frozen :class:`LLMCellArgs` (the LLM flags come from :data:`modal_magic.llm.LLM_OPTIONS`, the map
option flags from :data:`modal_magic.options.OPTIONS`, both through the shared
:mod:`~modal_magic.ipython.parsing`), and :func:`run_llm_cell` resolves names and binds the result.
The map options default to ``ModalMagic``'s ``%config`` traitlets, as in ``%%modal_map``.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, magics_class

from ..checks import FunctionError
from ..errors import MapInterrupted, ModalSetupError, OptionsError
from ..llm import DEFAULT_INTO, LLM_OPTION_NAMES, LLM_OPTIONS, LLMOptions, llm_frame
from ..llm.templates import TemplateError, template_fields
from ..options import OPTIONS

#: the map options an LLM cell takes: those of the same name as an LLM option (budget_usd, whose LLM
#: form caps the tokens' dollars) are the LLM option's
_MAP_OPTIONS = tuple(o for o in OPTIONS if o.name not in LLM_OPTION_NAMES)
from .map_magic import ModalMagic
from .parsing import (CellArgs, add_option_flags, bind, in_flag_words, lookup, make_parser, map_options,
                      option_flags, parse_known, resolve_frame, split_line)

__all__ = ["LLMCellArgs", "LLMMagic", "magic_help", "parse_llm_line", "run_llm_cell"]


@dataclass(frozen=True)
class LLMCellArgs:
    """What a ``%%modal_llm`` line asks for, parsed but not yet resolved in the user namespace.

    Examples
    --------
    >>> args = parse_llm_line("reviews --into label --model gpt-4o-mini --max-tokens 10 --rpm 500")
    >>> args.frame, args.into, args.llm["model"], args.llm["max_tokens"], args.llm["rpm"]
    ('reviews', 'label', 'gpt-4o-mini', 10, 500.0)
    """

    frame: str
    into: str
    output: str | None
    schema: str | None  # the name of a pydantic model (or JSON schema dict) in the notebook
    llm: Mapping[str, Any] = field(default_factory=dict)  # the LLM option flags given, but --schema
    options: Mapping[str, Any] = field(default_factory=dict)  # the MapOptions flags given on the line

    def __post_init__(self) -> None:
        object.__setattr__(self, "llm", MappingProxyType(dict(self.llm)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


_DESCRIPTION = ("Send the cell, a prompt template with {column} fields, to a chat model once per row of DF, and add "
                "the answers (or one column per --schema field), tokens, cost and errors as columns of DF (or of a "
                "new DataFrame with -o). Any OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY, a .env "
                "file, or on Modal a secret (--secret).")

_MAGIC_EXAMPLE = """\
    Examples::

        %%modal_llm reviews --into label --model gpt-4o-mini --max-tokens 10
        Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}

        %%modal_llm reviews --schema Complaint -o complaints --budget-usd 2 --rpm 500
        Extract from: {text}
"""


def llm_parser() -> Any:
    """The ``%%modal_llm`` argument parser: the LLM flags plus every option flag of ``%%modal_map``."""
    parser = make_parser("modal_llm", _DESCRIPTION)
    parser.add_argument("frame", metavar="DF", help="The DataFrame whose rows fill the template.")
    parser.add_argument("--into", metavar="NAME", help=f"The answer column (default {DEFAULT_INTO!r}); also "
                        "NAME_tokens_in, NAME_tokens_out, NAME_cost_usd and NAME_error.")
    parser.add_argument("-o", "--output", metavar="NAME",
                        help="Bind the result to a new DataFrame NAME; DF stays as it is.")
    add_option_flags(parser, LLM_OPTIONS)
    add_option_flags(parser, _MAP_OPTIONS, config_class="ModalMagic")
    return parser


#: The ``%%modal_llm`` parser, generated once from the option declarations.
PARSER = llm_parser()


def magic_help() -> str:
    """The ``%%modal_llm?`` text: what the magic does, an example, and every flag."""
    return PARSER.format_help() + "\n" + textwrap.dedent(_MAGIC_EXAMPLE)


def parse_llm_line(line: str) -> LLMCellArgs:
    """Parse the ``%%modal_llm`` line; raise ``UsageError`` for a bad one.

    Examples
    --------
    >>> parse_llm_line("reviews --schema Complaint").schema
    'Complaint'
    """
    given = parse_known(PARSER, split_line(line, "modal_llm"),
                        stray="give the DataFrame's name once, and the prompt in the cell below the line")
    frame = given.pop("frame")
    if not frame.isidentifier():
        hint = " (the column names go in the prompt, as {column})" if "." in frame else ""
        raise UsageError(f"{frame!r} is not a variable name: give the DataFrame's name{hint}")
    for name, flag in (("output", "-o"), ("schema", "--schema")):
        if name in given and not given[name].isidentifier():
            raise UsageError(f"{flag} {given[name]!r}: expected a variable name")
    llm = option_flags(given, LLM_OPTIONS)
    schema = llm.pop("schema", None)  # a name in the notebook, looked up when the cell runs
    return LLMCellArgs(frame=frame, into=given.get("into", DEFAULT_INTO), output=given.get("output"),
                       schema=schema, llm=llm, options=option_flags(given, _MAP_OPTIONS))


def _map_defaults(shell: Any) -> dict[str, Any]:
    """The map options' ``%config`` defaults: the loaded ``ModalMagic``'s traitlets."""
    magic = shell.magics_manager.registry.get(ModalMagic.__name__)
    if magic is None:  # used without %load_ext: the defaults as configured, read by an unregistered instance
        magic = ModalMagic(config=shell.config)
    return {name: value for name, value in magic.option_defaults().items() if name not in LLM_OPTION_NAMES}


def run_llm_cell(magic: Magics, line: str, cell: str) -> None:
    """``%%modal_llm DF [--into NAME] [flags]`` with the prompt template as the cell body.

    ``magic`` is the registered magic whose shell holds the notebook; the map options default to
    ``ModalMagic``'s ``%config`` traitlets. The answer, token, cost and error columns are added to
    ``DF`` in place, or bound to a new DataFrame with ``-o NAME``. Mistakes raise ``UsageError``
    before any request.

    Examples::

        %%modal_llm reviews --into label --model gpt-4o-mini --max-tokens 10
        Classify this review as POSITIVE, NEGATIVE or NEUTRAL: {text}
    """
    args = parse_llm_line(line)
    template = cell.strip()
    if not template:
        raise UsageError("the cell is empty: write the prompt below the %%modal_llm line, with {column} "
                         "where each row's value goes")
    user_ns = magic.shell.user_ns
    try:
        fields = template_fields(template)
    except TemplateError as error:
        raise UsageError(str(error)) from None
    cell_args = CellArgs(frame=args.frame, columns=fields, star=True, into=args.into, output=args.output,
                         options=args.options)
    frame = resolve_frame(user_ns, cell_args)
    llm_values = dict(args.llm)
    if args.schema is not None:
        llm_values["schema"] = lookup(user_ns, args.schema, flag="--schema",
                                      kind="a pydantic model or a JSON schema dict")
    options = map_options(user_ns, _map_defaults(magic.shell), args.options)
    try:
        llm = LLMOptions.create(**llm_values)
        out = llm_frame(frame, template, into=args.into, llm=llm, options=options, errors_call=cell_args.errors_call)
    except (OptionsError, FunctionError, ModalSetupError) as error:  # caught before any request
        message = _in_magic_words(str(error))
        raise UsageError(in_flag_words(message)) from None
    except MapInterrupted as stopped:  # Stop pressed: keep what finished, then say it stopped
        bind(user_ns, cell_args, frame, stopped.result, into=args.into, options=options.replace(expand=True))
        raise
    bind(user_ns, cell_args, frame, out, into=args.into, options=options.replace(expand=True))


def _in_magic_words(message: str) -> str:
    """An LLM options message as the magic's user can act on it: the magic has no flag for the key.

    Examples
    --------
    >>> _in_magic_words("no OpenAI API key: pass api_key=, set OPENAI_API_KEY (a local server: api_key='none')")
    'no OpenAI API key: set OPENAI_API_KEY (a local server: OPENAI_API_KEY=none)'
    """
    return (message.replace("secrets=['openai-secret']", "--secret openai-secret")
            .replace("pass api_key=, ", "").replace("api_key='none'", "OPENAI_API_KEY=none"))


@magics_class
class LLMMagic(Magics):
    """``%%modal_llm``; its map options default to ``ModalMagic``'s ``%config`` traitlets."""

    @cell_magic
    def modal_llm(self, line: str, cell: str) -> None:
        run_llm_cell(self, line, cell)

    modal_llm.__doc__ = magic_help()
