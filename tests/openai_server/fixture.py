"""pytest fixtures for the local OpenAI-compatible server.

Register them with ``pytest_plugins = ["tests.openai_server.fixture"]`` in ``tests/conftest.py``,
or import them into a test module.

Fixtures:
  openai_server_session  session-scoped: one server for the whole run, stopped at the end.
  openai_server          function-scoped: the same server, reset (no recorded requests, no latency),
                         with OPENAI_BASE_URL and OPENAI_API_KEY (``TEST_KEY``) set through monkeypatch.
"""

from __future__ import annotations

import pytest

from .server import OpenAIServer

#: the API key the ``openai_server`` fixture puts in the environment
TEST_KEY = "sk-test-0123456789abcdefSECRET"


def openai_env(server: OpenAIServer, key: str = TEST_KEY) -> dict[str, str]:
    """The environment an OpenAI client (or a notebook kernel) needs to talk to ``server``."""
    return {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": key}


@pytest.fixture(scope="session")
def openai_server_session():
    server = OpenAIServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_server(openai_server_session: OpenAIServer, monkeypatch: pytest.MonkeyPatch):
    server = openai_server_session
    server.reset()
    for key, value in openai_env(server).items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.reset()
