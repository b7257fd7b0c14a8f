"""Hostile and unusual inputs from issue 12 that aren't about the worker pool: module state the
notebook changed, results no nullable dtype can hold, and frames with repeated column names."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pandas as pd
import pytest

import modal_magic
from modal_magic.options import OptionsError
from modal_magic.shipping import ModuleStateWarning


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``pkg/scoring.py``, the user's own (not installed) module, imported the way a notebook would."""
    package = tmp_path / "mm_user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(textwrap.dedent("""
        import dataclasses
        import threading

        SETTINGS = {"scale": 2}

        def score(x):
            return x * SETTINGS["scale"]

        @dataclasses.dataclass
        class Scored:
            value: int

        def scored(x):
            return Scored(score(x))

        LOCK = threading.Lock()  # module state that can't be pickled

        def locked(x):
            with LOCK:
                return x * SETTINGS["scale"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import mm_user_pkg.scoring as scoring

    yield scoring
    for name in [m for m in sys.modules if m.startswith("mm_user_pkg")]:
        del sys.modules[name]


def test_module_state_the_kernel_changed_is_what_every_backend_sees(user_package, backend):
    user_package.SETTINGS["scale"] = 5
    frame = pd.DataFrame({"x": [1, 2, 3]})
    expected = frame["x"].apply(user_package.score).tolist()
    out = frame.modal.map(user_package.score, column="x", backend=backend, progress=False)
    assert expected == [5, 10, 15]
    assert out["score"].tolist() == expected


def test_a_changed_setting_is_not_answered_from_the_cache(user_package):
    frame = pd.DataFrame({"x": [1, 2, 3]})
    first = frame.modal.map(user_package.score, column="x", progress=False)
    user_package.SETTINGS["scale"] = 7
    again = frame.modal.map(user_package.score, column="x", progress=False)
    assert first["score"].tolist() == [2, 4, 6]
    assert again["score"].tolist() == [7, 14, 21]


def test_instances_of_the_users_classes_come_back_as_the_kernels_class(user_package):
    out = pd.DataFrame({"x": [1, 2]}).modal.map(user_package.scored, column="x", progress=False)
    assert [type(v) for v in out["scored"]] == [user_package.Scored, user_package.Scored]
    assert out["scored"].tolist() == [user_package.Scored(2), user_package.Scored(4)]


def test_a_module_that_cant_go_by_value_is_reported(user_package):
    user_package.SETTINGS["scale"] = 3
    frame = pd.DataFrame({"x": [1, 2]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = frame.modal.map(user_package.locked, column="x", progress=False, cache=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, ModuleStateWarning)]
    assert messages and "import them afresh" in messages[0] and "locked" in messages[0]
    assert out["locked_error"].isna().all()


@pytest.mark.parametrize("backend", ["sequential", "local", "threads"])
def test_results_past_int64_with_a_failed_row_keep_every_row(backend):
    def huge(x):
        if x == 1:
            raise ValueError("no")
        return 2**63 + x

    out = pd.DataFrame({"x": range(4)}).modal.map(huge, column="x", backend=backend, progress=False)
    assert str(out["huge"].dtype) == "UInt64"
    assert out["huge"].tolist() == [2**63, pd.NA, 2**63 + 2, 2**63 + 3]
    assert out["huge_error"].tolist()[1] == "ValueError: no"


def test_results_past_every_64_bit_dtype_fall_back_to_objects():
    def enormous(x):
        if x == 1:
            raise ValueError("no")
        return -(2**70) if x == 0 else 2**64 + x

    out = pd.DataFrame({"x": range(3)}).modal.map(enormous, column="x", backend="sequential", progress=False)
    assert out["enormous"].dtype == object
    assert out["enormous"].tolist() == [-(2**70), None, 2**64 + 2]


def test_a_repeated_column_name_is_a_clear_error_before_any_work():
    frame = pd.DataFrame([[1, 2, 3]], columns=["x", "x", "y"])
    calls = []
    with pytest.raises(OptionsError, match="has 2 columns named 'x'.*rename them first"):
        frame.modal.map(calls.append, column="x", backend="sequential", progress=False)
    with pytest.raises(OptionsError, match="has 2 columns named 'x'"):
        frame.modal.starmap(lambda a, b: a, columns=["y", "x"], backend="sequential", progress=False)
    assert calls == []
    out = frame.modal.map(lambda v: v + 1, column="y", into="z", backend="sequential", progress=False)
    assert out.columns.tolist() == ["x", "x", "y", "z", "z_error"] and out["z"].tolist() == [4]


def test_a_script_that_imported_multiprocessing_ships_its_functions_without_a_warning(tmp_path):
    """multiprocessing adds ``__mp_main__`` as an alias of ``__main__``; it is one module, sent once."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing  # noqa: F401  (adds sys.modules["__mp_main__"])
        import warnings

        import pandas as pd

        import modal_magic

        SCALE = 3

        def scale(x):
            return x * SCALE

        if __name__ == "__main__":
            warnings.simplefilter("error", modal_magic.ModuleStateWarning)
            out = pd.DataFrame({"x": [1, 2]}).modal.map(scale, column="x", backend="local", progress=False,
                                                        cache=False)
            print(out["scale"].tolist())
            modal_magic.shutdown()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[3, 6]"


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str either")


class _Unpicklable:
    def __reduce__(self):
        raise _Unprintable()


def _returns_unpicklable_on_1(x):
    return _Unpicklable() if x == 1 else x


@pytest.mark.timeout(120, method="thread")
def test_a_result_that_cant_be_pickled_for_a_reason_that_cant_be_printed_fails_only_its_row():
    out = pd.DataFrame({"x": range(3)}).modal.map(_returns_unpicklable_on_1, column="x", backend="local",
                                                  batch_size=3, progress=False, cache=False)
    assert out["_returns_unpicklable_on_1_error"].tolist() == [
        None,
        "UnpicklableResult: the function returned a _Unpicklable that can't be pickled: <unprintable _Unprintable>",
        None,
    ]
    assert out["_returns_unpicklable_on_1"].tolist()[::2] == [0, 2]
