"""Modal: warm sessions of containers for ``backend="modal"``, and deployed Functions for ``"modal:APP/FN"``.

``backend="modal"`` runs batches of rows on a warm session: one detached ``modal.App`` per kernel and
container spec, kept up between cells for ``keep_warm`` seconds, whose one generic function receives
each user function once per container (see :mod:`.session`, :mod:`.container` and :mod:`.backend`).
Each batch is a spawned call recorded in the cache, so a new kernel picks a run up (:mod:`.reattach`).
``backend="modal:APP/FUNCTION"`` maps over an already deployed Function (:mod:`.deployed`). What runs
before and around either (credential and reachability checks, the image, Modal's output) is in
:mod:`.setup`. Importing this package imports the ``modal`` client only when a run starts.
"""

from __future__ import annotations

from ...errors import ModalSetupError
from .backend import DEFAULT_CONTAINERS, ModalBackend
from .deployed import DeployedBackend
from .session import sessions, shutdown_sessions
from .setup import check_credentials, check_reachable

__all__ = ["DEFAULT_CONTAINERS", "DeployedBackend", "ModalBackend", "ModalSetupError", "check_credentials", "check_reachable", "sessions",
           "shutdown_sessions"]
