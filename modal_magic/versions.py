"""Which Modal client versions modal_magic is tested with, and one warning for any other.

Modal's gRPC protocol moves between minor versions, and Modal retires old clients, so
``pyproject.toml`` accepts a range (installing modal_magic never downgrades a user's client) while
the tests run against the exact client pinned in ``constraints.txt``. A client outside the tested
minor versions still works as far as the protocol allows; :func:`warn_if_untested_modal` says once,
at import, which versions were tested, so a failure deep in a run is not the first sign.
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings

__all__ = ["TESTED_MODAL", "UntestedModalClient", "modal_version_problem", "warn_if_untested_modal"]

#: the ``(major, minor)`` Modal client versions the test suite has run against
TESTED_MODAL: tuple[tuple[int, int], ...] = ((1, 6),)


class UntestedModalClient(UserWarning):
    """The installed ``modal`` client is outside the versions modal_magic was tested with."""


def _tested_text() -> str:
    return ", ".join(f"{major}.{minor}.x" for major, minor in TESTED_MODAL)


def modal_version_problem(version: str | None) -> str | None:
    """The warning text for a Modal client ``version`` outside the tested ones, else ``None``.

    ``None`` as ``version`` means modal isn't installed: nothing to warn about until a Modal run.

    Examples
    --------
    >>> modal_version_problem("1.6.4") is None
    True
    >>> print(modal_version_problem("1.9.0"))  # doctest: +ELLIPSIS
    modal_magic was tested with the modal client 1.6.x; you have modal 1.9.0, ...
    """
    if version is None:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) in TESTED_MODAL:
        return None
    return (
        f"modal_magic was tested with the modal client {_tested_text()}; you have modal {version}, "
        "whose protocol may differ. Local backends are unaffected; if a Modal run fails, install a "
        f"tested client (pip install 'modal~={TESTED_MODAL[-1][0]}.{TESTED_MODAL[-1][1]}.0') or "
        "upgrade modal_magic."
    )


def warn_if_untested_modal() -> None:
    """Warn once (``UntestedModalClient``) when the installed modal client wasn't tested.

    Reads the installed distribution's metadata only, so ``import modal_magic`` never imports modal.

    Examples
    --------
    >>> warn_if_untested_modal()  # the pinned client: no warning
    """
    try:
        version: str | None = importlib.metadata.version("modal")
    except importlib.metadata.PackageNotFoundError:
        version = None
    problem = modal_version_problem(version)
    if problem is not None:
        warnings.warn(problem, UntestedModalClient, stacklevel=3)
