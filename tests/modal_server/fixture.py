"""pytest fixtures for the local Modal test server.

Register them with one line in ``tests/conftest.py``::

    pytest_plugins = ["tests.modal_server.fixture"]

Fixtures:
  modal_server_session  session-scoped: one server (grpc + blob HTTP) for the whole run, shared by
                        every module that uses it; stopped (all worker processes killed) at session end.
  modal_server          function-scoped: the same server, reset for the test (no apps, functions,
                        secrets or records left from other tests), with MODAL_SERVER_URL, MODAL_TOKEN_ID,
                        MODAL_TOKEN_SECRET, MODAL_CONFIG_PATH (a missing file) etc. set through
                        monkeypatch; after the test every worker process is killed again. modal_magic's
                        warm sessions are stopped before and after (each test starts with no warm app).
"""

from __future__ import annotations

import tempfile
import threading
import warnings

import pytest

from .server import ModalTestServer, client_env, drop_cached_modal_client

_lock = threading.Lock()
_shared: ModalTestServer | None = None
_refs = 0


def acquire_shared_server() -> ModalTestServer:
    """Process-wide server, started on first use (reference counted; see ``release_shared_server``)."""
    global _shared, _refs
    with _lock:
        if _shared is None:
            _shared = ModalTestServer().start()
        _refs += 1
        return _shared


def release_shared_server() -> None:
    global _shared, _refs
    with _lock:
        _refs -= 1
        if _refs > 0 or _shared is None:
            return
        server, _shared = _shared, None
    drop_cached_modal_client()
    server.stop()


@pytest.fixture(scope="session")
def modal_server_session():
    server = acquire_shared_server()
    try:
        yield server
    finally:
        release_shared_server()


def _cached_client_url() -> str | None:
    try:
        from modal.client import _Client
    except ImportError:
        return None
    client = _Client._client_from_env
    return client.server_url if client is not None else None


def stop_warm_sessions() -> None:
    """Stop modal_magic's warm Modal sessions: their apps live on a server that is about to forget them."""
    import sys

    if "modal_magic.backends.modal.session" in sys.modules:
        sys.modules["modal_magic.backends.modal.session"].shutdown_sessions()


@pytest.fixture
def modal_server(modal_server_session: ModalTestServer, monkeypatch: pytest.MonkeyPatch):
    server = modal_server_session
    stop_warm_sessions()
    server.reset()
    with tempfile.TemporaryDirectory(prefix="modal-config-") as config_dir:
        for key, value in client_env(server, config_dir).items():
            monkeypatch.setenv(key, value)
        cached = _cached_client_url()
        if cached is not None and cached != server.url:
            drop_cached_modal_client()  # a client singleton left pointing at some other server
        try:
            yield server
        finally:
            errors = list(server.internal_errors)
            stop_warm_sessions()
            server.reset()
            if errors:
                warnings.warn(f"local Modal test server hit internal errors:\n{errors[0]}", RuntimeWarning)
