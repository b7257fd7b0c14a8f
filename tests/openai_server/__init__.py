"""Test-only local OpenAI-compatible chat completions server, for exercising the real ``openai`` client offline.

    from tests.openai_server import OpenAIServer

    with OpenAIServer(latency_s=0.05) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        ...
        server.requests          # what arrived, when

In pytest, use the ``openai_server`` fixture from ``tests.openai_server.fixture``.
"""

from .server import OpenAIServer, RequestRecord, answer_for, parse_markers

__all__ = ["OpenAIServer", "RequestRecord", "answer_for", "parse_markers"]
