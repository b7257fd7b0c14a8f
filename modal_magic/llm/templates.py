"""Prompt templates: the ``{column}`` fields a template names, checked against the DataFrame before any request."""

from __future__ import annotations

import difflib
import re
import string
from typing import TYPE_CHECKING

from ..errors import OptionsError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TemplateError", "check_template_columns", "template_fields"]


class TemplateError(OptionsError):
    """The prompt template can't be filled from the DataFrame (a missing column, a bad field)."""



def template_fields(template: str) -> tuple[str, ...]:
    """The columns a template's ``{field}``s name, in order of first use.

    ``{text!r}``, ``{text:.200}`` and ``{meta[title]}`` name the column ``text`` / ``meta``;
    write ``{{`` and ``}}`` for literal braces.

    Examples
    --------
    >>> template_fields("Translate {text} into {lang}. Keep {text:.10}; JSON like {{\\"a\\": 1}}")
    ('text', 'lang')
    >>> template_fields("Summarise: {}")
    Traceback (most recent call last):
    ...
    modal_magic.llm.templates.TemplateError: the template has an empty field {}: name the column to fill it from, e.g. {text}
    """
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"template={template!r} is not valid: expected the prompt text, with "
                            "{column} where each row's value goes")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise TemplateError(f"the template can't be read: {error}; write {{{{ and }}}} for literal braces") from None
    fields: list[str] = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = re.match(r"[^.\[]*", field).group()  # type: ignore[union-attr]
        if not name or name.isdigit():
            raise TemplateError(f"the template has an empty field {{{field}}}: name the column to fill it "
                                "from, e.g. {text}")
        if name not in fields:
            fields.append(name)
    if not fields:
        raise TemplateError("the template has no {column} field, so every row would send the same prompt; "
                            "put {column_name} where each row's value goes (write {{ and }} for literal braces)")
    return tuple(fields)


def check_template_columns(frame: pd.DataFrame, fields: tuple[str, ...]) -> None:
    """Raise :class:`TemplateError` naming the first field the frame has no column for.

    Examples
    --------
    >>> import pandas as pd
    >>> check_template_columns(pd.DataFrame({"text": []}), ("txt",))
    Traceback (most recent call last):
    ...
    modal_magic.llm.templates.TemplateError: the template uses {txt}, but the DataFrame has no column 'txt': did you mean {text}? its columns are 'text'
    """
    names = [str(c) for c in frame.columns]
    for name in fields:
        if name in frame.columns:
            continue
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {{{close[0]}}}? " if close else ""
        raise TemplateError(f"the template uses {{{name}}}, but the DataFrame has no column {name!r}: "
                            f"{hint}its columns are {', '.join(map(repr, names))}")
