"""``%%modal_map`` driven through a real IPython shell: results, flags, %config defaults, mistakes, unload."""

from __future__ import annotations

import atexit
import re
import signal
from typing import Any

import pandas as pd
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets import TraitError
from traitlets.config import Config

import modal_magic
from modal_magic.ipython import map_magic
from modal_magic.errors import MapInterrupted, RowError
from modal_magic.ipython.map_magic import ModalMagic, parse_line
from modal_magic.options import OPTION_NAMES, MapOptions

CLASSIFY = """\
def classify(x):
    return 10 // x
"""


@pytest.fixture
def ip():
    """A fresh shell with history off and the extension not loaded yet (set ip.config first)."""
    config = Config()
    config.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.user_ns["df"] = pd.DataFrame({"x": [1, 2, 0], "name": ["a", "b", "c"]}, index=[10, 20, 20])
    yield shell
    # Its exit hook would reset the namespace and gc.collect() at interpreter exit, once per test.
    atexit.unregister(shell.atexit_operations)
    InteractiveShell.clear_instance()


@pytest.fixture
def loaded(ip):
    """The shell with modal_magic loaded, running rows on threads without a progress bar."""
    ip.config.ModalMagic.backend = "threads"
    ip.config.ModalMagic.progress = False
    ip.run_line_magic("load_ext", "modal_magic")
    return ip


@pytest.fixture
def calls(monkeypatch):
    """Record what the magic hands the engine, and fake a run that gives every row the value 1."""
    seen: list[dict[str, Any]] = []

    def fake_map_frame(frame, fn, *, columns, star, into, options, errors_call, magic=False):
        seen.append(dict(frame=frame, fn=fn, columns=columns, star=star, into=into, options=options,
                         errors_call=errors_call))
        into = into or fn.__name__
        out = frame.assign(**{into: 1, f"{into}_error": pd.Series(None, index=frame.index, dtype=object)})
        return out.assign(**{f"{into}_seconds": 0.5}) if options.timings else out

    monkeypatch.setattr(map_magic, "map_frame", fake_map_frame)
    return seen


def magic_instance(shell: InteractiveShell) -> ModalMagic:
    return shell.magics_manager.registry["ModalMagic"]


# --- results -------------------------------------------------------------------------------------


def test_results_are_added_to_the_frame_in_place_with_their_dtypes(loaded):
    df = loaded.user_ns["df"]
    result = loaded.run_cell("%%modal_map df.x --into ratio\n" + CLASSIFY)

    assert result.success and result.result is None  # nothing shown but the progress
    assert loaded.user_ns["df"] is df
    assert df.columns.tolist() == ["x", "name", "ratio", "ratio_error"]
    assert df["ratio"].dtype == "Int64"
    assert df["ratio"].iloc[:2].tolist() == [10, 5] and df["ratio"].isna().tolist() == [False, False, True]
    assert df["ratio_error"].dtype == object
    assert df["ratio_error"].iloc[:2].tolist() == [None, None]
    error = df["ratio_error"].iloc[2]
    assert isinstance(error, RowError) and error.type_name == "ZeroDivisionError"
    assert df.index.tolist() == [10, 20, 20]  # duplicate labels kept, rows matched by position
    assert df.modal.errors()["type"].tolist() == ["ZeroDivisionError"]


def test_into_defaults_to_the_function_name_and_the_function_stays_defined(loaded):
    loaded.run_cell("%%modal_map df.x\n" + CLASSIFY)

    df = loaded.user_ns["df"]
    assert df.columns.tolist() == ["x", "name", "classify", "classify_error"]
    assert loaded.user_ns["classify"](5) == 2
    assert loaded.user_ns["classify"].__module__ == "__main__"  # so cloudpickle sends it by value


def test_the_last_top_level_def_is_the_one_mapped(loaded):
    loaded.run_cell("%%modal_map df.name\ndef first(s):\n    return 0\n\ndef second(s):\n    return s.upper()\n")

    df = loaded.user_ns["df"]
    assert df["second"].tolist() == ["A", "B", "C"]
    assert "first" not in df.columns and callable(loaded.user_ns["first"])


def test_output_binds_a_new_frame_and_leaves_the_original_alone(loaded):
    result = loaded.run_cell("%%modal_map df.x --into ratio -o out\n" + CLASSIFY)

    assert result.success and result.result is None
    assert loaded.user_ns["df"].columns.tolist() == ["x", "name"]
    out = loaded.user_ns["out"]
    assert out.columns.tolist() == ["x", "name", "ratio", "ratio_error"]
    assert out["ratio"].iloc[:2].tolist() == [10, 5]


