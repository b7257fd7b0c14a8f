"""Setting up a Modal run: the checks that fail fast, the image and function arguments, Modal's output.

Everything here runs in the kernel before or around a run: :func:`check_credentials` and
:func:`check_reachable` fail in seconds with advice instead of the client's minute of retries,
:func:`build_image` and :func:`function_kwargs` turn :class:`~modal_magic.options.MapOptions` into
``App.function(...)`` arguments, :func:`spec_of` says which of them make a container pool (so a
changed one starts new containers, and :func:`spec_changes` says which), and :func:`capturing_output`
routes Modal's own output (image builds, container logs) to a sink the progress display reads,
passing on each container's state changes (which count containers and their billed time).
"""

from __future__ import annotations

import socket
import sys
import threading
import traceback
from typing import Any
from urllib.parse import urlparse

import cloudpickle

from ...costs import input_timeout_s
from ...errors import ModalSetupError, WorkerCrashed
from ...options import MapOptions

# --- preflight: fast, clear failures before anything starts ---------------------------------------------


def check_credentials() -> None:
    """Fail at once, saying how to authenticate, when no Modal token is configured."""
    from modal.config import config

    if not (config.get("token_id") and config.get("token_secret")):
        raise ModalSetupError(
            "no Modal token found. Run `modal token new` (or `python -m modal setup`) once, or set "
            "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET (from https://modal.com/settings/tokens); "
            "or run locally with backend='local'"
        )


def check_reachable(timeout_s: float = 5.0) -> None:
    """Fail within seconds when Modal's server can't be reached (the client would retry for a minute)."""
    from modal.config import config

    # modal's default is a comma-separated list of servers ("https://api.modal.com,https://..."): the first is tried first
    url = urlparse(config.get("server_url").split(",")[0].strip())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ModalSetupError(
            f"can't reach Modal at {url.scheme}://{url.hostname}:{port} ({e.strerror or e}); "
            "check your network, proxy, or MODAL_SERVER_URL"
        ) from None


def local_python_version() -> str:
    """This kernel's ``MAJOR.MINOR`` Python version, which the default image matches."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def check_python_version(options: MapOptions) -> None:
    """A function defined in a notebook is pickled, and bytecode only loads on the same Python version."""
    wanted = options.python_version
    if wanted is not None and wanted != local_python_version():
        raise ModalSetupError(
            f"python_version={wanted!r} differs from this kernel's Python {local_python_version()}: "
            "a notebook-defined function is pickled and only loads on the same version. Leave "
            "python_version unset (the image then matches this kernel) or run the kernel on "
            f"Python {wanted}"
        )


# --- building the app ---------------------------------------------------------------------------------


def build_image(options: MapOptions) -> Any:
    """The container image: ``image=`` as given, else debian_slim on this kernel's Python + pip/apt."""
    import modal

    if options.image is not None:
        return options.image
    image = modal.Image.debian_slim(python_version=options.python_version or local_python_version())
    if options.apt:
        image = image.apt_install(*options.apt)
    # The rows' code and results are pickled on both sides: match this kernel's cloudpickle.
    return image.pip_install(f"cloudpickle=={cloudpickle.__version__}", *options.pip)


def function_kwargs(options: MapOptions, batch_rows: int) -> dict[str, Any]:
    """``App.function(...)`` arguments from the options (``batch_rows``: rows per input, for the timeout)."""
    import modal

    secrets = [modal.Secret.from_name(s) if isinstance(s, str) else s for s in options.secrets]
    volumes = {
        path: modal.Volume.from_name(v, create_if_missing=True) if isinstance(v, str) else v
        for path, v in options.volumes.items()
    }
    kwargs: dict[str, Any] = {
        "image": build_image(options),
        "serialized": True,
        "secrets": secrets,
        "volumes": volumes,
    }
    if options.env:
        kwargs["env"] = dict(options.env)
    if options.gpu is not None:
        kwargs["gpu"] = options.gpu
    if options.cpu is not None:
        kwargs["cpu"] = options.cpu
    if options.memory is not None:
        kwargs["memory"] = options.memory
    if options.max_containers is not None:
        kwargs["max_containers"] = options.max_containers
    if options.retries:
        kwargs["retries"] = options.retries
    if options.timeout is not None:  # the same figure a map's budget_usd books per input
        kwargs["timeout"] = input_timeout_s(options.timeout, options.retries, batch_rows)
    if options.keep_warm:
        kwargs["scaledown_window"] = options.keep_warm
    return kwargs


