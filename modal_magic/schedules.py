"""When a deployed function runs: cron strings and intervals checked here, before anything reaches Modal.

:func:`modal_magic.deploy` takes ``schedule=`` as a cron string, a ``modal.Cron`` or a
``modal.Period``, and ``%%modal_deploy`` takes ``--schedule "0 2 * * *"`` or ``--every 6h``. Modal
would only refuse a bad cron string after the image is built and the app created; :func:`to_schedule`
checks each of its five fields (ranges, steps, lists, month and weekday names) first and says which
field is wrong, and :func:`parse_every` turns ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"`` or ``"2w"``
into a ``modal.Period``. :func:`describe` gives the one line a user reads back.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import OptionsError

__all__ = ["check_cron", "describe", "parse_every", "to_schedule"]

# (name, lowest, highest, names for values) for the five fields of a cron string
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_HELP = ('a cron string has five fields, "MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK", '
              'e.g. "0 2 * * *" for 02:00 every night (see https://crontab.guru)')
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _value(text: str, low: int, high: int, names: tuple[str, ...]) -> int:
    lowered = text.lower()
    if lowered in names:
        return names.index(lowered) + low
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number" + (f" or a name ({', '.join(names)})" if names else ""))
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"{number} is outside {low}-{high}")
    return number


def _check_field(text: str, low: int, high: int, names: tuple[str, ...]) -> None:
    for part in text.split(","):
        span, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"the step in {part!r} must be a whole number above 0")
        if span == "*":
            continue
        first, dash, last = span.partition("-")
        start = _value(first, low, high, names)
        if dash and _value(last, low, high, names) < start:
            raise ValueError(f"the range {span!r} runs backwards")
        if slash and not dash:
            raise ValueError(f"a step needs '*' or a range before it, as in '*/{step}' or '{first}-{high}/{step}'")


def check_cron(cron: str) -> str:
    """Return ``cron`` with its spacing normalised, or raise saying which field is wrong.

    Raises
    ------
    OptionsError
        When the string doesn't have five fields or one of them is out of range.

    Examples
    --------
    >>> check_cron("0  2 * * mon-fri")
    '0 2 * * mon-fri'
    >>> check_cron("61 * * * *")
    Traceback (most recent call last):
    ...
    modal_magic.errors.OptionsError: schedule='61 * * * *' is not a valid cron string: minute: 61 is outside 0-59 ...
    """
    if not isinstance(cron, str):
        raise OptionsError(f"schedule={cron!r} is not valid: expected a cron string, modal.Cron or modal.Period")
    fields = cron.split()
    if len(fields) != 5:
        raise OptionsError(f"schedule={cron!r} is not a valid cron string: it has {len(fields)} fields; {_CRON_HELP}")
    for text, (field, low, high, names) in zip(fields, _FIELDS):
        try:
            _check_field(text, low, high, names)
        except ValueError as e:
            raise OptionsError(f"schedule={cron!r} is not a valid cron string: {field}: {e} ({_CRON_HELP})") from None
    return " ".join(fields)


def parse_every(text: str) -> Any:
    """A ``modal.Period`` from an interval such as ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"`` or ``"2w"``.

    Examples
    --------
    >>> describe(parse_every("6h"))
    'every 6 hours'
    """
    import modal

    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", str(text).lower())
    if match is None or int(match.group(1)) == 0:
        raise OptionsError(f"every={text!r} is not valid: expected a number and a unit, e.g. '30m', '6h' or '1d' "
                           "(s, m, h, d or w)")
    return modal.Period(**{_UNITS[match.group(2)]: int(match.group(1))})


def to_schedule(schedule: Any) -> Any:
    """``schedule=`` as Modal takes it: ``None``, or a checked ``modal.Cron`` / ``modal.Period``.

    Examples
    --------
    >>> describe(to_schedule("0 2 * * *"))
    'cron "0 2 * * *" (UTC)'
    >>> to_schedule(None) is None
    True
    """
    import modal

    if schedule is None:
        return None
    if isinstance(schedule, str):
        return modal.Cron(check_cron(schedule))
    if isinstance(schedule, modal.Cron):
        check_cron(schedule.proto_message.cron.cron_string)
        return schedule
    if isinstance(schedule, modal.Period):
        return schedule
    raise OptionsError(f"schedule={schedule!r} is not valid: expected a cron string such as '0 2 * * *', "
                       "modal.Cron(...) or modal.Period(...)")


def describe(schedule: Any) -> str | None:
    """One line saying when a schedule runs (``None`` for no schedule).

    Examples
    --------
    >>> import modal
    >>> describe(modal.Period(days=1))
    'every 1 day'
    """
    if schedule is None:
        return None
    proto = schedule.proto_message
    if proto.HasField("cron"):
        return f'cron "{proto.cron.cron_string}" ({proto.cron.timezone or "UTC"})'
    period = proto.period
    parts = [f"{value:g} {unit[:-1] if value == 1 else unit}"
             for unit in ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
             if (value := getattr(period, unit))]
    return "every " + " ".join(parts)
