"""modal_magic: run a Python function over a pandas column in parallel, from a notebook cell.

``import modal_magic`` registers the ``modal`` accessor on DataFrames and Series::

    out = df.modal.map(classify, column="text", into="label")          # local processes
    out = df.modal.map(embed, column="text", backend="modal", gpu="T4")  # Modal containers

``%load_ext modal_magic`` does the same in IPython and adds the ``%%modal_map`` cell magic.
"""

from __future__ import annotations

from typing import Any

from . import accessor as _accessor  # noqa: F401  (registers df.modal and series.modal)
from . import cache
from .runs import last_result, last_run
from .errors import Cancelled, MapInterrupted, ModalSetupError, RowError, RowFailed, UnpicklableResult, WorkerCrashed
from .options import MapOptions, OptionsError

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "MapInterrupted",
    "MapOptions",
    "ModalSetupError",
    "OptionsError",
    "RowError",
    "RowFailed",
    "UnpicklableResult",
    "WorkerCrashed",
    "cache",
    "last_result",
    "last_run",
    "load_ipython_extension",
    "shutdown",
    "unload_ipython_extension",
]


def shutdown() -> None:
    """Stop the warm local worker processes now (they start again on the next run).

    Examples
    --------
    >>> import modal_magic
    >>> modal_magic.shutdown()
    """
    from .backends.processes import shutdown_pool

    shutdown_pool()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext modal_magic``: register the magics (the accessors are registered on import)."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext modal_magic``: remove the magics again."""
    from .magics import unload

    unload(ipython)
