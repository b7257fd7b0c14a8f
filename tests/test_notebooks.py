"""Every notebook in notebooks/, executed by a real kernel (nbclient), as ``make demo`` does.

Assertions are on what a user sees: the cells' outputs, where a finished progress bar leaves static
text and HTML (what a notebook viewer renders after the kernel is gone), and the widgets' stored
state (``nb.metadata.widgets``).
Notebooks written for Modal's cloud run with their kernel pointed at the local Modal test server.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.notebook_runner import WIDGET_STATE_KEY, execute_notebook, progress_runs
from modal_magic.datasets import load_reviews
from modal_magic.datasets.sentiment import classify_sentiment
from tests.modal_server.server import client_env
from tests.openai_server.fixture import openai_env

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.name.endswith(".executed.ipynb"))
#: notebooks written for Modal's cloud: here their kernel talks to the local Modal test server
ON_MODAL = {"modal_gpu.ipynb", "nightly_job.ipynb"}
#: notebooks written for an OpenAI-compatible endpoint: here their kernel talks to the local one
ON_OPENAI = {"llm_classify.ipynb"}


@dataclass
class Executed:
    nb: Any
    summary: str
    functions_created: list[dict[str, Any]] = field(default_factory=list)  # what reached the Modal server


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Execute a notebook once per module; later calls get the same executed copy."""
    done: dict[str, Executed] = {}
    folder = tmp_path_factory.mktemp("executed")

    def execute(name: str) -> Executed:
        if name in done:
            return done[name]
        if name in ON_OPENAI:
            server = request.getfixturevalue("openai_server_session")
            server.reset()
            with pytest.MonkeyPatch.context() as env:
                for key, value in openai_env(server).items():
                    env.setenv(key, value)
                executed, summary = execute_notebook(NOTEBOOKS / name, output_path=folder / name, timeout=120)
            done[name] = Executed(nbformat.read(executed, as_version=4), summary)
            return done[name]
        if name not in ON_MODAL:
            executed, summary = execute_notebook(NOTEBOOKS / name, output_path=folder / name, timeout=120)
            done[name] = Executed(nbformat.read(executed, as_version=4), summary)
            return done[name]
        server = request.getfixturevalue("modal_server_session")
        server.reset()
        # The kernel inherits this environment: its modal client finds the local server and no real config.
        with pytest.MonkeyPatch.context() as env, tempfile.TemporaryDirectory() as config_dir:
            for key, value in client_env(server, config_dir).items():
                env.setenv(key, value)
            # The nightly job's Volume: a local folder standing for its mount path in the container.
            env.setenv("NIGHTLY_DATA_DIR", str(tmp_path_factory.mktemp("volume")))
            env.setenv("MODAL_MAGIC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
            try:
                executed, summary = execute_notebook(NOTEBOOKS / name, output_path=folder / name, timeout=120)
                done[name] = Executed(nbformat.read(executed, as_version=4), summary, server.functions_created)
            finally:
                server.reset()
        return done[name]

    return execute


def outputs_of(nb: Any, source_start: str) -> list[Any]:
    """The outputs of the code cell whose source starts with ``source_start`` (the first such cell)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith(source_start):
            return cell.outputs
    raise AssertionError(f"no cell starts with {source_start!r}")


def text_of(outputs: list[Any]) -> str:
    return "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)


def counts_in(text: str) -> dict[str, int]:
    """``{"POSITIVE": 1643, ...}`` from a printed ``value_counts()``."""
    return {label: int(n) for label, n in re.findall(r"^([A-Z]+)\s+(\d+)$", text, re.MULTILINE)}


def widget_states(nb: Any) -> list[dict[str, Any]]:
    return [model["state"] for model in nb.metadata.widgets[WIDGET_STATE_KEY]["state"].values()]


@pytest.fixture(scope="module")
def expected_counts() -> dict[str, int]:
    labels = []
    for text in load_reviews()["text"]:
        try:
            labels.append(classify_sentiment(text))
        except ValueError:
            labels.append("FAILED")
    return {label: labels.count(label) for label in set(labels)}


@pytest.mark.parametrize("name", ALL)
def test_notebook_runs_and_every_progress_bar_finishes(run, name):
    executed = run(name)
    nb, summary = executed.nb, executed.summary

    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    runs = progress_runs(nb)
    assert runs, "a notebook here shows at least one modal_magic run"
    for bar in runs:
        assert bar.value == bar.total and bar.bar_style in ("success", "warning"), bar
        assert bar.summary.startswith("Done")
    assert summary.startswith(f"Executed {NOTEBOOKS / name}: ")


def test_the_notebooks_are_where_the_tests_look():
    assert {"quickstart.ipynb", "modal_gpu.ipynb"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_notebooks_are_saved_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "widgets" not in nb.metadata


def test_quickstart_labels_every_review_in_place(run, expected_counts):
    nb = run("quickstart.ipynb").nb

    shown = counts_in(text_of(outputs_of(nb, "reviews.sentiment.value_counts()")))
    assert shown == {k: v for k, v in expected_counts.items() if k != "FAILED"}
    head = text_of(outputs_of(nb, 'reviews[["text", "stars", "sentiment", "sentiment_error"]]'))
    assert "sentiment_error" in head and re.search(r"POSITIVE|NEGATIVE|NEUTRAL", head)


def test_quickstart_shows_the_failed_rows_then_reruns_only_those(run, expected_counts):
    nb = run("quickstart.ipynb").nb
    failed = expected_counts["FAILED"]

    assert text_of(outputs_of(nb, "reviews.modal.errors().head()")).count("ValueError: empty review") == min(failed, 5)
    assert text_of(outputs_of(nb, "int(reviews.sentiment_error.notna().sum())")).strip() == str(failed)
    retry = text_of(outputs_of(nb, "%%modal_map reviews.text --into sentiment --retry-failed"))
    assert f"Done: {failed} rows" in retry, retry  # only the failed rows ran again
    [_, after_retry] = [c.outputs for c in nb.cells if c.source == "reviews.sentiment.value_counts()"]
    after = counts_in(text_of(after_retry))
    assert after == {**{k: v for k, v in expected_counts.items() if k != "FAILED"}, "BLANK": failed}
    assert text_of(outputs_of(nb, "len(reviews.modal.errors())")).strip() == "0"


def test_quickstart_accessor_cell_scores_higher_for_more_stars(run):
    nb = run("quickstart.ipynb").nb

    text = text_of(outputs_of(nb, "def compound(text):"))
    means = [float(m) for m in re.findall(r"^[1-5]\s+(-?\d\.\d+)$", text, re.MULTILINE)]
    assert len(means) == 5 and means == sorted(means) and means[0] < 0 < means[-1]


def test_quickstart_widget_state_holds_the_finished_bars(run, expected_counts):
    executed = run("quickstart.ipynb")
    nb, summary = executed.nb, executed.summary
    total, failed = sum(expected_counts.values()), expected_counts["FAILED"]
    states = widget_states(nb)

    bars = sorted((s["value"], s["max"], s["bar_style"]) for s in states
                  if s["_model_name"] == "IntProgressModel" and "modal-magic-bar" in s["_dom_classes"])
    assert bars == sorted([
        (total, total, "warning"),  # the magic over every review: a few are blank
        (failed, failed, "success"),  # the re-run of the failed rows
        (total, total, "warning"),  # the accessor cell
    ])
    counts = [s["value"] for s in states if "modal-magic-counts" in s.get("_dom_classes", ())]
    assert sum(c.startswith(f"{total:,}/{total:,} rows | {total - failed:,} done, {failed} failed, 0 cached")
               for c in counts) == 2
    summaries = [s["value"] for s in states if "modal-magic-summary" in s.get("_dom_classes", ())]
    assert any(f"{total - failed:,} succeeded, {failed} failed ({failed} ValueError)" in s
               and "reviews.modal.errors()" in s for s in summaries)  # where the magic's user finds them


def test_saved_quickstart_shows_every_finished_bar_without_a_kernel(run, expected_counts):
    """A finished bar's output is static text/plain and text/html: no widget view for a viewer to miss."""
    nb = run("quickstart.ipynb").nb
    total, failed = sum(expected_counts.values()), expected_counts["FAILED"]
    bars = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if "modal-magic-progress" in o.get("data", {}).get("text/html", "")]
    assert len(bars) == 3
    for output in bars:
        assert output.output_type == "display_data"
        assert set(output.data) == {"text/plain", "text/html"}, "the widget view is gone once the run ends"
    first = bars[0].data["text/plain"].splitlines()
    assert first[0].startswith(f"sentiment: {total:,}/{total:,} rows | {total - failed:,} done, {failed} failed")
    assert first[1].startswith(f"Done with failures: {total:,} rows in ")
    assert first[1].endswith(f"{total - failed:,} succeeded, {failed} failed ({failed} ValueError), 0 cached")
    assert sum(line.endswith("ValueError: empty review") for line in first) == min(failed, 5)
    assert first[-1] == f"  Showing {min(failed, 5)} of {failed} failed rows. All failures with tracebacks: " \
                        "reviews.modal.errors()"
    page = bars[0].data["text/html"]
    assert 'class="progress-bar progress-bar-warning" style="width: 100%' in page
    assert page.count("<tr><td") == min(failed, 5) and "VBox(" not in bars[0].data["text/plain"]
    assert "scored.modal.errors()" in bars[2].data["text/plain"], "the accessor's hint names its variable"


