"""Run records: bounded, so old runs' functions (and what they hold) are freed; expired frames say so."""

from __future__ import annotations

import gc
import weakref

import pandas as pd
import pytest

import modal_magic
from modal_magic import runs


class Big:
    """Stands in for what a closure may hold: a model, a lookup table, a client."""

    def __init__(self) -> None:
        self.payload = bytearray(1024 * 1024)


def _closure_over(big: Big):
    def f(x):
        return 1 // x + len(big.payload) * 0  # fails on 0: a run with failures keeps its function

    return f


@pytest.mark.parametrize("backend", ["sequential", "threads"])
def test_old_runs_functions_and_what_they_hold_are_freed(backend):
    df = pd.DataFrame({"x": [1, 0, 1]})
    refs = []
    for _ in range(40):
        big = Big()
        refs.append(weakref.ref(big))
        out = df.modal.map(_closure_over(big), column="x", backend=backend, progress=False, cache=False)
        del big
    gc.collect()
    alive = [i for i, ref in enumerate(refs) if ref() is not None]
    # The last MAX_RUNS runs may keep theirs (for retry_failed); every older one must be gone.
    assert alive and all(i >= 40 - runs.MAX_RUNS for i in alive), alive
    assert out["f"].tolist()[::2] == [1, 1] and pd.isna(out["f"].tolist()[1])
    assert out.modal.retry_failed(progress=False)["f_error"].tolist()[1].startswith("ZeroDivisionError")


def test_a_run_without_failures_keeps_no_function():
    big = Big()
    ref = weakref.ref(big)
    out = pd.DataFrame({"x": [1, 2]}).modal.map(_closure_over(big), column="x", backend="sequential", progress=False)
    del big
    gc.collect()
    assert ref() is None
    assert out.modal.retry_failed(progress=False)["f"].tolist() == [1, 0]  # nothing to retry: the frame as is


def test_a_frame_from_an_expired_run_says_to_run_again():
    df = pd.DataFrame({"x": [1, 0]})
    old = df.modal.map(lambda x: 1 // x, column="x", backend="sequential", progress=False)
    for i in range(runs.MAX_RUNS):
        df.modal.map(lambda x, i=i: i // x, column="x", backend="sequential", progress=False)
    with pytest.raises(ValueError, match=f"older than the last {runs.MAX_RUNS} runs with failed rows.*run its cell"):
        old.modal.retry_failed(progress=False)
    recent = df.modal.map(lambda x: 1 // x, column="x", backend="sequential", progress=False)
    assert recent.modal.retry_failed(progress=False)["result_error"].tolist()[1].startswith("ZeroDivisionError")


def test_the_last_result_frame_holds_no_function():
    big = Big()
    ref = weakref.ref(big)
    df = pd.DataFrame({"x": [0]})
    df.modal.map(_closure_over(big), column="x", backend="sequential", progress=False)
    for i in range(runs.MAX_RUNS):
        df.modal.map(lambda x, i=i: i // x, column="x", backend="sequential", progress=False)
    del big
    gc.collect()
    assert ref() is None
    assert all(isinstance(v, str) for v in modal_magic.last_result().attrs[runs.RunSpec.ATTRS_KEY].values())