def test_columns_is_the_starmap_form(loaded):
    loaded.run_cell("%%modal_map df --columns name x --into label\ndef label(name, x):\n    return f'{name}{x}'\n")

    assert loaded.user_ns["df"]["label"].tolist() == ["a1", "b2", "c0"]


def test_fn_picks_the_function_by_name(loaded):
    loaded.run_cell("%%modal_map df.x --fn double\ndef double(x):\n    return 2 * x\n\ndef helper(x):\n    return 0\n")

    assert loaded.user_ns["df"]["double"].tolist() == [2, 4, 0]


def test_fn_can_name_a_function_defined_in_an_earlier_cell(loaded):
    loaded.run_cell("def triple(x):\n    return 3 * x\n")
    loaded.run_cell_magic("modal_map", "df.x --fn triple", "# triple is defined above\n")

    assert loaded.user_ns["df"]["triple"].tolist() == [3, 6, 0]


def test_a_cell_function_runs_in_worker_processes(loaded):
    """The local backend pickles the cell's function, and the globals it uses, by value."""
    loaded.run_cell("OFFSET = 100")
    loaded.run_cell("%%modal_map df.x --backend local --into shifted\ndef shift(x):\n    return x + OFFSET\n")

    assert loaded.user_ns["df"]["shifted"].tolist() == [101, 102, 100]


def test_sample_in_place_fills_only_the_sampled_rows(loaded):
    loaded.run_cell("%%modal_map df.x --sample 2 --into ratio\n" + CLASSIFY)

    df = loaded.user_ns["df"]
    assert df["ratio"].iloc[:2].tolist() == [10, 5]
    assert df["ratio"].isna().tolist() == [False, False, True]
    assert df["ratio_error"].isna().all()


def test_expand_in_place_adds_a_column_per_key(loaded):
    loaded.run_cell("%%modal_map df.x --expand\ndef parts(x):\n    return {'half': x / 2, 'sign': x > 0}\n")

    df = loaded.user_ns["df"]
    assert df.columns.tolist() == ["x", "name", "half", "sign", "parts_error"]
    assert df["half"].tolist() == [0.5, 1.0, 0.0]


def test_stop_keeps_the_finished_rows_and_still_says_it_stopped(loaded):
    # Stop is a real SIGINT to the kernel (a row raising KeyboardInterrupt itself is only that row's error)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    cell = ("import os, signal\ndef stop_at_two(x):\n    if x == 2:\n        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(5)\n    return x\n")
    try:
        with pytest.raises(MapInterrupted):
            loaded.run_cell_magic("modal_map", "df.x --backend sequential --batch-size 1 --into kept",
                                  "import time\n" + cell)
    finally:
        signal.signal(signal.SIGINT, previous)

    df = loaded.user_ns["df"]
    assert df["kept"].iloc[0] == 1
    assert [getattr(e, "type_name", None) for e in df["kept_error"]] == [None, "Cancelled", "Cancelled"]


def test_the_summary_points_at_the_frame_holding_the_errors(loaded, capsys):
    loaded.run_cell("%%modal_map df.x --progress --into ratio\n" + CLASSIFY)
    loaded.run_cell("%%modal_map df.x --progress --into ratio2 -o out\n" + CLASSIFY)

    err = capsys.readouterr().err
    assert "All failures with tracebacks: df.modal.errors()" in err
    assert "All failures with tracebacks: out.modal.errors()" in err


# --- options: flags and %config ------------------------------------------------------------------

