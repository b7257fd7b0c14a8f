"""Test-only local server speaking Modal's gRPC protocol, for exercising the real ``modal`` client offline.

    from tests.modal_server import running_modal_server

    with running_modal_server() as server:   # sets MODAL_SERVER_URL & co. while active
        with app.run():
            results = list(f.map(range(10)))
        server.last_function["gpu"]

In pytest, use the ``modal_server`` fixture from ``tests.modal_server.fixture``.
"""

from .server import ModalTestServer, drop_cached_modal_client, running_modal_server

__all__ = ["ModalTestServer", "running_modal_server", "drop_cached_modal_client"]
