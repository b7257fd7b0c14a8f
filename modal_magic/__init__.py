"""modal_magic: run a Python function over a pandas column in parallel, from a notebook cell.

``import modal_magic`` registers the ``modal`` accessor on DataFrames and Series::

    out = df.modal.map(classify, column="text", into="label")          # local processes
    out = df.modal.map(embed, column="text", backend="modal", gpu="T4")  # Modal containers

``%load_ext modal_magic`` does the same in IPython and adds the ``%%modal_map``, ``%%modal_llm`` and ``%%modal_deploy``
cell magics (the IPython side lives in :mod:`modal_magic.ipython`, which the library never imports).
"""

from __future__ import annotations

from typing import Any

from . import accessor as _accessor  # noqa: F401  (registers df.modal and series.modal)
from . import cache
from .backends import register_backend
from .checks import FunctionError
from .deploy import Deployment, deploy, deployments, undeploy
from .jobs import MapJob, attach, jobs
from .runs import last_result, last_run
from .errors import Cancelled, MapInterrupted, ModalSetupError, RowError, RowFailed, UnpicklableResult, WorkerCrashed
from .llm.keys import MissingAPIKey
from .llm.row.failures import (APIConnectionError, APIError, APIStatusError, AuthenticationError, BudgetExceeded,
                               EmptyAnswer, InternalServerError, LLMError, MissingValue, RateLimitError,
                               SchemaValidationError)
from .llm.templates import TemplateError
from .options import MapOptions, OptionsError
from .progress import RunSummary
from .shipping import ModuleStateWarning
from .versions import UntestedModalClient
from .versions import warn_if_untested_modal as _warn_if_untested_modal

_warn_if_untested_modal()

__version__ = "0.1.0"

__all__ = [
    # what a run raises or records
    "Cancelled",
    "FunctionError",
    "MapInterrupted",
    "ModalSetupError",
    "OptionsError",
    "RowError",
    "RowFailed",
    "UnpicklableResult",
    "WorkerCrashed",
    # an LLM row's errors (df.modal.llm)
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "AuthenticationError",
    "BudgetExceeded",
    "EmptyAnswer",
    "InternalServerError",
    "LLMError",
    "MissingAPIKey",
    "MissingValue",
    "RateLimitError",
    "SchemaValidationError",
    "TemplateError",
    # warnings
    "ModuleStateWarning",
    "UntestedModalClient",
    # the rest of the public API
    "Deployment",
    "MapJob",
    "MapOptions",
    "attach",
    "RunSummary",
    "cache",
    "deploy",
    "deployments",
    "last_result",
    "jobs",
    "last_run",
    "load_ipython_extension",
    "register_backend",
    "sessions",
    "shutdown",
    "undeploy",
    "unload_ipython_extension",
]


def shutdown() -> None:
    """Stop the warm local worker processes and every warm Modal session (its app and containers).

    Both start again on the next run that needs them.

    Examples
    --------
    >>> import modal_magic
    >>> modal_magic.shutdown()
    """
    import sys

    from .backends.pool import shutdown_pool

    shutdown_pool()
    if "modal_magic.backends.modal.session" in sys.modules:  # never import the Modal client just to stop nothing
        from .backends.modal.session import shutdown_sessions

        shutdown_sessions()


def sessions() -> list[dict[str, Any]]:
    """The warm Modal sessions of this kernel: one line per app kept up between cells.

    Each line: ``app_id``, ``spec`` (what made its containers: image, GPU, secrets...),
    ``containers`` (running at the last update), ``runs`` (served so far), ``running`` (now),
    ``idle_s`` and ``keep_warm_s`` (the session and its containers stop after that much idle time),
    ``container_s`` and ``compute_usd``: its containers' time so far, start-up and idle included,
    and its estimated dollars at ``modal_magic.costs.MODAL_RATES`` (the runs' figures add up to it).

    Examples
    --------
    >>> import modal_magic
    >>> modal_magic.sessions()
    []
    """
    import sys

    if "modal_magic.backends.modal.session" not in sys.modules:
        return []
    from .backends.modal.session import sessions as live

    return live()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext modal_magic``: register ``%%modal_map``, ``%%modal_llm`` and ``%%modal_deploy`` (the accessors are registered on import)."""
    from .ipython import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext modal_magic``: remove the magics and their ``%config`` entries."""
    from .ipython import unload

    unload(ipython)