FLAG_CASES = [
    ("--backend sequential", "backend", "sequential"),
    ("--gpu T4", "gpu", "T4"),
    ("--gpu T4 A10G", "gpu", ["T4", "A10G"]),
    ("--gpu H100:2 --gpu L4", "gpu", ["H100:2", "L4"]),
    ("--cpu 2", "cpu", 2.0),
    ("--memory 4096", "memory", 4096),
    ("--image img", "image", "IMAGE"),
    ("--pip torch transformers==4.44", "pip", ("torch", "transformers==4.44")),
    ("--apt ffmpeg", "apt", ("ffmpeg",)),
    ("--python-version 3.12", "python_version", "3.12"),
    ("--secret openai --secret hf", "secrets", ("openai", "hf")),
    ("--env A=1 --env B=x=y", "env", {"A": "1", "B": "x=y"}),
    ("--volume /data=reviews --volume /models=weights", "volumes", {"/data": "reviews", "/models": "weights"}),
    ("--timeout 2.5", "timeout", 2.5),
    ("--retries 3", "retries", 3),
    ("--max-containers 8", "max_containers", 8),
    ("--batch-size 16", "batch_size", 16),
    ("--order-outputs", "order_outputs", True),
    ("--on-error raise", "on_error", "raise"),
    ("--no-cache", "cache", False),
    ("--cache-refresh", "cache", "refresh"),
    ("--no-progress", "progress", False),
    ("--sample 5", "sample", 5),
    ("--expand", "expand", True),
    ("--timings", "timings", True),
    ("--budget-usd 2.5", "budget_usd", 2.5),
    ("--overwrite", "overwrite", True),
    ("--keep-warm 60", "keep_warm", 60),
    ("--background", "wait", False),
]


class Image:
    """Stands in for modal.Image (options check the type's name)."""


