"""Tests of the local Modal test server, driven only by the real ``modal`` client."""

import asyncio
import os
import time

import modal
import modal.exception
import pytest

from modal_magic.shipping import by_value
from tests.modal_server import running_modal_server

# The fixtures (`modal_server`, `modal_server_session`) live in tests/modal_server/fixture.py.
pytest_plugins = ["tests.modal_server.fixture"]


class BoomError(Exception):
    """Raised remotely; must come back to the client as this type."""


@pytest.fixture(autouse=True)
def _this_module_by_value():
    """Serialized functions here use this module's classes, which a container doesn't have: send them
    by value, as a user of a real Modal app must for code that isn't in the image."""
    with by_value([__name__]):
        yield


module_app = modal.App("test-module-level")


@module_app.function(timeout=60)
def module_level_cube(x):
    # Not serialized: the worker imports this test module and looks the function up by name.
    return x**3


def classify(text):
    return "positive" if "good" in text else "negative"


def classify_batch(texts):
    return [f"{t}:{len(texts)}" for t in texts]


def test_map_serialized_function(modal_server):
    app = modal.App("test-map")

    @app.function(serialized=True)
    def square(x):
        return x * x

    with app.run():
        assert list(square.map(range(50))) == [x * x for x in range(50)]
        assert square.remote(7) == 49

    rec = modal_server.function("square")
    assert rec["serialized"] is True
    assert modal_server.inputs_received == 51
    assert modal_server.rpc_counts["FunctionCreate"] == 1
    assert not modal_server.unimplemented_calls
    assert modal_server.live_worker_pids() == []  # containers stopped with the app


def test_module_level_function_and_spawn(modal_server):
    with module_app.run():
        assert list(module_level_cube.map([1, 2, 3])) == [1, 8, 27]
        call = module_level_cube.spawn(4)
        assert call.get(timeout=30) == 64
    rec = modal_server.function("module_level_cube")
    assert rec["serialized"] is False
    assert rec["module_name"].endswith("test_modal_server")
    assert rec["timeout_secs"] == 60


def test_unordered_map_and_kwargs(modal_server):
    app = modal.App("test-unordered")

    @app.function(serialized=True)
    def slow_first(x, offset=0):
        if x < 3:
            time.sleep(0.3)
        return x + offset

    with app.run():
        out = list(slow_first.map(range(20), kwargs={"offset": 100}, order_outputs=False))
        star = list(slow_first.starmap([(1, 2), (3, 4)]))
    assert sorted(out) == [x + 100 for x in range(20)]
    assert star == [3, 7]


def test_remote_exception_type_and_return_exceptions(modal_server):
    app = modal.App("test-exc")

    @app.function(serialized=True)
    def maybe_fail(x):
        if x == 3:
            raise BoomError(f"boom {x}")
        return x

    with app.run():
        results = list(maybe_fail.map(range(6), return_exceptions=True))
        with pytest.raises(BoomError, match="boom 3"):
            maybe_fail.remote(3)
        with pytest.raises(BoomError):
            list(maybe_fail.map(range(6)))

    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], BoomError)
    assert "boom 3" in str(results[3])


def test_crashing_input_is_reported_and_worker_replaced(modal_server):
    app = modal.App("test-crash")

    @app.function(serialized=True)
    def crashy(x):
        if x == 3:
            os._exit(17)
        return x * 10

    with app.run():
        results = list(crashy.map(range(8), return_exceptions=True))
        assert crashy.remote(4) == 40  # a fresh worker serves later inputs

    assert isinstance(results[3], modal.exception.InternalFailure)
    assert "exit code 17" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert modal_server.workers_started >= 2


def test_timeout(modal_server):
    app = modal.App("test-timeout")

    @app.function(serialized=True, timeout=1)
    def sleepy(x):
        if x == 1:
            time.sleep(30)
        return x

    t0 = time.monotonic()
    with app.run():
        results = list(sleepy.map(range(4), return_exceptions=True))
    assert time.monotonic() - t0 < 15
    assert isinstance(results[1], modal.exception.FunctionTimeoutError)
    assert [results[0], results[2], results[3]] == [0, 2, 3]


