"""backend="modal" with the real modal client against the local Modal-protocol test server."""

from __future__ import annotations

import os
import socket
import sys
import time

import pandas as pd
import pytest

import modal_magic  # noqa: F401
from modal_magic import OptionsError
from modal_magic import ModalSetupError


def inverse(x):
    return 10 // x


def exit_on_3(x):
    if x == 3:
        os._exit(7)
    return x * 2


def sleep_on_1(x):
    if x == 1:
        time.sleep(20)
    return x


def length(text):
    return len(text)


def big_result(n):
    return "y" * n


def read_secret(_):
    return os.environ.get("API_KEY", "missing")


def classify(text):
    return "POSITIVE" if "good" in text else "NEGATIVE"


def test_every_option_reaches_function_create(modal_server):
    df = pd.DataFrame({"x": [1, 2]})
    modal_server.add_secret("openai-secret", {"API_KEY": "sk-test"})
    out = df.modal.map(
        read_secret, column="x", backend="modal", gpu=["A10G", "T4:2"], cpu=2, memory=2048,
        pip=["requests==2.32.3"], apt=["ffmpeg"], env={"MODE": "fast"}, secrets=["openai-secret"],
        volumes={"/data": "my-volume"}, timeout=30, retries=2, max_containers=5, batch_size=4, progress=False,
    )
    assert out["read_secret"].tolist() == ["sk-test", "sk-test"], "the secret reached the container"
    fn = modal_server.last_function
    assert fn["serialized"] is True
    assert [(g["type"], g["count"]) for g in fn["gpus"]] == [("A10G", 1), ("T4", 2)]
    assert fn["cpu"] == 2 and fn["memory"] == 2048
    assert fn["retries"] == 2 and fn["max_containers"] == 5
    assert fn["timeout_secs"] == 30 * 4 * 3 + 10 + 5  # 4 rows a batch, 3 tries each, plus backoff and slack
    assert "requests==2.32.3" in fn["pip_packages"]
    assert any(p.startswith("cloudpickle==") for p in fn["pip_packages"]), "the image matches our cloudpickle"
    assert "ffmpeg" in fn["apt_packages"]
    assert fn["secret_names"] == ["openai-secret"]
    assert fn["volumes"] == {"/data": "my-volume"}
    assert fn["env"].get("MODE") == "fast"