def spec_of(options: MapOptions) -> dict[str, Any]:
    """What makes a pool of containers, in words: two runs with equal specs share warm containers.

    The function itself is not part of it (containers load each new function they are sent), nor
    are the options that only change how rows are sent (``batch_size``, ``progress``...).

    Examples
    --------
    >>> spec = spec_of(MapOptions.create(backend="modal", gpu="T4", pip=["torch"]))
    >>> spec["gpu"], spec["image"].endswith("+ pip ['torch']")
    ('T4', True)
    """
    if options.image is not None:
        image = f"image={getattr(options.image, 'object_id', None) or f'<modal.Image at {id(options.image):#x}>'}"
    else:
        image = f"debian_slim(python {options.python_version or local_python_version()})"
        image += f" + apt {list(options.apt)}" if options.apt else ""
        image += f" + pip {list(options.pip)}" if options.pip else ""
    return {
        "image": image,
        "gpu": options.gpu if isinstance(options.gpu, (str, type(None))) else tuple(options.gpu),
        "cpu": options.cpu,
        "memory": options.memory,
        "secrets": tuple(s if isinstance(s, str) else f"<Secret {getattr(s, 'object_id', id(s))}>"
                         for s in options.secrets),
        "env": tuple(sorted(options.env.items())),
        "volumes": tuple(sorted((k, v if isinstance(v, str) else f"<Volume {id(v):#x}>")
                                for k, v in options.volumes.items())),
        "timeout": options.timeout,
        "retries": options.retries,
        "max_containers": options.max_containers,
        "keep_warm": options.keep_warm,
    }


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The options that differ between two specs, as ``"gpu T4 → A10G, memory None → 4096"``.

    Examples
    --------
    >>> spec_changes({"gpu": "T4", "cpu": 1}, {"gpu": "A10G", "cpu": 1})
    'gpu T4 → A10G'
    """
    return ", ".join(f"{name} {_shown(old.get(name))} → {_shown(value)}"
                     for name, value in new.items() if old.get(name) != value)


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):  # secrets (names), or env / volumes as (key, value) pairs
        return ", ".join(f"{v[0]}={v[1]}" if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def error_tuples(i: int, exc: BaseException) -> tuple[int, str, str, str, int, Any]:
    # Modal rebuilds the remote traceback onto the exception it raises locally.
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (i, type(exc).__name__, str(exc), tb, 1, exc)


class LineSink:
    """A file for rich to write to: complete lines are kept for the progress display to fetch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = ""
        self._lines: list[str] = []

    def write(self, text: str) -> int:
        with self._lock:
            *done, self._partial = (self._partial + text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
            self._lines.extend(line.rstrip() for line in done if line.strip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def drain(self) -> list[str]:
        with self._lock:
            lines, self._lines = self._lines, []
        return lines


def capturing_output(sink: LineSink, on_task_state: Any) -> Any:
    """Modal's own output manager, writing to ``sink`` instead of the notebook; each container's state
    change (``on_task_state(task_id, state)``, from the app's log stream) goes to the caller too."""
    from modal._output.rich import RichOutputManager
    from rich.console import Console

    class CapturingOutputManager(RichOutputManager):
        def __init__(self) -> None:
            super().__init__()
            self._console = Console(file=sink, width=120, force_terminal=False, force_jupyter=False,
                                    highlight=False, color_system=None)
            self._stderr_console = self._console
            self._use_ansi_color = False

        def function_progress_callback(self, tag: str, total: int | None) -> Any:
            return lambda completed, total: None  # our bar shows progress; no second one in the logs

        def update_task_state(self, task_id: str, state: int) -> None:
            super().update_task_state(task_id, state)
            on_task_state(task_id, state)

    return CapturingOutputManager()


def lost_cause(error: BaseException) -> BaseException:
    """Name an input lost with its container the way the local backends do: crashed or timed out."""
    text = f"{type(error).__name__}: {error}"
    if "Timeout" in type(error).__name__:
        return TimeoutError(f"the Modal container ran past its timeout ({text})")
    return WorkerCrashed(f"the Modal container running this row was lost ({text})")


def setup_error(error: BaseException) -> BaseException:
    """Turn Modal's set-up failures into messages that say what to do."""
    name = type(error).__name__
    text = str(error)
    if name == "NotFoundError" and "Secret" in text:
        return ModalSetupError(f"{text}. Create it with `modal secret create NAME KEY=VALUE` or on modal.com/secrets")
    if name in ("AuthError", "Unauthenticated"):
        return ModalSetupError(f"Modal rejected the token ({text}); run `modal token new`")
    return error