def test_quickstart_runs_are_reported_in_the_order_the_cells_ran(run, expected_counts):
    executed = run("quickstart.ipynb")
    nb, summary = executed.nb, executed.summary
    total, failed = sum(expected_counts.values()), expected_counts["FAILED"]

    runs = progress_runs(nb)
    assert [(r.title, r.value, r.total, r.bar_style) for r in runs] == [
        ("sentiment", total, total, "warning"),
        ("sentiment", failed, failed, "success"),
        ("compound", total, total, "warning"),
    ]
    assert runs[0].summary.startswith(f"Done with failures: {total:,} rows in ")
    assert summary.splitlines()[1].startswith(f"  sentiment: Done with failures: {total:,} rows in ")
    assert summary.splitlines()[2].startswith(f"  sentiment: Done: {failed} rows in ")


# --- modal_gpu.ipynb, its kernel pointed at the local Modal test server ---------------------------


def test_modal_gpu_labels_every_review_on_modal(run, expected_counts):
    nb = run("modal_gpu.ipynb").nb
    labels = {k: v for k, v in expected_counts.items() if k != "FAILED"}

    assert counts_in(text_of(outputs_of(nb, "reviews.sentiment.value_counts()"))) == labels
    assert "ValueError: empty review" in text_of(outputs_of(nb, "reviews.modal.errors().head()"))
    assert text_of(outputs_of(nb, "on_image.label.equals(on_image.sentiment)")).strip() == "True"
    assert counts_in(text_of(outputs_of(nb, "retried.sentiment.value_counts()"))) == {
        "BLANK": expected_counts["FAILED"]}
    runs = progress_runs(nb)
    assert [(r.title, r.value, r.bar_style) for r in runs] == [
        ("sentiment", 3000, "warning"), ("label", 3000, "warning"), ("sentiment", expected_counts["FAILED"], "success")]


