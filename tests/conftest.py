"""Shared fixtures: every backend by name, and a guard that fails the suite on leaked workers."""

from __future__ import annotations

import os
import signal
import tempfile
import threading

import psutil
import pytest

import modal_magic

pytest_plugins = ["tests.modal_server.fixture", "tests.openai_server.fixture"]

# Nothing the suite runs may read or fill the user's real result cache (kernels and servers the
# tests start inherit this too); each test also gets an empty cache of its own below.
os.environ["MODAL_MAGIC_CACHE_DIR"] = tempfile.mkdtemp(prefix="modal-magic-test-cache-")

LOCAL_BACKENDS = ["sequential", "local", "threads"]


@pytest.fixture(params=[*LOCAL_BACKENDS, "modal"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn (Modal against the local test server); all must give the same frame."""
    if request.param == "modal":
        request.getfixturevalue("modal_server")
    return request.param


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """An empty result cache per test, so a test never sees another's results."""
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True, scope="session")
def no_leaked_workers():
    """After the whole suite: no worker process and no modal_magic thread is left running."""
    yield
    modal_magic.shutdown()
    children = [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    workers = [p for p in children if "row_runner.py" in " ".join(p.cmdline())]
    assert not workers, f"worker processes left running: {workers}"
    stuck = [t.name for t in threading.enumerate() if t.name.startswith("modal_magic") and t.is_alive()]
    # threads abandoned by a timeout test finish their sleep and exit; give them a moment
    for t in threading.enumerate():
        if t.name.startswith("modal_magic"):
            t.join(timeout=10)
    stuck = [t.name for t in threading.enumerate() if t.name.startswith("modal_magic") and t.is_alive()]
    assert not stuck, f"threads left running: {stuck}"


@pytest.fixture
def loaded_shell():
    """A fresh IPython shell with history off and modal_magic loaded (``%load_ext modal_magic``)."""
    import atexit

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "modal_magic")
    yield shell
    # Its exit hook would reset the namespace and gc.collect() at interpreter exit, once per test.
    atexit.unregister(shell.atexit_operations)
    InteractiveShell.clear_instance()


@pytest.fixture
def sigint_raises():
    """Python's Ctrl-C handler, installed here: a shell that starts the suite in the background
    (``make test &``) ignores SIGINT, and Python then installs no handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
