"""modal_magic.deploy / deployments / undeploy with the real modal client against the local Modal-protocol server."""

from __future__ import annotations

import json

import modal
import pandas as pd
import pytest

import modal_magic
from modal_magic import ModalSetupError, OptionsError
from modal_magic.schedules import check_cron, describe, parse_every


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MODAL_MAGIC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shout(text):
    return text.upper() + "!"


def whisper(text):
    return text.lower() + "..."


def nightly_count():
    """A scheduled job that maps a frame inside its container with modal_magic."""
    import modal_magic  # noqa: F401  (in the image: deploy() adds it)

    frame = pd.DataFrame({"text": ["a b", "c d e", "f"]})
    out = frame.modal.map(lambda s: len(s.split()), column="text", into="words", progress=False,
                          backend="threads", cache=False)
    return out["words"].tolist()


def test_deploy_then_map_over_the_deployed_function_by_name(modal_server, cache_dir):
    deployment = modal_magic.deploy(shout, "words/shout", pip=["regex"], max_containers=3)

    assert deployment.name == "words/shout"
    assert deployment.schedule is None
    record = modal_server.function("shout")
    assert record["schedule"] is None
    assert record["serialized"] is True
    assert record["max_containers"] == 3
    assert "regex" in record["pip_packages"]
    assert ("words", "shout") in modal_server.deployed_functions
    text = str(deployment)
    assert 'backend="modal:words/shout"' in text and "modal.Function.from_name('words', 'shout')" in text

    out = pd.DataFrame({"t": ["hi", "yo"]}).modal.map(None, column="t", into="loud", backend="modal:words/shout",
                                                       progress=False, cache=False)
    assert out["loud"].tolist() == ["HI!", "YO!"]
    assert out["loud_error"].isna().all()


def test_a_redeploy_after_an_edit_serves_the_new_code(modal_server, cache_dir):
    modal_magic.deploy(shout, "words/speak")
    first = modal.Function.from_name("words", "speak").remote("Hey")
    modal_magic.deploy(whisper, "words/speak")
    second = modal.Function.from_name("words", "speak").remote("Hey")

    assert (first, second) == ("HEY!", "hey...")
    listed = modal_magic.deployments()
    assert listed["name"].tolist() == ["words/speak"]  # one record per name, the latest deploy
    assert listed["schedule"].tolist() == [None]


def test_a_scheduled_job_maps_a_frame_inside_its_container(modal_server, cache_dir):
    deployment = modal_magic.deploy(nightly_count, "jobs/nightly", schedule="0 2 * * *")
    assert deployment.schedule == 'cron "0 2 * * *" (UTC)'
    assert modal_server.function("nightly")["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC"}
    modal_magic.deploy(nightly_count, "jobs/nightly", schedule=modal.Period(hours=6))

    assert modal_server.function("nightly")["schedule"] == {"period": {"hours": 6}}
    assert modal_server.function("nightly")["image_python_packages"] == ["modal_magic"]
    assert modal.Function.from_name("jobs", "nightly").remote() == [2, 3, 1]


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("61 * * * *", r"minute: 61 is outside 0-59"),
        ("0 2 * *", r"it has 4 fields"),
        ("0 25 * * *", r"hour: 25 is outside 0-23"),
        ("0 2 * * funday", r"day of week: 'funday' is not a number or a name"),
        ("*/0 * * * *", r"step in '\*/0' must be a whole number above 0"),
        ("0 2 5-1 * *", r"range '5-1' runs backwards"),
        (42, r"expected a cron string such as '0 2 \* \* \*', modal.Cron"),
    ],
)
def test_a_bad_schedule_is_refused_before_any_call(modal_server, cache_dir, schedule, message):
    with pytest.raises(OptionsError, match=message):
        modal_magic.deploy(nightly_count, "jobs/nightly", schedule=schedule)
    assert modal_server.rpc_counts["AppCreate"] + modal_server.rpc_counts["AppGetOrCreate"] == 0
    assert modal_server.functions_created == []


def test_a_bad_cron_inside_modal_cron_is_refused_too(modal_server, cache_dir):
    with pytest.raises(OptionsError, match=r"minute: 99 is outside"):
        modal_magic.deploy(nightly_count, "jobs/nightly", schedule=modal.Cron("99 * * * *"))


def test_map_options_and_bad_names_are_refused_with_what_to_do(modal_server, cache_dir):
    with pytest.raises(OptionsError, match=r"'batch_size' applies to a map: pass it to df.modal.map"):
        modal_magic.deploy(shout, "words/shout", batch_size=10)
    with pytest.raises(OptionsError, match=r"did you mean 'max_containers'"):
        modal_magic.deploy(shout, "words/shout", max_container=4)
    with pytest.raises(OptionsError, match=r"name='shout' is not valid: expected 'APP/FUNCTION'"):
        modal_magic.deploy(shout, "shout")
    with pytest.raises(modal_magic.FunctionError, match=r"shout\(text\) can't run on a schedule: Modal calls"):
        modal_magic.deploy(shout, "words/shout", schedule="0 2 * * *")
    assert modal_server.functions_created == []


def test_undeploy_stops_the_app_and_forgets_it(modal_server, cache_dir):
    modal_magic.deploy(shout, "gone/shout")
    modal_magic.deploy(whisper, "kept/whisper")

    modal_magic.undeploy("gone")

    assert modal_server.apps_stopped == ["gone"]
    assert modal_magic.deployments()["name"].tolist() == ["kept/whisper"]
    with pytest.raises(ModalSetupError, match=r"no deployed Modal function 'shout' in app 'gone'"):
        pd.DataFrame({"t": ["x"]}).modal.map(None, column="t", backend="modal:gone/shout", progress=False)
    with pytest.raises(ModalSetupError, match=r"no deployed Modal app 'gone'"):
        modal_magic.undeploy("gone")