def test_rows_are_batched_into_few_inputs(modal_server):
    df = pd.DataFrame({"x": range(1, 2001)})
    out = df.modal.map(inverse, column="x", backend="modal", progress=False)
    assert out["inverse"].tolist() == [10 // x for x in range(1, 2001)]
    assert modal_server.inputs_received <= 2000 / 4, modal_server.inputs_received


def test_a_dying_container_costs_only_its_row(modal_server):
    df = pd.DataFrame({"x": range(8)})
    out = df.modal.map(exit_on_3, column="x", backend="modal", batch_size=4, progress=False)
    assert out["exit_on_3"].drop(index=3).tolist() == [0, 2, 4, 8, 10, 12, 14]
    error = out.modal.errors().loc[3]
    assert error["attempts"] == 2  # the batch, then the row on its own
    assert error["type"] == "WorkerCrashed"
    assert error["message"].startswith("the Modal container running this row was lost (InternalFailure: ")


def test_timeout_fails_the_slow_row(modal_server):
    df = pd.DataFrame({"x": range(3)})
    out = df.modal.map(sleep_on_1, column="x", backend="modal", timeout=1, progress=False)
    assert out["sleep_on_1"].drop(index=1).tolist() == [0, 2]
    assert out["sleep_on_1_error"].iloc[1] == "TimeoutError: the row ran longer than timeout=1s"


def test_payloads_over_the_inline_limit(modal_server):
    df = pd.DataFrame({"text": ["x" * (3 << 20), "short"], "n": [3 << 20, 5]})
    out = df.modal.map(length, column="text", backend="modal", progress=False)
    assert out["length"].tolist() == [3 << 20, 5]
    out = df.modal.map(big_result, column="n", backend="modal", progress=False)
    assert out["big_result"].str.len().tolist() == [3 << 20, 5]
    assert modal_server.blob_uploads >= 1 and modal_server.blob_downloads >= 1


def test_deployed_function(modal_server):
    modal_server.deploy("reviews-app", "classify", classify)
    df = pd.DataFrame({"text": ["good stuff", "bad", "good"]})
    out = df.modal.map(None, column="text", backend="modal:reviews-app/classify", progress=False)
    assert out["classify"].tolist() == ["POSITIVE", "NEGATIVE", "POSITIVE"]
    assert out["classify_error"].isna().all()
    with pytest.raises(OptionsError, match=r"runs that deployed Modal function on each row; pass None"):
        df.modal.map(classify, column="text", backend="modal:reviews-app/classify")


def test_missing_deployed_function_is_clear(modal_server):
    df = pd.DataFrame({"text": ["a"]})
    with pytest.raises(ModalSetupError, match=r"no deployed Modal function 'nope' in app 'reviews-app'"):
        df.modal.map(None, column="text", backend="modal:reviews-app/nope", progress=False)


def test_unknown_secret_is_clear(modal_server):
    df = pd.DataFrame({"x": [1]})
    with pytest.raises(ModalSetupError, match=r"modal secret create"):
        df.modal.map(inverse, column="x", backend="modal", secrets=["no-such-secret"], progress=False)


def test_no_token_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "missing.toml"))
    # "At once" means without trying Modal at all (the client would retry for about a minute): a
    # server address that listens, and is never connected to, says so whatever the machine's load.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        monkeypatch.setenv("MODAL_SERVER_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(ModalSetupError, match=r"no Modal token found. Run `modal token new`.*MODAL_TOKEN_ID"):
            pd.DataFrame({"x": [1]}).modal.map(inverse, column="x", backend="modal", progress=False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected


def test_unreachable_server_fails_within_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "missing.toml"))
    monkeypatch.setenv("MODAL_SERVER_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(ModalSetupError, match=r"can't reach Modal at http://127.0.0.1:9"):
        pd.DataFrame({"x": [1]}).modal.map(inverse, column="x", backend="modal", progress=False)
    assert time.monotonic() - started < 10.0


def test_python_version_mismatch_is_caught_before_anything_starts(modal_server):
    other = "3.12" if sys.version_info[:2] != (3, 12) else "3.11"
    with pytest.raises(ModalSetupError, match=rf"python_version='{other}' differs from this kernel's Python"):
        pd.DataFrame({"x": [1]}).modal.map(inverse, column="x", backend="modal", python_version=other,
                                           progress=False)
    assert modal_server.functions_created == []


def test_gpu_typo_is_caught_locally():
    with pytest.raises(OptionsError, match=r"unknown GPU type 'A10OG'"):
        pd.DataFrame({"x": [1]}).modal.map(inverse, column="x", backend="modal", gpu="A10OG")


def slow(x):
    time.sleep(0.3)
    return x


@pytest.mark.parametrize("keep_warm", [0, 60])
def test_interrupt_stops_the_run_and_keeps_finished_rows(modal_server, keep_warm, sigint_raises):
    import signal
    import threading

    from modal_magic import MapInterrupted

    df = pd.DataFrame({"x": range(40)})
    signalled: list[float] = []

    def stop_after_two_rows() -> None:  # Stop mid-run, however long the (cold) start took on a busy machine
        deadline = time.monotonic() + 60
        while modal_server.outputs_sent < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # The server has sent two rows; give the kernel a moment to take them in (on a loaded machine
        # a Stop right away could land before it had read any), while 30-odd rows are still to run.
        time.sleep(1.0)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=stop_after_two_rows, daemon=True).start()
    with pytest.raises(MapInterrupted) as info:
        df.modal.map(slow, column="x", backend="modal", batch_size=1, max_containers=2, progress=False,
                     keep_warm=keep_warm)
    # the 38 rows left would take ~6 s on 2 containers: Stop must end the run long before
    assert time.monotonic() - signalled[0] < 3.5, "stopped within a few seconds"
    out = info.value.result
    done = out["slow"].notna()
    assert 1 <= done.sum() < 40
    assert (done ^ out["slow_error"].notna()).all()
    if keep_warm:  # the run's call is cancelled; the app stays up for the next cell
        assert not modal_server.apps_disconnected
        assert [s["running"] for s in modal_magic.sessions()] == [0]
        modal_magic.shutdown()
    assert modal_server.apps_disconnected, "leaving app.run() told Modal to stop the app"
    deadline = time.monotonic() + 5
    while modal_server.live_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert modal_server.live_worker_pids() == [], "the app's containers were stopped"


def noisy(x):
    print("processing row", x)
    return x


def test_modal_output_is_kept_out_of_the_notebook(modal_server, capfd):
    pd.DataFrame({"x": range(5)}).modal.map(noisy, column="x", backend="modal", progress=False)
    logs = modal_magic.last_run().logs
    assert "processing row 3" in logs, "container output comes back with the run"
    assert any("Created Function modal_magic_runner" in line for line in logs), "so does Modal's own status"
    printed = capfd.readouterr()
    assert "Created objects" not in printed.out + printed.err
    assert "processing row" not in printed.out


def test_widget_shows_modal_output_collapsed():
    from modal_magic.progress import RunSummary, WidgetProgress

    bar = WidgetProgress(2, title="noisy", show=lambda widget: None)
    bar.log(["Building image im-1", "processing <row> 1"])
    assert bar.logs in bar.widget.children
    assert bar.logs.selected_index is None, "collapsed until the user opens it"
    assert bar.logs.get_title(0) == "Modal output (2 lines)"
    assert "processing &lt;row&gt; 1" in bar.logs.children[0].value
    bar.close("success", RunSummary(2, 2, 0, 0, 1.0))
