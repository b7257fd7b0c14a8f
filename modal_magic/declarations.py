"""How an option is declared once: :func:`option` fields, read back as :class:`Option` records.

An option set (:class:`~modal_magic.options.MapOptions`, :class:`~modal_magic.llm.LLMOptions`) is a
frozen dataclass whose every field is made by :func:`option`: the field's name and type plus a
default, a check, a help sentence, a :class:`Flag` (how a magic's line spells it) and the kind of
``%config`` traitlet it is. :func:`declared_options` reads these back, and everything else is
generated from them: validation, the accessors' signatures, and on the IPython side the
traitlets, the argparse flags and the help. Adding an option is adding one field.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from .errors import OptionsError

__all__ = ["Flag", "Option", "TraitKind", "declared_options", "option", "unknown_option"]

#: What kind of ``%config`` traitlet an option is (the IPython side maps each to a traitlet type):
#: "text", "number", "whole" (``None`` allowed when that is the default), "switch", "texts" (a list
#: of strings), "pairs" (a dict of strings), "choice", "gpu" (a string or a list of them), "cache"
#: (True, False or "refresh"), "name" (the name of a notebook variable, looked up at each run).
TraitKind = Literal["text", "number", "whole", "switch", "texts", "pairs", "choice", "gpu", "cache", "name"]


@dataclass(frozen=True)
class Flag:
    """How an option is written on a magic's line.

    ``form`` says how argparse reads it: ``"value"`` (``--retries 2``), ``"many"`` (``--pip a b``),
    ``"repeat"`` (``--secret a --secret b``), ``"pairs"`` (``--env K=V``, repeatable, read into a
    dict), ``"switch"`` (``--progress`` / ``--no-progress``) or ``"cache"`` (``--cache``,
    ``--no-cache``, ``--cache-refresh``).

    Examples
    --------
    >>> Flag("value", type=int, metavar="N").form
    'value'
    """

    form: Literal["value", "many", "repeat", "pairs", "switch", "cache"] = "value"
    spelling: str | None = None  # default: "--" + the name with dashes
    type: Callable[[str], Any] | None = None  # float or int for numbers; None reads the text
    metavar: str | None = None
    group: str = "How rows run"  # the help section the flag is listed under


@dataclass(frozen=True)
class Option:
    """One option as declared: everything the validation, traitlets, flags and help are made from.

    Examples
    --------
    >>> from modal_magic.options import OPTIONS
    >>> retries = next(o for o in OPTIONS if o.name == "retries")
    >>> retries.default, retries.flag_spelling, retries.check("retries", 2)
    (0, '--retries', 2)
    """

    name: str
    annotation: str  # the field's type, as written (shown in the accessors' signatures)
    default: Any
    check: Callable[[str, Any], Any]  # (name, value) -> the normalised value, or raise OptionsError
    help: str
    trait: TraitKind
    flag: Flag | None = None  # None: not a flag (a keyword argument only)
    choices: tuple[Any, ...] = ()

    @property
    def flag_spelling(self) -> str:
        """The flag as typed, e.g. ``--max-containers``."""
        if self.flag is not None and self.flag.spelling:
            return self.flag.spelling
        return "--" + self.name.replace("_", "-")

    def fresh_default(self) -> Any:
        """The default value (a new dict for a dict default, so no two runs share one)."""
        return dict(self.default) if isinstance(self.default, dict) else self.default


def option(default: Any, check: Callable[[str, Any], Any], help: str, *, trait: TraitKind,
           flag: Flag | None = Flag(), choices: tuple[Any, ...] = ()) -> Any:
    """Declare an option as a dataclass field: its default, check, help, flag and traitlet kind.

    The field's name and type annotation complete the declaration; :func:`declared_options` reads
    them back. ``flag=None`` makes a keyword-only option that no magic line spells.

    Examples
    --------
    >>> @dataclass(frozen=True)
    ... class Knobs:
    ...     speed: int = option(1, lambda name, value: value, "How fast.", trait="whole")
    >>> [(o.name, o.annotation, o.default) for o in declared_options(Knobs)]
    [('speed', 'int', 1)]
    """
    metadata = {"option": (check, help, trait, flag, choices)}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def declared_options(cls: type) -> tuple[Option, ...]:
    """The :class:`Option` records of a dataclass whose fields were declared with :func:`option`."""
    declared = []
    for f in dataclasses.fields(cls):
        check, help, trait, flag, choices = f.metadata["option"]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        declared.append(Option(f.name, str(f.type), default, check, help, trait, flag, choices))
    return tuple(declared)


def unknown_option(name: str, known: tuple[str, ...]) -> OptionsError:
    """The error for an option nobody declared, with the closest known name."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; options are: {', '.join(known)}"
    return OptionsError(f"unknown option {name!r}{hint}")
