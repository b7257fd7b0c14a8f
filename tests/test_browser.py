"""End to end: the progress widget as a person sees it in JupyterLab, in headless Chromium.

A JupyterLab server (this venv's, on 127.0.0.1) serves copies of ``tests/browser/widget_demo.ipynb``
and ``notebooks/quickstart.ipynb``; Playwright drives Debian's Chromium (``/usr/bin/chromium``,
installed by ``tests/browser/setup.sh``; never a downloaded browser) to open each notebook, pick
Run > Run All Cells, and read what the page shows: the bar's colour class, the counts line, the
summary line and the failures table. Screenshots go to ``tests/artifacts/`` (git-ignored);
``MODAL_MAGIC_UPDATE_SCREENSHOTS=1`` (or ``python tests/browser/screenshots.py``) also copies the
two widget screenshots to ``docs/images/`` for the README.

Without Chromium, Playwright or JupyterLab the tests skip, except in CI (``CI`` set), where they
fail: ``make test`` installs all three.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.browser.lab import (CHROMIUM, CHROMIUM_ARGS, LabServer, code_cells, menu, open_notebook, run_all_cells,
                               run_cell, wait_all_cells_ran, wait_cell_ran)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "browser" / "widget_demo.ipynb"
HABITS = ROOT / "tests" / "browser" / "habits.ipynb"
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_IMAGES = ROOT / "docs" / "images"
UPDATE_SCREENSHOTS = os.environ.get("MODAL_MAGIC_UPDATE_SCREENSHOTS") == "1"

# The shipped reviews: 3,000 rows, 6 of them blank (whitespace only), which the classifier rejects.
ROWS, BLANK = 3000, 6
BAR_STYLES = ("success", "warning", "danger")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (run tests/browser/setup.sh, as `make test` does)"
    for module, package in [("playwright", "playwright"), ("jupyterlab", "jupyterlab")]:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -e '.[test]', as `make test` does)"
    return None


@pytest.fixture(scope="module")
def lab():
    """A JupyterLab server on 127.0.0.1 serving copies of the two notebooks; stopped afterwards."""
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    notebooks = [DEMO, HABITS] + ([QUICKSTART] if QUICKSTART.exists() else [])
    server = LabServer(notebooks)
    try:
        server.start()
        yield server
    finally:
        killed = server.stop()
    assert not killed, f"processes outlived the Jupyter server's shutdown and were killed: {killed}"


@pytest.fixture(scope="module")
def browser(lab):
    """Headless Debian Chromium; closed, and checked to be gone, after the module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    assert not _running("chrom"), f"Chromium processes left running: {_running('chrom')}"


@pytest.fixture
def page(browser):
    # Twice the pixels: the README screenshots stay sharp on high-density screens.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=2)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def _running(name: str) -> list[psutil.Process]:
    """This process's descendants whose name contains ``name``."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if name in p.name().lower() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _theme_colour(page, variable: str) -> str:
    """A JupyterLab theme colour such as ``--jp-warn-color1``, as the browser computes it."""
    return page.evaluate("""variable => {
        const probe = document.createElement('div');
        probe.style.color = `var(${variable})`;
        document.body.appendChild(probe);
        const colour = getComputedStyle(probe).color;
        probe.remove();
        return colour;
    }""", variable)


def _bar_colour(bar) -> str:
    return bar.locator(".progress-bar").evaluate("e => getComputedStyle(e).backgroundColor")


def _bar_style(bar) -> str:
    """The IntProgress's ``bar_style``, from the class ipywidgets puts on the bar element."""
    classes = bar.locator(".progress-bar").get_attribute("class").split()
    styles = [s for s in BAR_STYLES if f"progress-bar-{s}" in classes]
    assert len(styles) <= 1, classes
    return styles[0] if styles else ""


def _rows_done(counts_text: str) -> tuple[int, int]:
    match = re.match(r"([\d,]+)/([\d,]+) rows \|", counts_text)
    assert match, counts_text
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


