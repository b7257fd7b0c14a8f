"""Tests for the progress display: what a user sees in the widget, in a terminal, and in a log."""

from __future__ import annotations

import io
import sys
import types

import pytest

from modal_magic import progress
from modal_magic.progress import (
    Progress,
    RunSummary,
    TextProgress,
    WidgetProgress,
    _detect_display,
    format_duration,
    make_progress,
)


class FakeClock:
    """Time that moves only when a test says so (tqdm's DiscreteTimer)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def widget_bar(total: int, clock: FakeClock, title: str = "") -> tuple[WidgetProgress, list]:
    shown: list = []
    return WidgetProgress(total, title=title, clock=clock, show=shown.append), shown


def count_redraws(bar: WidgetProgress) -> list[str]:
    drawn: list[str] = []
    bar.counts.observe(lambda change: drawn.append(change["new"]), names="value")
    return drawn


def summary(total=10, succeeded=10, failed=0, cached=0, elapsed_s=5.0, **kw) -> RunSummary:
    return RunSummary(total=total, succeeded=succeeded, failed=failed, cached=cached,
                      elapsed_s=elapsed_s, **kw)


@pytest.mark.parametrize("seconds, text", [
    (0.0, "0.0s"), (0.42, "0.4s"), (9.94, "9.9s"), (9.97, "10s"), (12.4, "12s"), (59.6, "1m00s"),
    (60, "1m00s"), (184, "3m04s"), (3599, "59m59s"), (3720, "1h02m"), (90061, "25h01m"),
    (None, "?"), (float("inf"), "?"), (float("nan"), "?"),
])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


# --- widget -------------------------------------------------------------------------------


def test_widget_shows_one_empty_bar_with_css_classes(clock):
    bar, shown = widget_bar(1000, clock, title="classify <text>")
    assert shown == [bar.widget]
    assert "modal-magic-progress" in bar.widget._dom_classes
    assert "modal-magic-bar" in bar.bar._dom_classes
    assert "modal-magic-counts" in bar.counts._dom_classes
    assert "modal-magic-summary" in bar.summary._dom_classes
    assert "modal-magic-title" in bar.title_html._dom_classes
    assert bar.title_html.value == "classify &lt;text&gt;"
    assert (bar.bar.value, bar.bar.max, bar.bar.bar_style) == (0, 1000, "")
    assert bar.counts.value == ("0/1,000 rows | 0 done, 0 failed, 0 cached, 0 retrying"
                                " | ? rows/s | 0.0s elapsed, ETA ?")
    assert bar.summary.layout.display == "none"


def test_widget_title_is_hidden_when_empty(clock):
    bar, _ = widget_bar(3, clock)
    assert bar.title_html.layout.display == "none"


def test_widget_redraws_at_most_once_per_interval(clock):
    bar, _ = widget_bar(1000, clock)
    drawn = count_redraws(bar)
    clock.advance(1.0)
    for _ in range(100):
        bar.update(done=1)
    assert len(drawn) == 1  # the first update drew; the other 99 came within 0.1 s
    assert bar.bar.value == 1
    assert drawn[0].startswith("1/1,000 rows | 1 done,")

    clock.advance(0.1)
    for _ in range(100):
        bar.update(done=1)
    assert len(drawn) == 2
    assert 1 < bar.bar.value < 200  # drawn when the clock moved, not on every row

    bar.close("success", summary(total=1000, succeeded=1000))
    assert len(drawn) == 3  # close always draws, with the run's own counts
    assert bar.bar.value == 1000
    assert drawn[-1].startswith("1,000/1,000 rows | 1,000 done,")


def test_widget_catches_up_soon_after_rows_slow_down(clock):
    bar, _ = widget_bar(100_000, clock)
    drawn = count_redraws(bar)
    for _ in range(10_000):  # a burst: the clock never moves, so it is read less and less often
        bar.update(done=1)
    clock.advance(10)
    updates_until_redrawn = 0
    while not drawn:
        bar.update(done=1)
        updates_until_redrawn += 1
    assert updates_until_redrawn <= 100
    assert drawn[-1].startswith(f"{10_000 + updates_until_redrawn:,}/100,000 rows")


def test_widget_counts_rate_and_eta(clock):
    bar, _ = widget_bar(100, clock)
    clock.advance(10)
    bar.update(done=18, failed=2, cached=10, retrying=3)
    assert bar.bar.value == 30
    # rate counts rows that ran (done + failed), not cache hits: 20 rows in 10 s; 70 left.
    assert bar.counts.value == ("30/100 rows | 18 done, 2 failed, 10 cached, 3 retrying"
                                " | 2.0 rows/s | 10s elapsed, ETA 35s")


def test_widget_shows_containers_tokens_and_cost_only_once_reported(clock):
    bar, _ = widget_bar(100, clock)
    clock.advance(1)
    bar.update(done=1)
    assert "containers" not in bar.counts.value and "tokens" not in bar.counts.value
    clock.advance(1)
    bar.update(done=1, containers=12, tokens=12345, cost_usd=0.0123)
    assert ("2/100 rows | 2 done, 0 failed, 0 cached, 0 retrying | 12 containers"
            " | 12,345 tokens, $0.0123 | 1.0 rows/s | 2.0s elapsed, ETA 1m38s") == bar.counts.value
    clock.advance(1)
    bar.update(containers=0)  # a gauge that moved is redrawn even when no row finished
    assert "| 0 containers |" in bar.counts.value


def test_widget_success_turns_green_with_summary(clock):
    bar, _ = widget_bar(10, clock)
    clock.advance(5)
    bar.update(done=10)
    bar.close("success", summary(elapsed_s=5.0))
    assert bar.bar.bar_style == "success"
    assert bar.bar.value == 10
    assert bar.counts.value == ("10/10 rows | 10 done, 0 failed, 0 cached, 0 retrying"
                                " | 2.0 rows/s | 5.0s elapsed")
    assert bar.summary.layout.display == ""
    assert bar.summary.value == ('<div class="modal-magic-summary-line">Done: 10 rows in 5.0s'
                                 " (2.0 rows/s) | 10 succeeded, 0 failed, 0 cached</div>")


def test_widget_failures_turn_orange_with_types_counts_and_table(clock):
    bar, _ = widget_bar(200, clock)
    clock.advance(75)
    bar.update(done=196, failed=4)
    bar.close("failed", summary(
        total=200, succeeded=196, failed=4, elapsed_s=75.0,
        errors_by_type={"TimeoutError": 1, "ValueError": 3},
        first_failures=[("3", "ValueError: bad 3"), ("8", "TimeoutError: row took > 60s")],
        errors_call="out.modal.errors()"))
    assert bar.bar.bar_style == "warning"
    value = bar.summary.value
    assert ("Done with failures: 200 rows in 1m15s (2.7 rows/s) | 196 succeeded,"
            " 4 failed (3 ValueError, 1 TimeoutError), 0 cached") in value
    assert "<th" in value and "<td" in value
    assert "<td" in value and ">3</td>" in value and ">ValueError: bad 3</td>" in value
    assert ">TimeoutError: row took &gt; 60s</td>" in value
    assert ("Showing 2 of 4 failed rows. All failures with tracebacks: "
            "<code>out.modal.errors()</code>") in value


def test_widget_abort_turns_red_and_keeps_partial_bar(clock):
    bar, _ = widget_bar(100, clock)
    clock.advance(2)
    bar.update(done=39)
    # Stop came after the run counted its 40th row but before the bar was told: the bar ends with the run's count
    bar.close("aborted", summary(total=100, succeeded=40, failed=0, elapsed_s=2.0, cancelled=60))
    assert bar.bar.bar_style == "danger"
    assert bar.bar.value == 40
    assert bar.summary.value.startswith('<div class="modal-magic-summary-line">Aborted: 100 rows'
                                        " in 2.0s (20.0 rows/s) | 40 succeeded, 0 failed, 60 cancelled")


def test_widget_success_state_with_failed_rows_is_orange(clock):
    bar, _ = widget_bar(2, clock)
    bar.update(done=1, failed=1)
    bar.close("success", summary(total=2, succeeded=1, failed=1))
    assert bar.bar.bar_style == "warning"
    assert "Done with failures" in bar.summary.value


def test_failure_table_escapes_labels_and_messages(clock):
    bar, _ = widget_bar(2, clock)
    bar.update(failed=2)
    bar.close("failed", summary(
        total=2, succeeded=0, failed=2, errors_by_type={"ValueError<x>": 2},
        first_failures=[("<script>alert(1)</script>", "ValueError: a < b & c"),
                        ("('a', 1)", "ValueError: line one\n  line two")],
        errors_call="df2.modal.errors()"))
    value = bar.summary.value
    assert "<script>" not in value
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in value
    assert "ValueError: a &lt; b &amp; c" in value
    assert "(&#x27;a&#x27;, 1)" in value
    assert "ValueError: line one line two" in value  # one line per row
    assert "2 ValueError&lt;x&gt;" in value
    assert "<code>df2.modal.errors()</code>" in value


def test_failure_table_lists_the_first_five(clock):
    bar, _ = widget_bar(12, clock)
    bar.update(failed=12)
    failures = [(str(i), f"KeyError: {i}") for i in range(12)]
    bar.close("failed", summary(total=12, succeeded=0, failed=12, first_failures=failures))
    value = bar.summary.value
    assert value.count("<tr>") == 6  # header + 5 rows
    assert ">KeyError: 4</td>" in value and "KeyError: 5" not in value
    assert "Showing 5 of 12 failed rows." in value


def test_close_is_final(clock):
    bar, _ = widget_bar(10, clock)
    bar.update(done=4)
    bar.close("aborted", summary(succeeded=4))
    before = (bar.counts.value, bar.bar.value, bar.summary.value)
    clock.advance(5)
    bar.update(done=6, containers=3)
    bar.close("success", summary())
    assert (bar.counts.value, bar.bar.value, bar.summary.value) == before
    assert bar.bar.bar_style == "danger"


def test_summary_falls_back_to_reported_tokens_and_cost(clock):
    bar, _ = widget_bar(1, clock)
    bar.update(done=1, tokens=1500, cost_usd=2.5)
    bar.close("success", summary(total=1, succeeded=1))
    assert bar.summary.value.endswith("| 1 succeeded, 0 failed, 0 cached | 1,500 tokens, $2.50</div>")


def test_empty_run_closes_full_and_green(clock):
    bar, _ = widget_bar(0, clock)
    bar.close("success", summary(total=0, succeeded=0, elapsed_s=0.0))
    assert (bar.bar.value, bar.bar.max, bar.bar.bar_style) == (1, 1, "success")
    assert "Done: 0 rows in 0.0s (no row ran)" in bar.summary.value


# --- text -----------------------------------------------------------------------------------


def test_text_bar_in_a_log_writes_few_lines_and_ends_with_final_counts(clock):
    out = io.StringIO()
    bar = TextProgress(100_000, title="embed", clock=clock, file=out)
    for _ in range(100_000):
        clock.advance(0.001)
        bar.update(done=1)
    bar.close("success", summary(total=100_000, succeeded=100_000, elapsed_s=100.0))
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) <= 20
    assert lines[0] == ("embed: 0/100,000 rows | 0 done, 0 failed, 0 cached, 0 retrying"
                        " | ? rows/s | 0.0s elapsed, ETA ?")
    # one line as each tenth of the rows is passed (drawn within 0.1 s of passing it)
    assert [line.split("/")[0][:-3] for line in lines[1:10]] == [
        f"embed: {tenth}0," for tenth in range(1, 10)]
    assert lines[-2] == ("embed: 100,000/100,000 rows | 100,000 done, 0 failed, 0 cached,"
                         " 0 retrying | 1,000 rows/s | 1m40s elapsed")
    assert lines[-1] == ("Done: 100,000 rows in 1m40s (1,000 rows/s) | 100,000 succeeded,"
                         " 0 failed, 0 cached")


def test_text_bar_in_a_log_writes_a_line_every_log_interval(clock):
    out = io.StringIO()
    bar = TextProgress(1_000_000, clock=clock, file=out)
    for _ in range(100):  # 100 s, far from the next tenth of the rows
        clock.advance(1.0)
        bar.update(done=1)
    assert len(out.getvalue().splitlines()) == 1 + 3  # start, then at 30 s, 60 s, 90 s


def test_text_bar_on_a_terminal_rewrites_one_line(clock):
    out = TTYStream()
    bar = TextProgress(100, clock=clock, file=out)
    for _ in range(50):
        clock.advance(0.2)
        bar.update(done=1)
    running = out.getvalue()
    assert "\n" not in running
    assert running.count("\r") > 10
    assert running.rsplit("\r", 1)[-1].startswith("50/100 rows | 50 done")

    bar.update(failed=1)
    bar.close("failed", summary(total=100, succeeded=50, failed=1, elapsed_s=10.0,
                                errors_by_type={"ValueError": 1},
                                first_failures=[("row-7", "ValueError: négatif")]))
    final_line, *after = out.getvalue().rsplit("\r", 1)[-1].split("\n")
    assert final_line.rstrip() == ("51/100 rows | 50 done, 1 failed, 0 cached, 0 retrying"
                                   " | 5.1 rows/s | 10s elapsed")
    assert after == [
        "Done with failures: 100 rows in 10s (5.1 rows/s) | 50 succeeded, 1 failed"
        " (1 ValueError), 0 cached",
        "  row-7: ValueError: négatif",
        "  Showing 1 of 1 failed rows. All failures with tracebacks: out.modal.errors()",
        "",
    ]


def test_text_bar_on_a_terminal_blanks_what_a_shorter_line_leaves(clock):
    out = TTYStream()
    bar = TextProgress(10, clock=clock, file=out)
    first = out.getvalue()
    clock.advance(1)
    bar.update(done=1, containers=100)
    clock.advance(1)
    bar.update(containers=1)  # the new line is shorter by one character
    last = out.getvalue()[len(first):].rsplit("\r", 1)[-1]
    assert last.endswith(" ") and len(last) == len(out.getvalue()[len(first):].split("\r")[1])


def test_text_bar_survives_a_stream_that_cannot_encode(clock):
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    bar = TextProgress(1, clock=clock, file=out)
    bar.update(failed=1)
    bar.close("failed", summary(total=1, succeeded=0, failed=1,
                                first_failures=[("0", "ValueError: naïve")]))
    assert b"  0: ValueError: na\\xefve\n" in raw.getvalue()


# --- choosing the display -------------------------------------------------------------------


def test_disabled_progress_shows_nothing(capsys):
    bar = make_progress(False, 10, title="quiet")
    assert type(bar) is Progress
    bar.update(done=5, failed=5, containers=2)
    bar.close("failed", summary(succeeded=5, failed=5))
    assert capsys.readouterr() == ("", "")


def test_detection_outside_a_kernel_is_text():
    assert _detect_display() == "text"


def test_detection_in_a_terminal_ipython_is_text(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    fake = types.ModuleType("ipykernel.zmqshell")
    fake.ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", fake)
    monkeypatch.setattr("IPython.get_ipython", lambda: object.__new__(InteractiveShell))
    assert _detect_display() == "text"


def test_detection_in_a_kernel_is_widget(monkeypatch):
    fake = types.ModuleType("ipykernel.zmqshell")
    fake.ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", fake)
    monkeypatch.setattr("IPython.get_ipython", lambda: fake.ZMQInteractiveShell())
    assert _detect_display() == "widget"
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # ipywidgets not installed
    assert _detect_display() == "text"


def test_make_progress_outside_a_kernel_writes_text_to_stderr(capsys, clock):
    bar = make_progress(True, 4, title="parse", clock=clock)
    assert isinstance(bar, TextProgress)
    bar.update(done=4)
    bar.close("success", summary(total=4, succeeded=4, elapsed_s=1.0))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == ("Done: 4 rows in 1.0s (4.0 rows/s) | 4 succeeded,"
                                             " 0 failed, 0 cached")


class Handle:
    """What IPython's ``display(..., display_id=True)`` returns: an output that can be replaced."""

    def __init__(self) -> None:
        self.updates: list = []

    def update(self, bundle, raw=False) -> None:
        self.updates.append((bundle, raw))


