"""Where the result cache lives, and making sure that place is the current user's alone.

:func:`default_cache_dir` picks the directory. Cached values are pickles, and unpickling runs code,
so the cache is only used where nobody else can write: :func:`make_private_directory` creates the
directory with mode 0o700 and refuses (:class:`UnsafeCacheError`) one that another user owns or
that group or others may write; :func:`check_own_file` refuses a database file that is a symlink,
not a regular file, or someone else's. :func:`load_key` reads (creating it on first use) the
per-user secret that stored values are authenticated with (:mod:`modal_magic.cache.chunks`), so a
value written by anyone without it is never unpickled.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from pathlib import Path

__all__ = ["CacheWarning", "UnsafeCacheError", "default_cache_dir", "make_private_directory",
           "make_private_file", "check_own_file", "load_key", "KEY_NAME", "KEY_BYTES_SECRET"]

#: the secret key's file inside the cache directory (mode 0o600)
KEY_NAME = "key-v1"
KEY_BYTES_SECRET = 32
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: POSIX ownership checks; on Windows the profile directory's ACLs do this job
_POSIX = hasattr(os, "geteuid")


class CacheWarning(UserWarning):
    """The cache couldn't be read or written; the run goes on without it for the rows concerned."""


class UnsafeCacheError(PermissionError):
    """The cache's directory or a file in it could be written by someone else: it is not used."""



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
    """Create ``directory`` (and its parents) with mode 0o700, or check that the existing one is private.

    Raises :class:`UnsafeCacheError` when it exists but belongs to another user or may be written
    by group or others: a planted value there would run code when read.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as parent:
    ...     make_private_directory(Path(parent) / "cache")
    ...     print(oct(os.stat(Path(parent) / "cache").st_mode & 0o777))
    0o700
    """
    if not directory.is_dir():
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # the mode passed to makedirs is masked by the umask
    if not _POSIX:
        return
    info = os.stat(directory)  # a symlinked directory is fine if what it points to is private
    if info.st_uid != os.geteuid():
        raise UnsafeCacheError(
            f"{directory} belongs to another user (uid {info.st_uid}), who could plant results that run code "
            "when read; point MODAL_MAGIC_CACHE_DIR at a directory of your own"
        )
    if info.st_mode & 0o022:
        raise UnsafeCacheError(
            f"{directory} is writable by other users (mode {oct(stat.S_IMODE(info.st_mode))}), who could plant "
            f"results that run code when read; run `chmod 700 {directory}` or point MODAL_MAGIC_CACHE_DIR "
            "at a private directory"
        )


def check_own_file(path: Path) -> None:
    """Refuse (:class:`UnsafeCacheError`) a ``path`` that is a symlink, not a regular file, or not ours.

    A missing file is fine (it will be created). SQLite follows symlinks, so one planted at the
    database's path would make it read and write a file of the planter's choosing.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeCacheError(f"{path} is a symlink; the cache only uses files it created itself: remove it")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeCacheError(f"{path} is not a regular file; remove it")
    if _POSIX and info.st_uid != os.geteuid():
        raise UnsafeCacheError(f"{path} belongs to another user (uid {info.st_uid}); remove it")


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


def load_key(directory: Path) -> bytes:
    """The per-user secret that authenticates stored values, created on first use.

    It lives in ``directory/key-v1`` (mode 0o600, :data:`KEY_BYTES_SECRET` random bytes from
    :func:`secrets.token_bytes`). Made under a temporary name and linked into place, so two
    processes starting at once agree on one key and neither reads a half-written file. A key file
    that is a symlink, someone else's, readable by others or the wrong size is refused.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     key = load_key(Path(directory))
    ...     print(len(key), key == load_key(Path(directory)))
    32 True
    """
    path = directory / KEY_NAME
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    temporary = directory / f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES_SECRET))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        except OSError as e:  # a file system without hard links: rename, which can't refuse to replace
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if not os.path.lexists(path):
                os.replace(temporary, path)
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW refused a symlink
            raise UnsafeCacheError(f"{path} is a symlink; remove it (a new key is made)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeCacheError(f"{path} is not a regular file; remove it")
        if _POSIX and (info.st_uid != os.geteuid() or info.st_mode & 0o077):
            raise UnsafeCacheError(
                f"{path} is not private (owner uid {info.st_uid}, mode {oct(stat.S_IMODE(info.st_mode))}): "
                "anyone who can read it can forge cached results; remove it (a new one is made)"
            )
        key = f.read(KEY_BYTES_SECRET + 1)
    if len(key) != KEY_BYTES_SECRET:
        raise UnsafeCacheError(f"{path} is not a modal_magic key ({len(key)} bytes); remove it (a new one is made)")
    return key