def test_modal_gpu_flags_and_config_reach_modal(run):
    first, with_image, by_config = run("modal_gpu.ipynb").functions_created

    # Each cell's spec differs (GPU, image, config), so each got a warm app of its own, whose one
    # function is modal_magic's generic runner (the cell's function travels as its input's payload).
    assert [f["short_name"] for f in (first, with_image, by_config)] == ["modal_magic_runner"] * 3
    assert first["serialized"]
    assert [(g["type"], g["count"]) for g in first["gpus"]] == [("T4", 1)]
    assert "vaderSentiment==3.3.2" in first["pip_packages"]
    assert (first["max_containers"], first["retries"]) == (4, 2)
    assert [g["type"] for g in with_image["gpus"]] == ["T4", "L4"]  # fallbacks, in order
    assert "vaderSentiment==3.3.2" in with_image["pip_packages"]
    # %config ModalMagic.backend/pip/max_containers made the defaults of the last cell
    assert (by_config["gpus"], by_config["max_containers"]) == ([], 8)
    assert "vaderSentiment==3.3.2" in by_config["pip_packages"]


def test_nightly_job_deploys_on_a_schedule_and_maps_inside_its_container(run):
    executed = run("nightly_job.ipynb")
    nb = executed.nb
    created = {f["function_name"]: f for f in executed.functions_created}

    nightly = created["nightly"]
    assert nightly["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC"}
    assert nightly["volumes"] == {"/data": "reviews"}
    assert nightly["image_python_packages"] == ["modal_magic"]  # deploy() put modal_magic in the image
    assert "vaderSentiment==3.3.2" in nightly["pip_packages"] and nightly["cpu"] == 2
    printed = text_of(outputs_of(nb, "%%modal_deploy reviews/nightly"))
    assert 'Deployed reviews/nightly (runs cron "0 2 * * *" (UTC)' in printed

    today = load_reviews().head(300)
    labels = [classify_sentiment(t) if t.strip() else None for t in today["text"]]
    expected = {label: labels.count(label) for label in set(labels) if label}
    counts = eval(text_of(outputs_of(nb, "counts = modal.Function")))  # a dict's repr
    assert counts == expected
    assert counts_in(text_of(outputs_of(nb, "pd.read_csv(f\"{DATA}/scored.csv\")"))) == expected

    assert "score" in created and created["score"]["schedule"] is None
    first20 = labels[:20]
    assert counts_in(text_of(outputs_of(nb, "by_name = "))) == {lab: first20.count(lab) for lab in set(first20) if lab}

    listed = text_of(outputs_of(nb, "modal_magic.deployments()"))
    assert "reviews/nightly" in listed and "reviews/score" in listed
    assert "Empty DataFrame" in text_of(outputs_of(nb, "modal_magic.undeploy"))


