"""Where the result cache lives, and making that place private to the current user.

:func:`default_cache_dir` picks the directory; :func:`make_private_directory` and
:func:`make_private_file` create it and the database's files readable by their owner only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CacheWarning", "default_cache_dir", "make_private_directory", "make_private_file"]


class CacheWarning(UserWarning):
    """The cache couldn't be read or written; the run goes on without it for the rows concerned."""



def default_cache_dir() -> Path:
    """The directory the cache lives in unless told otherwise.

    ``$MODAL_MAGIC_CACHE_DIR`` if set; else ``$XDG_CACHE_HOME/modal_magic`` (when that is an
    absolute path); else ``%LOCALAPPDATA%\\modal_magic\\Cache`` on Windows; else
    ``~/.cache/modal_magic``.

    Examples
    --------
    >>> default_cache_dir().name in ("modal_magic", "Cache") or "MODAL_MAGIC_CACHE_DIR" in os.environ
    True
    """
    explicit = os.environ.get("MODAL_MAGIC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "modal_magic"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "modal_magic" / "Cache"
    return Path.home() / ".cache" / "modal_magic"



def make_private_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) with mode 0o700 when it is missing."""
    if directory.is_dir():
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # the mode passed to makedirs is masked by the umask


def make_private_file(path: Path, create: bool = True) -> None:
    """Make ``path`` readable by its owner only (creating it empty if asked and missing).

    Never opens a file that may already exist: closing any descriptor of a file drops every POSIX
    lock this process holds on it, and SQLite's locks on the database and its ``-shm`` file are
    exactly that; losing them lets another process reset the shared memory under us (SIGBUS).
    """
    if create:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            return
        except FileExistsError:
            pass
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        return