def test_the_records_file_is_private_json(modal_server, cache_dir):
    modal_magic.deploy(shout, "words/shout")
    path = cache_dir / "deployments.json"
    assert path.stat().st_mode & 0o077 == 0
    assert json.loads(path.read_text())["words/shout"]["function"] == "shout"
    path.write_text("{not json")
    with pytest.raises(ModalSetupError, match=r"deployments record .* is damaged .* delete it"):
        modal_magic.deployments()


def test_schedule_helpers_read_back_what_they_were_given():
    assert check_cron(" 0  2 *  * MON-fri ") == "0 2 * * MON-fri"
    assert check_cron("*/15 0-6,22 1 jan-mar 7") == "*/15 0-6,22 1 jan-mar 7"
    assert describe(parse_every("90s")) == "every 90 seconds"
    assert describe(parse_every("1d")) == "every 1 day"
    assert describe(modal.Cron("0 6 * * *", timezone="America/New_York")) == 'cron "0 6 * * *" (America/New_York)'
    with pytest.raises(OptionsError, match=r"every='6 hours' is not valid: expected a number and a unit"):
        parse_every("6 hours")


# --- %%modal_deploy --------------------------------------------------------------------------------------


@pytest.fixture
def ip(loaded_shell):
    return loaded_shell


def test_the_magic_deploys_the_cells_function_and_says_how_to_call_it(modal_server, cache_dir, ip, capsys):
    ip.run_line_magic("config", "ModalMagic.memory = 2048")
    ip.run_cell_magic("modal_deploy", 'jobs/nightly --every 6h --pip regex --max-containers 2',
                      "def helper(x):\n    return x\n\ndef nightly():\n    return 'ran'\n")

    printed = capsys.readouterr().out
    assert "Deployed jobs/nightly (runs every 6 hours" in printed
    assert 'backend="modal:jobs/nightly"' in printed
    record = modal_server.function("nightly")
    assert record["schedule"] == {"period": {"hours": 6}}
    assert (record["memory"], record["max_containers"], "regex" in record["pip_packages"]) == (2048, 2, True)
    assert callable(ip.user_ns["nightly"])  # the cell ran in the notebook's namespace
    assert modal.Function.from_name("jobs", "nightly").remote() == "ran"


def test_the_magic_turns_mistakes_into_one_line(modal_server, cache_dir, ip):
    from IPython.core.error import UsageError

    body = "def nightly():\n    return 1\n"
    with pytest.raises(UsageError, match=r"not a valid cron string: hour: 24 is outside 0-23"):
        ip.run_cell_magic("modal_deploy", 'jobs/nightly --schedule "0 24 * * *"', body)
    with pytest.raises(UsageError, match=r"--every '6' is not valid: expected a number and a unit"):
        ip.run_cell_magic("modal_deploy", "jobs/nightly --every 6", body)
    with pytest.raises(UsageError, match=r"not allowed with argument"):
        ip.run_cell_magic("modal_deploy", 'jobs/nightly --every 6h --schedule "0 2 * * *"', body)
    with pytest.raises(UsageError, match=r"unknown flag --batch-size"):
        ip.run_cell_magic("modal_deploy", "jobs/nightly --batch-size 4", body)
    with pytest.raises(UsageError, match=r"the cell defines no function: write the function to deploy"):
        ip.run_cell_magic("modal_deploy", "jobs/nightly", "x = 1\n")
    assert modal_server.functions_created == []


async def shout_async(text):
    return text.upper() + "?"


def test_async_functions_and_lambdas_deploy_and_answer(modal_server, cache_dir):
    modal_magic.deploy(shout_async, "words/ask")
    modal_magic.deploy(lambda text: text[::-1], "words/reverse")

    assert modal.Function.from_name("words", "ask").remote("why") == "WHY?"
    assert modal.Function.from_name("words", "reverse").remote("abc") == "cba"


def test_an_unpicklable_function_is_refused_before_any_call(modal_server, cache_dir):
    import threading

    lock = threading.Lock()

    def guarded(text):
        with lock:
            return text

    with pytest.raises(modal_magic.FunctionError, match=r"guarded can't be sent to Modal: it uses the closure variable `lock`.*the function imports\)$"):
        modal_magic.deploy(guarded, "words/guarded")
    assert modal_server.functions_created == []


def test_records_from_concurrent_deploys_are_all_kept(cache_dir):
    from concurrent.futures import ThreadPoolExecutor

    from modal_magic.deploy import _records

    def add(i):
        with _records() as records:
            records[f"app{i}/f"] = {"app": f"app{i}", "function": "f", "schedule": None,
                                   "deployed_at": f"2026-12-03T00:00:{i:02d}+00:00", "image": "x"}

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    assert len(modal_magic.deployments()) == 40
    assert modal_magic.deployments()["name"].iloc[0] == "app39/f"  # newest first


def test_an_unsafe_cache_directory_skips_the_records_with_a_warning(modal_server, cache_dir):
    cache_dir.mkdir(mode=0o777)
    cache_dir.chmod(0o777)
    with pytest.warns(modal_magic.cache.CacheWarning, match="deployments are not recorded on this machine"):
        deployment = modal_magic.deploy(shout, "words/shout")
    assert deployment.name == "words/shout" and ("words", "shout") in modal_server.deployed_functions