# --- notebook habits, in a real kernel: what errors, hints and tracebacks look like ---------------------


HABITS = [
    ("setup", "import os\nimport pandas as pd\nimport modal_magic\n%load_ext modal_magic\n"
              "df = pd.DataFrame({'x': [1, 2, 0]})\nos.environ.pop('OPENAI_API_KEY', None)"),
    ("define", "def risky(x):\n    y = x - 1\n    return 10 // x"),
    ("scored", "scored = df.modal.map(risky, column='x')"),
    ("traceback", "print(scored.modal.errors().traceback.iloc[0])"),
    ("no column", "df.modal.map(risky, column='nope')"),
    ("no key", "answers = df.modal.llm('say {x}', base_url='http://127.0.0.1:9/v1')"),
    ("raise", "out = df.modal.map(risky, column='x', on_error='raise')"),
    ("config", "%config ModalMagic.retries = -1"),
    ("rerun", "%%modal_map df.x --into tenfold\ndef tenfold(x):\n    return 10 * x"),
    ("rerun again", "%%modal_map df.x --into tenfold\ndef tenfold(x):\n    return 10 * x"),
]


@pytest.fixture(scope="module")
def habits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("habits")
    nb = nbformat.v4.new_notebook()
    for name, source in HABITS:
        cell = nbformat.v4.new_code_cell(source, metadata={"name": name, "tags": ["raises-exception"]})
        nb.cells.append(cell)
    path = folder / "habits.ipynb"
    nbformat.write(nb, path)
    executed, _ = execute_notebook(path, timeout=120)
    return {cell.metadata["name"]: cell.outputs for cell in nbformat.read(executed, as_version=4).cells}


def error_of(outputs: list[Any]) -> Any:
    [error] = [o for o in outputs if o.output_type == "error"]
    return error


def test_in_a_kernel_the_accessors_hint_names_its_variable(habits):
    [bar] = [o for o in habits["scored"] if "text/html" in o.get("data", {})]
    assert bar.data["text/plain"].splitlines()[-1] == "  Showing 1 of 1 failed rows. All failures with tracebacks: " \
                                                      "scored.modal.errors()"


def test_in_a_kernel_a_rows_traceback_shows_the_cells_source(habits):
    printed = text_of(habits["traceback"])
    assert "    return 10 // x" in printed and "row_runner.py" not in printed, printed
    assert printed.strip().endswith("ZeroDivisionError: integer division or modulo by zero")


@pytest.mark.parametrize("cell, ename, message", [
    ("no column", "ColumnNotFound", "column 'nope' not found; the DataFrame has: 'x'"),
    ("no key", "MissingAPIKey", "no OpenAI API key: pass api_key="),
    ("raise", "RowFailed", "row 2 (position 2) failed: ZeroDivisionError: integer division or modulo by zero"),
])
def test_in_a_kernel_modal_magics_errors_show_the_users_frames_only(habits, cell, ename, message):
    error = error_of(habits[cell])
    shown = "\n".join(error.traceback)
    assert error.ename == ename and message in shown, shown
    assert "site-packages" not in shown and "modal_magic/" not in shown, shown
    assert HABITS[[n for n, _ in HABITS].index(cell)][1].splitlines()[-1] in shown, "the user's own line stays"
    assert len(error.traceback) <= 12, shown


def test_in_a_kernel_a_config_mistake_is_one_usage_line(habits):
    printed = text_of(habits["config"])
    assert printed.startswith("UsageError: ModalMagic.retries: retries=-1 is not valid"), printed
    assert "ERROR:root" not in printed


def test_in_a_kernel_running_the_cell_again_works(habits):
    assert not [o for o in habits["rerun again"] if o.output_type == "error"]
    [bar] = [o for o in habits["rerun again"] if "text/html" in o.get("data", {})]
    assert "Done: 3 rows in" in bar.data["text/plain"]
