"""From notebook to nightly job: deploy a notebook's function to Modal as a named, optionally scheduled Function.

:func:`deploy` takes the function a cell defined and the same container options as a map (image,
pip/apt, gpu, cpu, memory, secrets, env, volumes, timeout, retries, max_containers), ships it the
way the map path does (``serialized=True``, the user's own modules by value), and deploys it as
``APP/NAME``: a persistent Modal Function that teammates call by name, that
``df.modal.map(None, column=..., backend="modal:APP/NAME")`` maps over row by row, and that Modal
runs on ``schedule=`` (a cron string, ``modal.Cron`` or ``modal.Period``). modal_magic itself is
added to the image (its source, with pandas, numpy and cloudpickle at this kernel's versions), so a
scheduled function can load rows and map them with ``df.modal.map`` inside its container, where
those maps run on the container's own cores. Every deploy is recorded on this machine (a JSON file
next to the result cache): :func:`deployments` lists them and :func:`undeploy` stops an app.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cloudpickle

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; records are still replaced atomically
    fcntl = None  # type: ignore[assignment]

from .checks import FunctionError, check_picklable
from .errors import ModalSetupError, OptionsError
from .options import MapOptions
from .schedules import describe, to_schedule

__all__ = ["CONTAINER_OPTIONS", "Deployment", "deploy", "deployments", "undeploy"]

#: the options that describe a deployed function's container (a map's other options don't apply)
CONTAINER_OPTIONS = ("image", "pip", "apt", "python_version", "gpu", "cpu", "memory", "secrets", "env",
                     "volumes", "timeout", "retries", "max_containers")
#: what modal_magic needs in a container to map there, pinned to this kernel's versions
_RUNTIME_PACKAGES = ("pandas", "numpy", "cloudpickle", "psutil", "xxhash")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,62}")
_RECORDS = "deployments.json"
#: how long one deploy may take (image builds on Modal can take minutes)
DEPLOY_TIMEOUT_S = 30 * 60


@dataclass(frozen=True)
class Deployment:
    """A function deployed from this machine: where it lives, when it runs, and how to call it.

    Examples
    --------
    >>> d = Deployment(app="nightly", function="score", schedule='cron "0 2 * * *" (UTC)',
    ...                deployed_at="2026-12-03T02:00:00+00:00", image="debian_slim python 3.11")
    >>> d.name
    'nightly/score'
    """

    app: str
    function: str
    schedule: str | None
    deployed_at: str
    image: str

    @property
    def name(self) -> str:
        """``APP/FUNCTION``, as ``backend="modal:APP/FUNCTION"`` spells it."""
        return f"{self.app}/{self.function}"

    def __str__(self) -> str:
        when = f"runs {self.schedule}" if self.schedule else "no schedule: runs when called"
        return (
            f"Deployed {self.name} ({when}; image: {self.image}).\n"
            f"Map a column over it:  df.modal.map(None, column=..., backend=\"modal:{self.name}\")\n"
            f"Call it by name:       modal.Function.from_name({self.app!r}, {self.function!r}).remote(...)\n"
            f"Stop it:               modal_magic.undeploy({self.app!r})"
        )

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _split_name(name: Any) -> tuple[str, str]:
    app, slash, function = str(name).partition("/") if isinstance(name, str) else ("", "", "")
    if not (slash and _NAME.fullmatch(app) and _NAME.fullmatch(function)):
        raise OptionsError(
            f"name={name!r} is not valid: expected 'APP/FUNCTION', e.g. 'nightly/score' (letters, digits, '-', "
            "'_' and '.', up to 63 characters each)"
        )
    return app, function


def _container_options(options: dict[str, Any]) -> MapOptions:
    other = [k for k in options if k not in CONTAINER_OPTIONS]
    if other:
        from .options import OPTION_NAMES

        known = [k for k in other if k in OPTION_NAMES]
        if known:
            raise OptionsError(
                f"deploy() takes container options only ({', '.join(CONTAINER_OPTIONS)}); "
                f"{', '.join(map(repr, known))} appl{'ies' if len(known) == 1 else 'y'} to a map: pass "
                "it to df.modal.map(..., backend='modal:APP/FUNCTION') instead"
            )
    return MapOptions.create(backend="modal", **options)  # unknown names get their did-you-mean here


def _runtime_pins(options: MapOptions) -> list[str]:
    asked = {re.split(r"[<>=!~\[ ;]", p, maxsplit=1)[0].lower() for p in options.pip}
    return [f"{package}=={importlib.metadata.version(package)}" for package in _RUNTIME_PACKAGES
            if package not in asked]


def deploy_image(options: MapOptions) -> Any:
    """The map path's image plus what a container needs to run modal_magic itself.

    Examples
    --------
    >>> image = deploy_image(MapOptions.create(backend="modal", pip=["scikit-learn"]))  # doctest: +SKIP
    """
    from .backends.modal.setup import build_image

    image = build_image(options)
    pins = [p for p in _runtime_pins(options) if not p.startswith("cloudpickle==")]  # build_image pins it
    if pins:
        image = image.pip_install(*pins)
    return image.add_local_python_source("modal_magic")


def _image_words(options: MapOptions) -> str:
    if options.image is not None:
        return "your image + modal_magic"
    from .backends.modal.setup import local_python_version

    words = [f"debian_slim python {options.python_version or local_python_version()}"]
    if options.pip:
        words.append("pip " + " ".join(options.pip))
    if options.apt:
        words.append("apt " + " ".join(options.apt))
    if options.gpu:
        words.append(f"gpu {options.gpu}")
    return ", ".join(words)


def deploy(fn: Callable[..., Any], name: str, schedule: Any = None, **options: Any) -> Deployment:
    """Deploy ``fn`` to Modal as the persistent Function ``name`` (``"APP/FUNCTION"``), optionally on a schedule.

    Parameters
    ----------
    fn
        The function, as a notebook cell defined it; it is serialized as ``df.modal.map`` sends it.
    name
        ``"APP/FUNCTION"``: the Modal app to deploy into and the function's name in it. Deploying the
        same name again replaces the function (an edited cell redeploys this way).
    schedule
        ``None`` (run when called), a cron string (``"0 2 * * *"``: 02:00 UTC every day),
        ``modal.Cron(..., timezone=...)`` or ``modal.Period(hours=6)``. A bad cron string is refused
        here, before anything is built.
    **options
        The container options of a map: ``image``, ``pip``, ``apt``, ``python_version``, ``gpu``,
        ``cpu``, ``memory``, ``secrets``, ``env``, ``volumes``, ``timeout`` (seconds per call),
        ``retries``, ``max_containers``.

    Returns
    -------
    Deployment
        Its name, schedule, time and image; printing it says how to call the function.

    Examples
    --------
    >>> def nightly():  # doctest: +SKIP
    ...     df = pd.read_parquet("/data/today.parquet")
    ...     df.modal.map(score, column="text").to_parquet("/data/scored.parquet")
    >>> modal_magic.deploy(nightly, "reviews/nightly", schedule="0 2 * * *",
    ...                    volumes={"/data": "reviews"})  # doctest: +SKIP
    """
    app_name, function_name = _split_name(name)
    _check_callable(fn, scheduled=schedule is not None)
    modal_schedule = to_schedule(schedule)
    opts = _container_options(options)
    from .backends.modal.setup import check_credentials, check_python_version, check_reachable

    check_python_version(opts)
    check_picklable(fn, where="Modal", otherwise="")
    check_credentials()
    check_reachable()
    _deploy_function(fn, app_name, function_name, modal_schedule, opts)
    record = Deployment(app=app_name, function=function_name, schedule=describe(modal_schedule),
                        deployed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        image=_image_words(opts))
    with _records() as records:
        records[record.name] = asdict(record)
    return record


def _check_callable(fn: Any, *, scheduled: bool) -> None:
    if not callable(fn):
        raise FunctionError(f"expected a function to deploy, got {type(fn).__name__} {fn!r:.60}")
    if not scheduled:
        return
    try:
        inspect.signature(fn).bind()
    except TypeError:
        raise FunctionError(
            f"{getattr(fn, '__name__', fn)}{inspect.signature(fn)} can't run on a schedule: Modal calls a scheduled "
            "function with no arguments. Give its parameters defaults, or deploy it without schedule= and call it "
            "from a scheduled function that loads its inputs"
        ) from None
    except ValueError:  # no signature to read (some builtins): Modal will say if it can't be called
        return


def _deploy_function(fn: Callable[..., Any], app_name: str, function_name: str, schedule: Any,
                     opts: MapOptions) -> None:
    import modal

    from .backends.base import LoopThread
    from .backends.modal.setup import function_kwargs, setup_error
    from .shipping import by_value, by_value_packages

    kwargs = function_kwargs(opts, 1)
    kwargs["image"] = deploy_image(opts)
    kwargs["name"] = function_name
    if opts.timeout is not None:  # a deployed function's timeout is per call, as Modal counts it
        kwargs["timeout"] = int(min(max(math.ceil(opts.timeout), 10), 24 * 3600))
    if schedule is not None:
        kwargs["schedule"] = schedule
    app = modal.App(app_name)
    deployed = _with_accessor(fn)
    loop = LoopThread("modal_magic-deploy")
    try:
        # Modal's client pickles the function when it deploys: the user's modules go by value then.
        with by_value([*by_value_packages(fn), *cloudpickle.list_registry_pickle_by_value()]):
            app.function(**kwargs)(deployed)
            loop.call(app.deploy.aio(name=app_name)).result(timeout=DEPLOY_TIMEOUT_S)
    except Exception as e:
        raise setup_error(e) from None
    finally:
        loop.stop()


def _with_accessor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with modal_magic imported first in the container, so ``df.modal`` works in its body."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def deployed_async(*args: Any, **kwargs: Any) -> Any:
            import modal_magic  # noqa: F401  (registers the df.modal accessor in the container)

            return await fn(*args, **kwargs)

        return deployed_async

    @functools.wraps(fn)
    def deployed(*args: Any, **kwargs: Any) -> Any:
        import modal_magic  # noqa: F401  (registers the df.modal accessor in the container)

        return fn(*args, **kwargs)

    return deployed


def undeploy(app: str) -> None:
    """Stop the deployed Modal app ``app`` (its schedules and every function in it) and forget its records.

    Examples
    --------
    >>> modal_magic.undeploy("reviews")  # doctest: +SKIP
    """
    if not isinstance(app, str) or not _NAME.fullmatch(app):
        raise OptionsError(f"app={app!r} is not valid: expected the app part of 'APP/FUNCTION', e.g. 'reviews'")
    import modal

    from .backends.base import LoopThread
    from .backends.modal.setup import check_credentials, check_reachable

    check_credentials()
    check_reachable()

    async def stop() -> None:
        found = await modal.App.lookup.aio(app)
        await found.stop.aio()

    loop = LoopThread("modal_magic-undeploy")
    try:
        loop.call(stop()).result(timeout=120)
    except Exception as e:
        if type(e).__name__ == "NotFoundError":
            _forget(app)
            raise ModalSetupError(f"no deployed Modal app {app!r}: see modal_magic.deployments() or "
                                  "`modal app list` for the names") from None
        raise
    finally:
        loop.stop()
    _forget(app)


def deployments() -> Any:
    """What was deployed from this machine: one row per function, newest first.

    Columns: ``name`` (``APP/FUNCTION``), ``schedule``, ``deployed_at`` (UTC), ``image``.

    Examples
    --------
    >>> modal_magic.deployments()  # doctest: +SKIP
                 name                schedule                deployed_at                         image
    0  reviews/nightly  cron "0 2 * * *" (UTC)  2026-12-03T14:02:11+00:00  debian_slim python 3.11, ...
    """
    import pandas as pd

    records = sorted(_load_records().values(), key=lambda r: r["deployed_at"], reverse=True)
    rows = [{"name": f"{r['app']}/{r['function']}", "schedule": r["schedule"], "deployed_at": r["deployed_at"],
             "image": r["image"]} for r in records]
    return pd.DataFrame(rows, columns=["name", "schedule", "deployed_at", "image"])


# --- the records file: JSON (nothing in it is executed), in the cache's private directory ---------------


def _records_dir() -> Path | None:
    """The cache's directory, or ``None`` (after a warning) where it isn't safe to write to."""
    from .cache.location import CacheWarning, UnsafeCacheError, default_cache_dir, make_private_directory

    directory = default_cache_dir()
    try:
        make_private_directory(directory)
    except (UnsafeCacheError, OSError) as e:
        warnings.warn(f"deployments are not recorded on this machine: {e}", CacheWarning, stacklevel=3)
        return None
    return directory


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        data = e
    if not isinstance(data, dict) or not all(isinstance(r, dict) for r in data.values()):
        raise ModalSetupError(f"the deployments record {path} is damaged ({data}); delete it to start a new one "
                              "(deployed apps are not affected: `modal app list` shows them)")
    return data


@contextlib.contextmanager
def _records() -> Iterator[dict[str, dict[str, Any]]]:
    """The records, to change in place: written back atomically, one process at a time."""
    directory = _records_dir()
    if directory is None:
        yield {}
        return
    path = directory / _RECORDS
    with open(directory / f"{_RECORDS}.lock", "a") as lock:  # two kernels deploying at once keep both records
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        records = _read(path)
        before = json.dumps(records, sort_keys=True)
        yield records
        if json.dumps(records, sort_keys=True) == before:
            return
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".deployments-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(records, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _load_records() -> dict[str, dict[str, Any]]:
    with _records() as records:
        return dict(records)


def _forget(app: str) -> None:
    with _records() as records:
        for name in [k for k, v in records.items() if v.get("app") == app]:
            del records[name]