@pytest.mark.parametrize(("flags", "option", "expected"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_each_flag_sets_its_option(ip, calls, flags, option, expected):
    # a backend every option applies to (a deployed function doesn't report per-row timings, and
    # its resources, so its cost, aren't known)
    backend = "modal" if option in ("timings", "budget_usd") else "modal:reviews-app/classify"
    ip.config.ModalMagic.backend = backend
    ip.run_line_magic("load_ext", "modal_magic")
    image = ip.user_ns["img"] = Image()

    job = ip.run_cell_magic("modal_map", f"df.x {flags}", CLASSIFY)
    if job is not None:  # --background: the engine is called from the job's thread
        job.result(timeout=30)

    options = calls[-1]["options"]
    assert isinstance(options, MapOptions)
    assert getattr(options, option) == (image if expected == "IMAGE" else expected)
    defaults = MapOptions.create(backend=backend)
    changed = [name for name in OPTION_NAMES if getattr(options, name) != getattr(defaults, name)]
    assert changed == [option]


def test_every_option_has_a_flag_case_and_a_configurable_traitlet():
    assert {case[1] for case in FLAG_CASES} == set(OPTION_NAMES)
    traits = ModalMagic.class_traits(config=True)
    for name in OPTION_NAMES:
        assert name in traits and traits[name].help, name


def test_traitlet_defaults_are_the_option_defaults(loaded):
    magic = magic_instance(loaded)
    magic.backend = "local"
    magic.progress = True
    assert MapOptions.create(**magic.option_defaults()) == MapOptions()


def test_config_sets_the_default_and_a_flag_overrides_it(ip, calls):
    ip.config.ModalMagic.retries = 3
    ip.config.ModalMagic.backend = "sequential"
    ip.config.ModalMagic.order_outputs = True
    ip.run_line_magic("load_ext", "modal_magic")

    ip.run_cell_magic("modal_map", "df.x", CLASSIFY)
    ip.run_cell_magic("modal_map", "df.x --retries 1 --backend threads --no-order-outputs --into again", CLASSIFY)
    ip.run_line_magic("config", "ModalMagic.max_containers = 2")
    ip.run_cell_magic("modal_map", "df.x --into third", CLASSIFY)

    first, second, third = (c["options"] for c in calls)
    assert (first.retries, first.backend, first.max_containers, first.order_outputs) == (3, "sequential", None, True)
    assert (second.retries, second.backend, second.order_outputs) == (1, "threads", False)
    assert (third.retries, third.max_containers) == (3, 2)


def test_the_engine_gets_the_columns_and_where_to_find_the_errors(loaded, calls):
    loaded.run_cell_magic("modal_map", "df --columns name x --into label -o out", "def label(n, x):\n    return n\n")
    call = calls[-1]
    assert (call["columns"], call["star"], call["into"]) == (["name", "x"], True, "label")
    assert call["errors_call"] == "out.modal.errors()"
    assert call["frame"] is loaded.user_ns["df"]


def test_an_invalid_configured_default_is_refused_with_its_reason(loaded, capsys):
    magic = magic_instance(loaded)
    with pytest.raises(TraitError, match=r"ModalMagic.retries: retries=-1 is not valid: expected a whole number"):
        magic.retries = -1
    with pytest.raises(TraitError, match=r"ModalMagic.gpu: unknown GPU type 'T5': did you mean 'T4'\?"):
        magic.gpu = "T5"
    with pytest.raises(TraitError, match=r"ModalMagic.backend: unknown backend 'thread': did you mean 'threads'\?"):
        magic.backend = "thread"
    with pytest.raises(TraitError):
        magic.on_error = "ignore"

    loaded.run_line_magic("config", "ModalMagic.max_containers = 0")
    assert magic.max_containers is None
    shown = capsys.readouterr().err
    assert shown.startswith("UsageError: ModalMagic.max_containers: max_containers=0 is not valid"), shown
    assert "ERROR:root" not in shown


def test_help_describes_every_flag(loaded):
    doc = loaded.magics_manager.magics["cell"]["modal_map"].__doc__
    flags = ["--columns", "--into", "-o", "--fn", "--backend", "--gpu", "--cpu", "--memory", "--image", "--pip",
             "--apt", "--python-version", "--secret", "--env", "--volume", "--timeout", "--retries",
             "--max-containers", "--batch-size", "--order-outputs", "--on-error", "--no-cache",
             "--cache-refresh", "--no-progress", "--sample", "--expand", "--overwrite"]
    for flag in flags:
        assert re.search(rf"(?<![\w-]){flag}(?![\w-])", doc), flag
    assert "%config ModalMagic.backend" in doc


def test_parse_line_gives_a_frozen_typed_object():
    args = parse_line("reviews.text --into sentiment -o out --fn classify --retries 2")
    assert (args.frame, args.columns, args.star, args.into, args.output, args.fn) == (
        "reviews", ("text",), False, "sentiment", "out", "classify")
    assert dict(args.options) == {"retries": 2}
    with pytest.raises(AttributeError):
        args.into = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        args.options["retries"] = 3  # type: ignore[index]


# --- user mistakes -------------------------------------------------------------------------------

MISTAKES = [
    ("dff.x", CLASSIFY, r"^no DataFrame named 'dff' in the notebook; did you mean df\?$"),
    ("reviews.x", CLASSIFY, r"^no DataFrame named 'reviews' in the notebook; did you mean df\?$|DataFrames defined"),
    ("df.xx", CLASSIFY, r"^df has no column 'xx': did you mean 'x'\? its columns are 'x', 'name'$"),
    ("series.x", CLASSIFY, r"^series is a Series, not a DataFrame: use series.to_frame\(\), or series.modal.map\(fn\)$"),
    ("df", CLASSIFY, r"^which column\? write df.COLUMN, or df --columns A B to pass several$"),
    ("df.x --columns x name", CLASSIFY, r"^give the column once: df.x, or df --columns x name$"),
    ("df.x", "y = 1\n", r"^the cell defines no function: write the function to map in it as a `def`"),
    ("df.x --fn clasify", CLASSIFY,
     r"^--fn clasify: nothing named 'clasify' is defined in the notebook \(expected a function\); did you mean classify\?$"),
    ("df.x --fn limit", "limit = 3\n", r"^--fn limit: limit is a int, not a function$"),
    ("df.x --retries two", CLASSIFY, r"^argument --retries: invalid int value: 'two'$"),
    ("df.x --timeout soon", CLASSIFY, r"^argument --timeout: invalid float value: 'soon'$"),
    ("df.x --env TOKEN", CLASSIFY, r"^--env 'TOKEN': expected KEY=VALUE$"),
    ("df.x --env =1", CLASSIFY, r"^--env '=1': expected KEY=VALUE$"),
    ("df.x --volume data", CLASSIFY, r"^--volume 'data': expected /PATH=VOLUME_NAME$"),
    ("df.x --gpus T4", CLASSIFY, r"^unknown flag --gpus; did you mean --gpu\?$"),
    ("df.x --on-error ignore", CLASSIFY, r"^argument --on-error: invalid choice: 'ignore'"),
    ("df.x --max-containers 0", CLASSIFY, r"^--max-containers 0 is not valid: expected a whole number of at least 1"),
    ("df.x --gpu T4", CLASSIFY,
     r"^gpu only applies on Modal, but --backend threads runs on this machine; add --backend modal to run there$"),
    ("df.x --image nothing_here", CLASSIFY,
     r"^--image nothing_here: nothing named 'nothing_here' is defined in the notebook \(expected a modal.Image\)$"),
    ("df.x --backend modal:app/fn --image series", CLASSIFY, r"^--image series: series is a Series, not a modal.Image$"),
    ("df --columns x name", CLASSIFY, r"^classify\(x\) can't take 2 positional arguments from columns=\['x', 'name'\]"),
    ("df.x -o 2out", CLASSIFY, r"^-o '2out': expected a variable name$"),
    ("'df.x", CLASSIFY, r"^can't read the %%modal_map line: No closing quotation$"),
    ("df.x", "def classify(x)\n    return x\n", r"^SyntaxError in the cell, line 1: expected ':'\n    def classify\(x\)\n"),
]


@pytest.mark.parametrize(("line", "cell", "message"), MISTAKES, ids=[m[0] + " | " + m[1][:12] for m in MISTAKES])
def test_mistakes_raise_one_clear_usage_error(loaded, line, cell, message):
    loaded.user_ns["series"] = pd.Series([1, 2])
    with pytest.raises(UsageError, match=message):
        loaded.run_cell_magic("modal_map", line, cell)


def test_no_modal_token_is_a_usage_error(loaded, monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match=r"^no Modal token found. Run `modal token new`.*or run locally with --backend local$"):
        loaded.run_cell_magic("modal_map", "df.x --backend modal", CLASSIFY)
    assert loaded.user_ns["df"].columns.tolist() == ["x", "name"]


def test_an_unknown_modal_secret_is_a_usage_error(loaded, modal_server):
    with pytest.raises(UsageError, match=r"modal secret create"):
        loaded.run_cell_magic("modal_map", "df.x --backend modal --secret no-such-secret", CLASSIFY)


def test_the_modal_backend_fills_the_frame_in_place(loaded, modal_server):
    loaded.run_cell_magic("modal_map", "df.x --backend modal --gpu T4 --max-containers 2 --into ratio", CLASSIFY)

    df = loaded.user_ns["df"]
    assert df["ratio"].iloc[:2].tolist() == [10, 5]
    assert df["ratio_error"].iloc[2].type_name == "ZeroDivisionError"
    created = modal_server.last_function
    assert created["serialized"] and created["gpu"] == "T4" and created["max_containers"] == 2


def test_a_mistake_changes_nothing_and_runs_nothing(loaded):
    with pytest.raises(UsageError):
        loaded.run_cell_magic("modal_map", "df.x --max-containers 0", "def never_defined(x):\n    return x\n")
    assert "never_defined" not in loaded.user_ns
    assert loaded.user_ns["df"].columns.tolist() == ["x", "name"]


SLOW_CLASSIFY = """\
import time
def classify(x):
    time.sleep(0.01)  # slow enough for the cache to keep (it skips rows under ~5 µs)
    return 10 // x
"""


def test_running_a_cell_again_replaces_its_columns_and_runs_only_the_failed_rows(loaded):
    loaded.run_cell_magic("modal_map", "df.x --into ratio", SLOW_CLASSIFY)
    assert (modal_magic.last_run().succeeded, modal_magic.last_run().failed) == (2, 1)
    result = loaded.run_cell("%%modal_map df.x --into ratio\n" + SLOW_CLASSIFY)  # the same cell again

    assert result.success, result.error_in_exec
    run = modal_magic.last_run()
    assert (run.succeeded, run.failed, run.cached) == (0, 1, 2), "only the failed row ran again"
    df = loaded.user_ns["df"]
    assert df.columns.tolist() == ["x", "name", "ratio", "ratio_error"]
    assert df["ratio"].tolist()[:2] == [10, 5] and df["ratio_error"].tolist()[2].startswith("ZeroDivisionError")


def test_a_column_modal_magic_did_not_make_still_needs_overwrite(loaded):
    loaded.user_ns["df"]["ratio"] = 7  # the user's own column
    with pytest.raises(UsageError, match=r"already has a column 'ratio'; pass --overwrite to replace it, or --into another_name$"):
        loaded.run_cell_magic("modal_map", "df.x --into ratio", CLASSIFY)

    loaded.run_cell_magic("modal_map", "df.x --into ratio --overwrite", "def classify(x):\n    return -x\n")
    assert loaded.user_ns["df"]["ratio"].tolist() == [-1, -2, 0]
    assert loaded.user_ns["df"].columns.tolist() == ["x", "name", "ratio", "ratio_error"]


def test_running_a_cell_with_o_again_replaces_the_columns_it_made(loaded):
    loaded.run_cell_magic("modal_map", "df.x --into ratio -o out", CLASSIFY)
    loaded.run_cell_magic("modal_map", "out.x --into ratio -o out", "def classify(x):\n    return -x\n")
    assert loaded.user_ns["out"]["ratio"].tolist() == [-1, -2, 0]
    assert loaded.user_ns["out"].columns.tolist() == ["x", "name", "ratio", "ratio_error"]
    assert loaded.user_ns["df"].columns.tolist() == ["x", "name"]


def test_a_usage_error_shows_one_line_and_no_traceback(loaded, capsys):
    result = loaded.run_cell("%%modal_map df.xx\n" + CLASSIFY)

    assert not result.success
    err = capsys.readouterr().err
    assert err.strip() == "UsageError: df has no column 'xx': did you mean 'x'? its columns are 'x', 'name'"


# --- loading and unloading -----------------------------------------------------------------------


def test_loading_twice_keeps_one_magic(loaded):
    loaded.run_line_magic("reload_ext", "modal_magic")
    modal_magic.load_ipython_extension(loaded)

    assert sum(isinstance(c, ModalMagic) for c in loaded.configurables) == 1
    assert loaded.magics_manager.magics["cell"]["modal_map"].__self__ is magic_instance(loaded)


def test_unload_removes_the_magic_and_reload_brings_it_back(loaded):
    magic = magic_instance(loaded)
    loaded.run_line_magic("unload_ext", "modal_magic")

    assert "modal_map" not in loaded.magics_manager.magics["cell"]
    assert "ModalMagic" not in loaded.magics_manager.registry
    assert magic not in loaded.configurables
    with pytest.raises(UsageError, match="Cell magic `%%modal_map` not found"):
        loaded.run_cell_magic("modal_map", "df.x", CLASSIFY)

    loaded.run_line_magic("load_ext", "modal_magic")
    loaded.run_cell_magic("modal_map", "df.x --backend threads --no-progress", CLASSIFY)
    assert "classify" in loaded.user_ns["df"].columns


def test_retry_failed_reruns_only_failed_rows_in_place(loaded):
    ip = loaded
    ip.user_ns["df"] = pd.DataFrame({"x": [1, 0, 2, 0]})
    ip.run_cell_magic("modal_map", "df.x --into inv --backend threads --no-progress",
                      "def inv(x):\n    return 10 // x\n")
    df = ip.user_ns["df"]
    assert df["inv_error"].notna().tolist() == [False, True, False, True]
    ip.run_cell_magic("modal_map", "df.x --into inv --backend threads --no-progress --retry-failed",
                      "def inv(x):\n    return 10 // x if x else -1\n")
    assert df["inv"].tolist() == [10, -1, 5, -1]
    assert df["inv_error"].isna().all()
    assert str(df["inv"].dtype) in ("int64", "Int64")
    fixed = df.modal.retry_failed()  # nothing left to retry: the same values
    assert fixed["inv"].tolist() == [10, -1, 5, -1]


def test_retry_failed_needs_a_previous_run(loaded):
    ip = loaded
    ip.user_ns["df"] = pd.DataFrame({"x": [1]})
    with pytest.raises(UsageError, match=r"--retry-failed: df has no column 'inv_error' yet"):
        ip.run_cell_magic("modal_map", "df.x --into inv --retry-failed", "def inv(x):\n    return x\n")


# --- one declaration per option: flags, help, and nothing abbreviated ------------------------------------


@pytest.mark.parametrize(("magic", "line", "closest"), [
    ("modal_map", "df.x --max-container 4", "--max-containers"),
    ("modal_map", "df.x --batch 8", "--batch-size"),
    ("modal_llm", "df --max-container 4", "--max-containers"),
    ("modal_llm", "df --max-token 10", "--max-tokens"),
])
def test_an_abbreviated_flag_is_refused_with_the_flag_it_may_mean(loaded, calls, magic, line, closest):
    with pytest.raises(UsageError, match=rf"^unknown flag --\S+; did you mean {closest}\?$"):
        loaded.run_cell_magic(magic, line, CLASSIFY if magic == "modal_map" else "Say {x}")
    assert calls == []  # refused before anything ran


@pytest.mark.parametrize("magic", ["modal_map", "modal_llm"])
def test_help_shows_the_cell_magic_usage_line(loaded, magic):
    doc = loaded.magics_manager.magics["cell"][magic].__doc__
    usage = doc.split("::", 1)[1].strip().splitlines()[0]
    assert usage.startswith(f"%%{magic} "), usage


def test_the_llm_flags_and_help_come_from_the_llm_option_declarations(loaded):
    from modal_magic.llm import LLM_OPTIONS

    doc = loaded.magics_manager.magics["cell"]["modal_llm"].__doc__
    flagged = [o for o in LLM_OPTIONS if o.flag is not None]
    assert {o.name for o in flagged} >= {"model", "max_tokens", "schema", "rpm", "tpm", "budget_usd", "processes"}
    for o in flagged:
        assert re.search(rf"(?<![\w-]){o.flag_spelling}(?![\w-])", doc), o.name
        assert o.help.split(" (")[0].split(",")[0][:30] in " ".join(doc.split()), o.name
    assert "--max-containers" in doc and "%config ModalMagic.backend" in " ".join(doc.split())  # map flags too


def test_the_llm_magic_follows_the_configured_map_defaults(loaded, monkeypatch):
    from modal_magic.ipython import llm_magic

    seen = []
    def fake_llm_frame(frame, template, **kw):
        seen.append(kw)
        return frame.assign(answer=1, answer_error=pd.Series(None, index=frame.index, dtype=object))

    monkeypatch.setattr(llm_magic, "llm_frame", fake_llm_frame)
    loaded.run_line_magic("config", "ModalMagic.retries = 4")
    loaded.run_cell_magic("modal_llm", "df --model m --rpm 60", "Say {x}")
    assert (seen[0]["options"].retries, seen[0]["options"].backend) == (4, "threads")
    assert (seen[0]["llm"].model, seen[0]["llm"].rpm) == ("m", 60.0)


def test_unload_removes_both_magics(loaded):
    loaded.run_line_magic("unload_ext", "modal_magic")
    assert not {"modal_map", "modal_llm"} & set(loaded.magics_manager.magics["cell"])
    assert not {"ModalMagic", "LLMMagic"} & set(loaded.magics_manager.registry)


def test_the_library_never_imports_the_ipython_side():
    import subprocess
    import sys

    code = ("import sys, pandas as pd, modal_magic; "
            "pd.DataFrame({'x': [1]}).modal.map(abs, column='x', backend='sequential', progress=False); "
            "print(sorted(m for m in sys.modules if m.startswith(('IPython', 'modal_magic.ipython'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- notebook habits: set-up errors, short tracebacks, hints, the line form ---------------------------


def test_a_setup_error_shows_no_bar_and_names_the_server(loaded, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "missing.toml"))
    # modal's own default is a list like this one; the first server is the one tried
    monkeypatch.setenv("MODAL_SERVER_URL", "http://127.0.0.1:9,http://127.0.0.1:10")
    with pytest.raises(UsageError, match=r"^can't reach Modal at http://127.0.0.1:9 \("):
        loaded.run_cell_magic("modal_map", "df.x --backend modal --progress", CLASSIFY)
    shown = capsys.readouterr()
    assert "rows |" not in shown.out + shown.err, "no bar above a run that never started"


def test_stop_in_the_magic_says_the_rows_are_in_the_frame(loaded, capsys):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    loaded.user_ns["df"] = pd.DataFrame({"x": range(40)})
    timer = __import__("threading").Timer(0.5, __import__("os").kill, (__import__("os").getpid(), signal.SIGINT))
    timer.start()
    loaded.run_cell("%%modal_map df.x --into y --max-containers 2 --progress\n"
                    "import time\ndef slow(x):\n    time.sleep(0.05)\n    return x\n")
    timer.join()
    shown = capsys.readouterr()
    df = loaded.user_ns["df"]
    cancelled = int(df["y_error"].notna().sum())
    assert 0 < cancelled < 40
    last = shown.err.strip().splitlines()[-1] if "MapInterrupted" in shown.err else shown.out.strip().splitlines()[-1]
    assert last == (f"MapInterrupted: stopped after {40 - cancelled} of 40 rows; the finished rows are in df (the "
                    f"other {cancelled} have a Cancelled error): run the cell again to finish them; finished rows "
                    "come from the cache")
    assert "Traceback" not in shown.out + shown.err and "engine.py" not in shown.out + shown.err
    assert f"{cancelled} cancelled" in shown.err and "The cancelled rows: df.modal.errors()" in shown.err


def test_on_error_raise_shows_the_row_not_the_library(loaded, capsys):
    loaded.run_cell("%%modal_map df.x --into r --on-error raise -o st --progress\n" + CLASSIFY)
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "RowFailed: row 20 (position 2) failed: ZeroDivisionError: integer division or modulo by zero" in text
    assert "return 10 // x" in text, "the row's own frame, with its source line"
    assert "modal_magic/" not in text and "get_ipython()" not in text, text
    assert "st" not in loaded.user_ns, "-o st is bound only when the run finishes"
    assert "All failures with tracebacks: modal_magic.last_result().modal.errors()" in text
    assert modal_magic.last_result()["r_error"].tolist()[2].startswith("ZeroDivisionError")


def test_accessor_errors_keep_the_users_frames_only(loaded, capsys):
    loaded.run_cell("out = df.modal.map(lambda x: x, column='nope')\n")
    loaded.run_cell("import os\nos.environ.pop('OPENAI_API_KEY', None)\nscored = df.modal.llm('say {name}', "
                    "base_url='http://127.0.0.1:9/v1')\n")
    text = "".join(capsys.readouterr())
    assert "MissingAPIKey: no OpenAI API key: pass api_key=" in text
    assert "scored = df.modal.llm(" in text, "the user's own line stays"
    assert "modal_magic/" not in text.split("MissingAPIKey")[0].split("scored = df.modal.llm(")[1], text


def test_the_accessors_hint_names_the_variable_the_result_goes_to(loaded, capsys):
    loaded.run_cell("scored = df.modal.map(lambda x: 10 // x, column='x', into='r', progress=True)")
    assert "All failures with tracebacks: scored.modal.errors()" in capsys.readouterr().err
    loaded.run_cell("df.modal.map(lambda x: 10 // x, column='x', into='r', progress=True)")
    assert "All failures with tracebacks: modal_magic.last_result().modal.errors()" in capsys.readouterr().err


def test_row_tracebacks_show_the_cells_source_without_internal_frames(loaded):
    loaded.run_cell("def risky(x):\n    y = x - 1\n    return 10 // (y - 1)\n")
    loaded.run_cell("out = df.modal.map(risky, column='x', backend='local')")
    [traceback] = loaded.user_ns["out"].modal.errors()["traceback"].tolist()
    assert "    return 10 // (y - 1)" in traceback, traceback
    assert "row_runner.py" not in traceback and "modal_magic" not in traceback, traceback
    assert traceback.rstrip().endswith("ZeroDivisionError: integer division or modulo by zero")


def test_the_line_form_maps_a_function_defined_earlier(loaded):
    loaded.run_cell(CLASSIFY)
    result = loaded.run_cell("%modal_map df.x --fn classify --into ratio")
    assert result.success, result.error_in_exec
    assert loaded.user_ns["df"]["ratio"].tolist()[:2] == [10, 5]
    with pytest.raises(UsageError, match=r"^%modal_map \(one %\) maps a function defined earlier: name it with --fn"):
        loaded.run_line_magic("modal_map", "df.x --into ratio")


def test_sample_in_place_keeps_nullable_dtypes(loaded):
    loaded.run_cell_magic("modal_map", "df.x --into doubled --sample 2", "def doubled(x):\n    return 2 * x\n")
    df = loaded.user_ns["df"]
    assert str(df["doubled"].dtype) == "Int64" and df["doubled"].tolist()[:2] == [2, 4]
    assert df["doubled"].isna().tolist() == [False, False, True]
    assert df["doubled_error"].tolist() == [None, None, None]


def test_the_llm_magic_never_says_api_key_equals(loaded, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(__import__("tempfile").mkdtemp())  # no .env file here
    with pytest.raises(UsageError) as info:
        loaded.run_cell_magic("modal_llm", "df --into a", "say {name}")
    assert "api_key" not in str(info.value) and "set OPENAI_API_KEY" in str(info.value)


def test_a_switch_to_a_debugging_backend_says_the_rows_came_from_the_cache(loaded, capsys):
    loaded.run_cell_magic("modal_map", "df.x --into ratio", SLOW_CLASSIFY)
    capsys.readouterr()
    loaded.run_cell_magic("modal_map", "df.x --into ratio --backend sequential --progress", SLOW_CLASSIFY)
    assert "2 cached: --no-cache runs them again" in capsys.readouterr().err


def test_the_help_usage_line_names_the_cell_magic(loaded):
    for name in ("modal_map", "modal_llm"):
        doc = loaded.magics_manager.magics["cell"][name].__doc__
        assert doc.lstrip(": \n").startswith(f"%%{name} ["), doc[:80]