def test_retries_are_driven_by_the_client(modal_server, tmp_path):
    app = modal.App("test-retries")
    marker = str(tmp_path / "attempts")

    @app.function(serialized=True, retries=modal.Retries(max_retries=2, initial_delay=0.0, backoff_coefficient=1.0))
    def flaky(x):
        with open(f"{marker}-{x}", "a") as f:
            f.write(".")
        with open(f"{marker}-{x}") as f:
            attempts = len(f.read())
        if x == 1 and attempts < 2:
            raise BoomError("first attempt fails")
        return x

    with app.run():
        assert list(flaky.map(range(3))) == [0, 1, 2]
    assert modal_server.retries_received == 1
    assert modal_server.last_function["retries"] == 2


def test_function_config_is_recorded(modal_server):
    modal_server.add_secret("s", {"SECRET_VALUE": "hunter2"})
    app = modal.App("test-config")
    image = modal.Image.debian_slim().pip_install("x").apt_install("git").env({"A": "1"})

    @app.function(
        serialized=True,
        gpu="A10G",
        cpu=2,
        memory=1024,
        timeout=30,
        retries=2,
        max_containers=5,
        secrets=[modal.Secret.from_name("s")],
        image=image,
        volumes={"/data": modal.Volume.from_name("vol", create_if_missing=True)},
        env={"FROM_ENV": "yes"},
    )
    def configured():
        return os.environ.get("A"), os.environ.get("SECRET_VALUE"), os.environ.get("FROM_ENV")

    @app.function(serialized=True, gpu=["H100", "A100-80GB:2"])
    def fallback():
        return 1

    with app.run():
        assert configured.remote() == ("1", "hunter2", "yes")

    rec = modal_server.function("configured")
    assert (rec["gpu"], rec["gpu_count"]) == ("A10G", 1)
    assert rec["cpu"] == 2.0 and rec["memory"] == 1024 and rec["timeout_secs"] == 30
    assert rec["retries"] == 2 and rec["max_containers"] == 5
    assert rec["secret_names"] == ["s"]
    assert rec["secret_env"] == {"SECRET_VALUE": "hunter2", "FROM_ENV": "yes"}
    assert rec["pip_packages"] == ["x"] and rec["apt_packages"] == ["git"]
    assert rec["image_env"] == {"A": "1"}
    assert rec["volumes"] == {"/data": "vol"}
    assert any(c == "RUN python -m pip install x" for c in rec["image_commands"])
    fb = modal_server.function("fallback")
    assert fb["gpus"] == [{"type": "H100", "count": 1}, {"type": "A100-80GB", "count": 2}]
    assert fb["gpu_fallbacks"] == ["A100-80GB"]
    assert modal_server.secrets == {"s": {"SECRET_VALUE": "hunter2"}}


def test_unknown_secret_errors(modal_server):
    app = modal.App("test-missing-secret")

    @app.function(serialized=True, secrets=[modal.Secret.from_name("does-not-exist")])
    def f():
        return 1

    with pytest.raises(modal.exception.NotFoundError, match="does-not-exist"):
        with app.run():
            pass
    assert "does-not-exist" in modal_server.secret_lookups


def test_large_payloads_use_blobs(modal_server):
    app = modal.App("test-blobs")

    @app.function(serialized=True)
    def double(b):
        return b + b

    payload = os.urandom(3 * 1024 * 1024)
    with app.run():
        out = double.remote(payload)
        mapped = list(double.map([payload[:10], payload]))
    assert out == payload + payload
    assert mapped == [payload[:10] * 2, payload + payload]
    assert modal_server.blob_uploads >= 2  # arguments went through the HTTP upload endpoint
    assert modal_server.blob_downloads >= 2  # and results came back through download URLs


def test_deployed_function_from_name(modal_server):
    modal_server.deploy("my-app", "classify", classify)
    modal_server.deploy("my-app", "classify_batch", classify_batch, takes_batches=True, batch_max_size=4)

    f = modal.Function.from_name("my-app", "classify")
    assert f.remote("good stuff") == "positive"
    assert list(f.map(["good", "bad", "good day"])) == ["positive", "negative", "positive"]

    batched = modal.Function.from_name("my-app", "classify_batch")
    out = list(batched.map(["a", "b", "c", "d", "e"]))
    assert [o.split(":")[0] for o in out] == ["a", "b", "c", "d", "e"]
    assert all(1 <= int(o.split(":")[1]) <= 4 for o in out)

    with pytest.raises(modal.exception.NotFoundError):
        modal.Function.from_name("my-app", "nope").remote("x")
    modal_server.reset()
    assert modal_server.live_worker_pids() == []