def test_make_progress_in_a_kernel_displays_the_widget(monkeypatch, clock):
    shown: list = []
    handle = Handle()

    def display(obj, display_id=None):
        shown.append((obj, display_id))
        return handle

    monkeypatch.setattr(progress, "_detect_display", lambda: "widget")
    monkeypatch.setattr("IPython.display.display", display)
    bar = make_progress(True, 4, title="parse", clock=clock)
    assert isinstance(bar, WidgetProgress)
    assert shown == [(bar.widget, True)]
    assert handle.updates == [], "the live widget stays while rows run"


def test_the_live_widget_has_a_text_form_not_its_repr(clock):
    bar, _ = widget_bar(3_000, clock, title="sentiment")
    bundle = bar.widget._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("sentiment: running over 3,000 rows (the live bar needs its kernel")


def test_finished_widget_output_becomes_static_text_and_html(clock):
    """A saved notebook shows the finished bar without a kernel: text/plain and text/html, no widget."""
    handle = Handle()
    bar = WidgetProgress(4, title="parse", clock=clock, show=lambda widget: handle)
    bar.update(done=3, failed=1)
    clock.advance(2.0)
    bar.log(["Building image im-1"])
    bar.close("success", summary(total=4, succeeded=3, failed=1, elapsed_s=2.0, errors_by_type={"ValueError": 1},
                                 first_failures=[("7", "ValueError: <bad>")], errors_call="df.modal.errors()"))
    [(bundle, raw)] = handle.updates
    assert raw and set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"].splitlines() == [
        "parse: 4/4 rows | 3 done, 1 failed, 0 cached, 0 retrying | 2.0 rows/s | 2.0s elapsed",
        "Done with failures: 4 rows in 2.0s (2.0 rows/s) | 3 succeeded, 1 failed (1 ValueError), 0 cached",
        "  7: ValueError: <bad>",
        "  Showing 1 of 1 failed rows. All failures with tracebacks: df.modal.errors()",
    ]
    page = bundle["text/html"]
    assert 'class="progress-bar progress-bar-warning" style="width: 100%' in page
    assert '<span class="modal-magic-title" style="margin-right: 0.5em">parse</span>' in page
    assert "<td style=\"padding: 0 1em 0 0; text-align: left; vertical-align: top\">ValueError: &lt;bad&gt;</td>" in page
    assert "<summary>Modal output (1 lines)</summary>" in page and "Building image im-1" in page
    assert "<code>df.modal.errors()</code>" in page