def _save(locator, name: str) -> Path:
    """Screenshot the element into tests/artifacts (and docs/images when asked).

    The element gets a white padding for the picture, so that it has a margin without taking in
    the borders of the cells around it.
    """
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    saved = locator.evaluate("""e => {
        const saved = [e.style.padding, e.style.background];
        e.style.padding = '8px 12px';
        e.style.background = 'white';
        return saved;
    }""")
    try:
        # The element's box, rounded inwards: a fractional edge would take in a line of the next cell.
        locator.scroll_into_view_if_needed()
        box = locator.bounding_box()
        left, top = math.ceil(box["x"]), math.ceil(box["y"])
        right, bottom = math.floor(box["x"] + box["width"]), math.floor(box["y"] + box["height"])
        locator.page.screenshot(path=str(path), animations="disabled",
                                clip={"x": left, "y": top, "width": right - left,
                                      "height": bottom - top})
    finally:
        locator.evaluate("(e, saved) => { [e.style.padding, e.style.background] = saved; }", saved)
    if UPDATE_SCREENSHOTS and name.startswith("widget_"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / name)
    return path


def _assert_no_errors(page) -> None:
    """Every code cell ran (Run All stops at a failing cell) and no output is a traceback."""
    prompts = [p.text_content().strip() for p in page.locator(
        ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt").all()]
    assert prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), prompts
    stderr = [o.text_content() for o in page.locator(
        '.jp-NotebookPanel:not(.lm-mod-hidden) '
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all()]
    tracebacks = [text for text in stderr if "Traceback (most recent call last)" in text]
    assert not tracebacks, tracebacks[0][:2000]


def test_widget_live_then_finished_with_failures(lab, page):
    open_notebook(page, lab, DEMO.name)
    run_all_cells(page)

    widget = page.locator(".modal-magic-progress")
    output = page.locator(".jp-OutputArea-output", has=widget)  # the widget, without the prompt
    bar, counts = widget.locator(".modal-magic-bar"), widget.locator(".modal-magic-counts")
    summary = widget.locator(".modal-magic-summary")

    # Mid-run: wait for the bar to pass a third of the rows, photograph it, then read it.
    page.wait_for_function(
        """() => {
            const el = document.querySelector('.modal-magic-progress .modal-magic-counts');
            const m = el && el.textContent.match(/^([\\d,]+)\\/([\\d,]+) rows/);
            if (!m) return false;
            const n = +m[1].replace(/,/g, ''), total = +m[2].replace(/,/g, '');
            return n >= total / 3 && n <= total * 0.8;
        }""",
        timeout=60_000,
    )
    _save(output, "widget_running.png")
    running = counts.text_content()
    n, total = _rows_done(running)
    assert total == ROWS and 0 < n < ROWS, running
    assert re.search(r"\| [\d,]+ done, \d+ failed, 0 cached, 0 retrying \| [\d,.]+ rows/s \| "
                     r"[\d.]+s elapsed, ETA [\d.]+s$", running), running
    assert _bar_style(bar) == ""  # no style while running: the theme's blue
    assert _bar_colour(bar) == _theme_colour(page, "--jp-brand-color1")
    assert not summary.is_visible()

    # Finished: the summary appears under the bar.
    summary.wait_for(state="visible", timeout=60_000)
    wait_all_cells_ran(page)
    _save(output, "widget_finished.png")
    page.screenshot(path=str(ARTIFACTS / "lab_widget_demo.png"))

    assert page.locator(".modal-magic-progress").count() == 1  # one bar per run
    assert _bar_style(bar) == "warning"  # orange: finished, some rows failed
    assert _bar_colour(bar) == _theme_colour(page, "--jp-warn-color1")
    # Layout: the bar fills most of the row after its title; counts, then summary, below it.
    box = {name: widget.locator(f".modal-magic-{name}").bounding_box()
           for name in ("title", "bar", "counts", "summary")}
    box["progress"] = widget.bounding_box()
    assert box["bar"]["width"] > 0.6 * box["progress"]["width"], box
    assert box["title"]["x"] < box["bar"]["x"] and abs(box["title"]["y"] - box["bar"]["y"]) < 10
    assert box["bar"]["y"] < box["counts"]["y"] < box["summary"]["y"], box
    assert widget.locator(".modal-magic-title").text_content() == "sentiment"
    progress = bar.locator(".progress-bar").evaluate("e => e.style.width")
    assert progress == "100%"
    finished = counts.text_content()
    assert finished.startswith(f"{ROWS:,}/{ROWS:,} rows | {ROWS - BLANK:,} done, {BLANK} failed, "
                               "0 cached, 0 retrying | "), finished
    assert "ETA" not in finished and re.search(r"rows/s \| [\d.]+s elapsed$", finished), finished

    line = summary.locator(".modal-magic-summary-line").text_content()
    assert re.fullmatch(rf"Done with failures: {ROWS:,} rows in [\d.]+s \([\d,.]+ rows/s\) \| "
                        rf"{ROWS - BLANK:,} succeeded, {BLANK} failed \({BLANK} ValueError\), "
                        r"0 cached", line), line
    table = summary.locator("table.modal-magic-failures")
    assert table.locator("th").all_text_contents() == ["index", "error"]
    rows = [r.locator("td").all_text_contents() for r in table.locator("tbody tr").all()]
    assert len(rows) == 5, rows
    assert all(error == "ValueError: empty review" for _, error in rows), rows
    assert all(label.isdigit() for label, _ in rows), rows
    assert summary.locator(".modal-magic-errors-call").text_content() == (
        f"Showing 5 of {BLANK} failed rows. All failures with tracebacks: out.modal.errors()")

    # The kernel is this venv's Python, so it ran the modal_magic under test.
    assert page.locator(".jp-OutputArea-output").first.text_content().strip() == sys.prefix
    # The last cell's output agrees with the page: six rows carry an error.
    result = page.locator(".jp-OutputArea-executeResult .jp-OutputArea-output").last
    assert result.text_content().strip() == str(BLANK)
    _assert_no_errors(page)


@pytest.mark.skipif(not QUICKSTART.exists(), reason="TODO: notebooks/quickstart.ipynb not written yet")
def test_quickstart_runs_in_lab(lab, page):
    open_notebook(page, lab, QUICKSTART.name)
    run_all_cells(page)
    wait_all_cells_ran(page, timeout_ms=120_000)
    page.screenshot(path=str(ARTIFACTS / "lab_quickstart.png"))
    _assert_no_errors(page)

    widgets = page.locator(".modal-magic-progress").all()
    assert widgets, "quickstart.ipynb shows no progress bar"
    for widget in widgets:  # every bar finished: full, coloured, summarised
        summary = widget.locator(".modal-magic-summary-line")
        assert summary.is_visible()
        verdict = summary.text_content().split(":")[0]
        expected = {"Done": "success", "Done with failures": "warning"}.get(verdict)
        bar = widget.locator(".modal-magic-bar")
        assert expected and _bar_style(bar) == expected, verdict
        theme = {"success": "--jp-success-color1", "warning": "--jp-warn-color1"}[expected]
        assert _bar_colour(bar) == _theme_colour(page, theme), verdict
        n, total = _rows_done(widget.locator(".modal-magic-counts").text_content())
        assert n == total > 0

    # The first run classifies every shipped review; the blank ones fail.
    first = widgets[0]
    assert first.locator(".modal-magic-counts").text_content().startswith(
        f"{ROWS:,}/{ROWS:,} rows | {ROWS - BLANK:,} done, {BLANK} failed")
    assert f"{BLANK} failed ({BLANK} ValueError)" in first.locator(
        ".modal-magic-summary-line").text_content()
    _save(page.locator(".jp-OutputArea-output", has=page.locator(".modal-magic-progress")).first,
          "quickstart_widget.png")


def _output_text(cell) -> str:
    return "\n".join(o.text_content() for o in cell.locator(".jp-OutputArea-output").all())


def test_rerun_stop_save_and_reopen_without_a_kernel(lab, page):
    """The everyday moves: run a cell twice, stop one mid-run, save, reopen with no kernel."""
    open_notebook(page, lab, HABITS.name)
    cells = code_cells(page)
    run_cell(page, 0)
    wait_cell_ran(page, 0)

    # The %%modal_map cell, twice: the second run replaces the columns the first made, from the cache.
    run_cell(page, 1)
    first = wait_cell_ran(page, 1)
    run_cell(page, 1)
    wait_cell_ran(page, 1, after=first)
    rerun = cells.nth(1)
    assert "UsageError" not in _output_text(rerun) and "already has a column" not in _output_text(rerun)
    line = rerun.locator(".modal-magic-summary-line").text_content()
    assert re.fullmatch(r"Done with failures: 12 rows in [\d.]+s \(1 ran, [\d,.]+ rows/s\) \| 0 succeeded, 1 failed "
                        r"\(1 ValueError\), 11 cached: --no-cache runs them again", line), line
    assert _bar_style(rerun.locator(".modal-magic-bar")) == "warning"
    _save(rerun.locator(".jp-OutputArea-output", has=page.locator(".modal-magic-progress")), "widget_rerun.png")

    # The slow cell, stopped with Kernel > Interrupt Kernel once a few rows are done.
    run_cell(page, 2)
    page.wait_for_function(
        """() => {
            const bars = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell');
            const el = bars[2] && bars[2].querySelector('.modal-magic-counts');
            const m = el && el.textContent.match(/^([\\d,]+)\\/12 rows/);
            return m && +m[1] >= 2;
        }""", timeout=60_000)
    menu(page, "Kernel", "Interrupt Kernel")
    wait_cell_ran(page, 2)
    stopped = cells.nth(2)
    stopped.locator(".modal-magic-summary-line").wait_for(timeout=30_000)
    text = _output_text(stopped)
    line = stopped.locator(".modal-magic-summary-line").text_content()
    done = re.fullmatch(r"Aborted: 12 rows in [\d.]+s \([\d,.]+ rows/s\) \| (\d+) succeeded, 0 failed, "
                        r"(\d+) cancelled, 0 cached", line)
    assert done and int(done[1]) + int(done[2]) == 12 and int(done[2]) > 0, line
    assert _bar_style(stopped.locator(".modal-magic-bar")) == "danger"
    assert (f"MapInterrupted: stopped after {done[1]} of 12 rows; the finished rows are in df (the other "
            f"{done[2]} have a Cancelled error)") in text, text
    assert "Traceback" not in text and "engine.py" not in text, text
    _save(stopped.locator(".jp-OutputArea-output", has=page.locator(".modal-magic-progress")), "widget_stopped.png")

    # Save, then open the saved file with no kernel: what a viewer without the kernel shows.
    page.keyboard.press("Control+s")
    saved = lab.root / HABITS.name
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "MapInterrupted" not in saved.read_text():
        time.sleep(0.2)
    nb = json.loads(saved.read_text())
    # Without these Lab asks which kernel to start (else it starts the one they name), and the answer is none.
    nb["metadata"].pop("kernelspec", None)
    nb["metadata"].pop("language_info", None)
    reopened = lab.root / "habits_reopened.ipynb"
    reopened.write_text(json.dumps(nb))
    lab.shut_down_kernels()
    page.goto(lab.url(f"lab/tree/{reopened.name}", "reset"))
    page.locator(".jp-Dialog-button", has_text=re.compile(r"^No Kernel$")).click(timeout=60_000)
    page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .modal-magic-progress").nth(1).wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "lab_reopened.png"))

    assert not lab.kernels(), "the reopened notebook runs no kernel"
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    shown = panel.text_content()
    assert "Error displaying widget" not in shown and "model not found" not in shown, shown[:3000]
    assert "VBox(" not in shown
    cells = code_cells(page)
    rerun, stopped = cells.nth(1), cells.nth(2)
    assert rerun.locator(".modal-magic-progress").count() == 1
    assert "11 cached: --no-cache runs them again" in rerun.locator(".modal-magic-summary-line").text_content()
    assert _bar_style(rerun.locator(".modal-magic-bar")) == "warning"
    rows = [r.locator("td").all_text_contents() for r in rerun.locator("table.modal-magic-failures tbody tr").all()]
    assert rows == [["5", "ValueError: five is not allowed"]]
    assert rerun.locator(".modal-magic-errors-call").text_content().endswith("df.modal.errors()")
    assert stopped.locator(".modal-magic-summary-line").text_content().startswith("Aborted: 12 rows in ")
    assert _bar_style(stopped.locator(".modal-magic-bar")) == "danger"
    assert "MapInterrupted: stopped after" in _output_text(stopped)
    _save(stopped.locator(".jp-OutputArea-output", has=page.locator(".modal-magic-progress")), "widget_reopened.png")
