"""The IPython face of modal_magic: the ``%%modal_map``, ``%%modal_llm`` and ``%%modal_deploy`` cell magics.

One ``Magics`` class per concern (:class:`~modal_magic.ipython.map_magic.ModalMagic`,
:class:`~modal_magic.ipython.llm_magic.LLMMagic`, :class:`~modal_magic.ipython.deploy_magic.DeployMagic`) over one shared parser module
(:mod:`~modal_magic.ipython.parsing`). Nothing outside this package imports it: the library works
without IPython, and ``%load_ext modal_magic`` reaches it through :func:`load`.
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics

from .deploy_magic import DeployMagic
from .llm_magic import LLMMagic
from .map_magic import ModalMagic

__all__ = ["DeployMagic", "LLMMagic", "ModalMagic", "load", "unload"]

_MAGICS: tuple[type[Magics], ...] = (ModalMagic, LLMMagic, DeployMagic)


def load(ipython: Any) -> None:
    """Register ``%%modal_map``, ``%%modal_llm`` and ``%%modal_deploy`` (``%load_ext modal_magic``); loading twice keeps one copy.

    Examples
    --------
    >>> from IPython.core.interactiveshell import InteractiveShell
    >>> shell = InteractiveShell.instance()          # doctest: +SKIP
    >>> load(shell)                                  # doctest: +SKIP
    """
    unload(ipython)
    for magics in _MAGICS:
        ipython.register_magics(magics)


def unload(ipython: Any) -> None:
    """Remove the magics and their ``%config`` entries (``%unload_ext modal_magic``)."""
    manager = ipython.magics_manager
    for cls in _MAGICS:
        magics = manager.registry.pop(cls.__name__, None)
        if magics is None:
            continue
        for kind, table in magics.magics.items():
            for name, func in table.items():
                if manager.magics[kind].get(name) == func:
                    del manager.magics[kind][name]
        if magics in ipython.configurables:
            ipython.configurables.remove(magics)