def test_async_map(modal_server):
    app = modal.App("test-async")

    @app.function(serialized=True)
    async def add_one(x):
        await asyncio.sleep(0)
        return x + 1

    async def main():
        async with app.run():
            got = [r async for r in add_one.map.aio(range(10))]
            single = await add_one.remote.aio(41)
        return got, single

    got, single = asyncio.run(main())
    assert got == list(range(1, 11))
    assert single == 42


def test_logs_are_captured(modal_server):
    app = modal.App("test-logs")

    @app.function(serialized=True)
    def chatty(x):
        print(f"hello from input {x}")
        return x

    with app.run():
        assert list(chatty.map(range(3))) == [0, 1, 2]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(modal_server.logs) < 3:
        time.sleep(0.05)
    assert sorted(line for line in modal_server.logs if line.startswith("hello")) == [
        f"hello from input {i}" for i in range(3)
    ]


def test_many_tiny_inputs(modal_server):
    app = modal.App("test-many")

    @app.function(serialized=True)
    def inc(x):
        return x + 1

    n = 10_000  # ~4 s on an idle 2-core machine (timing is bench/'s job: here, only that every input returns)
    with app.run():
        total = sum(inc.map(range(n)))
    assert total == n * (n + 1) // 2
    assert modal_server.inputs_received == n


def test_running_modal_server_outside_pytest_fixtures():
    app = modal.App("test-context-manager")

    @app.function(serialized=True)
    def double(x):
        return 2 * x

    before = os.environ.get("MODAL_SERVER_URL")
    with running_modal_server(spare_workers=0) as server:
        assert os.environ["MODAL_SERVER_URL"] == server.url
        with app.run():
            assert double.remote(21) == 42
        assert server.inputs_received == 1
    assert os.environ.get("MODAL_SERVER_URL") == before


def test_spawned_calls_on_a_detached_app_outlive_the_client(modal_server):
    app = modal.App("detached")

    @app.function(serialized=True)
    def square(x):
        import time

        time.sleep(x[1])
        return x[0] ** 2

    with app.run(detach=True):
        quick = [square.spawn((i, 0.2)).object_id for i in range(3)]
        slow = square.spawn((9, 60)).object_id
    (app_record,) = modal_server.apps
    assert not app_record["stopped"], "a detached app keeps running after its client leaves"
    # What a new kernel does with the ids it recorded: collect the finished calls...
    assert [modal.FunctionCall.from_id(i).get(timeout=30) for i in quick] == [0, 1, 4]
    with pytest.raises(TimeoutError):
        modal.FunctionCall.from_id(slow).get(timeout=0.5)
    assert modal_server.executions == 4 and list(modal_server.executions_by_function.values()) == [4]
    # ...and cancel the one it no longer wants: then no call is left and the app stops by itself.
    modal.FunctionCall.from_id(slow).cancel()
    deadline = time.monotonic() + 10
    while not modal_server.apps[0]["stopped"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert modal_server.apps[0]["stopped"], "a detached app with no work left stops"
    assert modal_server.live_worker_pids() == []


def test_containers_report_their_lifecycle_to_the_client_as_modal_does(modal_server):
    """Each container's task states reach the client's output manager through the app's log stream:
    assigned, loading (its cold start), idle (up), completed (scaled down after scaledown_window)."""
    from modal._output.manager import OutputManager
    from modal._output.rich import RichOutputManager
    from modal_proto import api_pb2

    seen = []

    class Recording(RichOutputManager):
        def update_task_state(self, task_id, state):
            seen.append((task_id, state))

    previous = OutputManager.get()
    OutputManager._set(Recording())
    modal_server.container_start_delay_s = 0.5
    app = modal.App("test-lifecycle")

    @app.function(serialized=True, scaledown_window=2, max_containers=1)
    def double(x):
        return 2 * x

    try:
        with app.run():
            assert double.remote(4) == 8
            time.sleep(4)  # idle past its scaledown_window (and slack for a loaded machine): the container stops
    finally:
        OutputManager._set(previous)
    assert [state for _, state in seen] == [api_pb2.TASK_STATE_WORKER_ASSIGNED, api_pb2.TASK_STATE_LOADING_IMAGE,
                                            api_pb2.TASK_STATE_IDLE, api_pb2.TASK_STATE_COMPLETED]
    assert len({task_id for task_id, _ in seen}) == 1
    (start, stop), = modal_server.container_lifetimes()
    assert 2.5 <= stop - start < 4.5  # 0.5 s cold start, the call, 2 s idle before scale-down; not the app's end
