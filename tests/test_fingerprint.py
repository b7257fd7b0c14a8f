"""Function fingerprints: what a user edits invalidates the cache; re-running an unchanged cell doesn't."""

from __future__ import annotations

import functools
import importlib
import itertools
import subprocess
import sys
import textwrap
import types

import pytest

from modal_magic import code_origin
from modal_magic.cache import function_fingerprint
from modal_magic.shipping import own_packages

_cells = itertools.count(1)


def cell(source: str, namespace: dict | None = None) -> dict:
    """Run ``source`` the way a notebook cell runs: in ``__main__``, under a fresh cell file name."""
    namespace = namespace if namespace is not None else {"__name__": "__main__"}
    code = compile(textwrap.dedent(source), f"<ipython-input-{next(_cells)}-0a1b2c3d>", "exec")
    exec(code, namespace)
    return namespace


def fp(fn, **options) -> str:
    return function_fingerprint(fn, star=False, result_options=options)


SCORE = """
THRESHOLD = 0.5

def score(text):
    return len(text) > THRESHOLD
"""


def test_identical_redefinition_in_a_new_cell_keeps_the_fingerprint():
    first = cell(SCORE)["score"]
    moved = cell("\n\n\n# a comment above\n" + SCORE)["score"]  # other lines, other file name
    assert first is not moved
    assert fp(first) == fp(moved)


def test_editing_the_code_changes_it():
    assert fp(cell(SCORE)["score"]) != fp(cell(SCORE.replace("> THRESHOLD", ">= THRESHOLD"))["score"])


def test_editing_a_global_it_reads_changes_it_and_an_unrelated_one_does_not():
    namespace = cell(SCORE + "\nUNRELATED = 1\n")
    before = fp(namespace["score"])
    namespace["UNRELATED"] = 2
    assert fp(namespace["score"]) == before
    namespace["THRESHOLD"] = 0.6
    assert fp(namespace["score"]) != before


def test_an_edit_deep_inside_a_large_global_table_counts():
    source = "TABLE = {f'w{i}': i for i in range(10_000)}\nNESTED = [[i] for i in range(1_000)]\n" \
             "def f(x):\n    return TABLE.get(x), NESTED[0]\n"
    namespace = cell(source)
    before = fp(namespace["f"])
    assert fp(cell(source)["f"]) == before
    namespace["TABLE"]["w5000"] = -1
    assert fp(namespace["f"]) != before
    namespace["TABLE"]["w5000"] = 5000
    namespace["NESTED"][999][0] = -1
    assert fp(namespace["f"]) != before


def test_editing_a_closure_value_changes_it():
    make = cell("""
        def make_scorer(threshold):
            def score(text):
                return len(text) > threshold
            return score
    """)["make_scorer"]
    assert fp(make(3)) == fp(make(3))
    assert fp(make(3)) != fp(make(4))


@pytest.mark.parametrize("edited", ["def f(x, k=2, *, j=2):", "def f(x, k=1, *, j=3):"])
def test_editing_a_default_argument_changes_it(edited):
    source = "def f(x, k=1, *, j=2):\n    return x * k + j\n"
    assert fp(cell(source)["f"]) != fp(cell(source.replace("def f(x, k=1, *, j=2):", edited))["f"])


def test_editing_a_helper_it_calls_changes_it():
    source = """
        def clean(text):
            return text.strip()

        def count(text):
            return len(clean(text))
    """
    assert fp(cell(source)["count"]) == fp(cell(source)["count"])
    assert fp(cell(source)["count"]) != fp(cell(source.replace("strip()", "lower()"))["count"])


def test_a_helper_reached_through_a_user_module_is_followed(tmp_path, monkeypatch):
    (tmp_path / "my_helpers.py").write_text("def clean(text):\n    return text.strip()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_helpers

    fn = cell("import my_helpers\n\ndef count(text):\n    return len(my_helpers.clean(text))\n")["count"]
    before = fp(fn)
    (tmp_path / "my_helpers.py").write_text("def clean(text):\n    return text.lower()\n")
    importlib.reload(my_helpers)
    assert fp(fn) != before
    sys.modules.pop("my_helpers")


def test_a_lambda_and_the_same_def_share_a_fingerprint_names_do_not_count():
    namespace = cell("""
        as_lambda = lambda x: x + 1

        def as_def(x):
            '''Add one.'''
            return x + 1

        other = lambda x: x + 2
    """)
    assert fp(namespace["as_lambda"]) == fp(namespace["as_def"])
    assert fp(namespace["as_lambda"]) != fp(namespace["other"])


def test_partial_counts_its_function_and_arguments():
    add = cell("def add(a, b, scale=1):\n    return (a + b) * scale\n")["add"]
    assert fp(functools.partial(add, 1)) == fp(functools.partial(add, 1))
    assert fp(functools.partial(add, 1)) != fp(functools.partial(add, 2))
    assert fp(functools.partial(add, 1, scale=2)) != fp(functools.partial(add, 1, scale=3))
    assert fp(functools.partial(add, 1)) != fp(add)


def test_a_callable_instance_counts_its_class_code_and_its_state():
    source = """
        class Scorer:
            def __init__(self, threshold):
                self.threshold = threshold

            def __call__(self, text):
                return len(text) > self.threshold
    """
    scorer = cell(source)["Scorer"]
    assert fp(scorer(3)) == fp(cell(source)["Scorer"](3))
    assert fp(scorer(3)) != fp(scorer(4))
    assert fp(scorer(3)) != fp(cell(source.replace("> self", ">= self"))["Scorer"](3))
    assert fp(scorer(3).__call__) != fp(scorer(4).__call__)


def test_an_unpicklable_global_does_not_crash_and_is_stable():
    source = """
        import threading

        LOCK = threading.Lock()
        PENDING = (n for n in range(3))

        def f(x):
            with LOCK:
                return x, PENDING
    """
    namespace = cell(source)
    before = fp(namespace["f"])
    with namespace["LOCK"]:  # a held lock's repr differs; it mustn't matter
        assert fp(namespace["f"]) == before
    assert fp(cell(source)["f"]) == before


def test_a_global_the_function_assigns_is_state_not_input():
    namespace = cell("""
        _model = None

        def get_model():
            global _model
            if _model is None:
                _model = {"weight": 2}
            return _model

        def predict(x):
            return get_model()["weight"] * x
    """)
    before = fp(namespace["predict"])
    namespace["predict"](1)  # builds the model on first use
    assert namespace["_model"] == {"weight": 2}
    assert fp(namespace["predict"]) == before


def test_recursive_and_mutually_recursive_functions_terminate():
    namespace = cell("""
        def even(n):
            return n == 0 or odd(n - 1)

        def odd(n):
            return n != 0 and even(n - 1)
    """)
    assert fp(namespace["even"]) != fp(namespace["odd"])


def test_library_calls_count_by_name():
    namespace = cell("""
        import math

        def a(x):
            return math.sqrt(x)

        def b(x):
            return math.floor(x)
    """)
    assert fp(namespace["a"]) != fp(namespace["b"])
    assert fp(len) == fp(len) and fp(len) != fp(abs)


def test_star_and_result_options_count():
    f = cell("def f(a, b=0):\n    return a\n")["f"]
    base = function_fingerprint(f, star=False, result_options={"expand": False, "timeout": None})
    assert function_fingerprint(f, star=True, result_options={"expand": False, "timeout": None}) != base
    assert function_fingerprint(f, star=False, result_options={"expand": True, "timeout": None}) != base
    assert function_fingerprint(f, star=False, result_options={"timeout": None, "expand": False}) == base


def test_an_installed_module_function_is_hashed_by_code(tmp_path, monkeypatch):
    """A function from a package under site-packages counts by code, helpers in its package too."""
    package = tmp_path / "site" / "fp_demo_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    module = "def _clean(t):\n    return t.strip()\n\ndef classify(t):\n    return len(_clean(t))\n"
    (package / "text.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(code_origin, "LIBRARY_ROOTS", (*code_origin.LIBRARY_ROOTS, str(tmp_path / "site") + "/"))
    code_origin.forget()
    try:
        from fp_demo_pkg import text

        assert code_origin.is_library_module("fp_demo_pkg.text")
        before = fp(text.classify)
        (package / "text.py").write_text(module.replace("strip", "lower"))
        importlib.reload(text)
        assert fp(text.classify) != before
    finally:
        code_origin.forget()
        for name in ("fp_demo_pkg.text", "fp_demo_pkg"):
            sys.modules.pop(name, None)


def test_the_demo_classifier_has_a_stable_fingerprint_of_its_own():
    from modal_magic.datasets.sentiment import classify_sentiment, sentiment_scores

    assert fp(classify_sentiment) == fp(classify_sentiment)
    assert fp(classify_sentiment) != fp(sentiment_scores)


def test_the_fingerprint_is_the_same_in_another_process_whatever_its_hash_seed():
    """Sets of strings iterate in a per-process order; a restarted kernel must still find its rows."""
    script = textwrap.dedent("""
        from modal_magic.cache import function_fingerprint, row_keys
        namespace = {"__name__": "__main__"}
        exec('''
        import numpy as np
        STOP = {"a", "an", "the", "of", "to"}
        WEIGHTS = np.arange(5.0)
        TABLE = {"x": [1, 2], "y": frozenset({"p", "q"})}
        def f(text):
            return sum(w not in STOP for w in text.split()) * WEIGHTS[1] + len(TABLE)
        ''', namespace)
        fn = namespace["f"]
        keys = row_keys("fp", [{"b", "a", "c"}, ("x", {"k": {"z", "y"}})])
        print(function_fingerprint(fn, star=False, result_options={"expand": False}), keys[0].hex(), keys[1].hex())
    """)
    outputs = set()
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout.strip())
    assert len(outputs) == 1


def test_module_state_that_cannot_change_results_does_not_count():
    """RNG state (random.random is a bound method of one), locks, clients and id()-bearing reprs."""
    import random
    import threading

    rng = random.Random(1)

    class Opaque:  # unpicklable, with an id() in its repr: counted by its repr, ids removed
        def __reduce__(self):
            raise TypeError("no")

        def __repr__(self):
            return f"<Opaque id={id(self)}>"

    def make():
        lock, opaque = threading.Lock(), Opaque()

        def f(x):
            with lock:
                return x + random.random() * 0 + rng.random() * 0 + len(repr(opaque)) * 0

        return f

    before = fp(make())
    random.random(), rng.random()
    assert fp(make()) == before


# --- what can't be hashed, and where the user's own code ends ------------------------------------


def test_an_object_whose_own_code_raises_while_read_counts_by_its_repr():
    """A hostile __getattribute__ must not break a run; the object counts by its type and repr."""
    namespace = cell("""
        class Hostile:
            def __init__(self, label):
                object.__setattr__(self, "label", label)

            def __getattribute__(self, name):
                if name in ("__dict__", "__wrapped__", "__class__"):
                    raise RuntimeError("no peeking")
                return object.__getattribute__(self, name)

            def __repr__(self):
                return f"Hostile({object.__getattribute__(self, 'label')})"

        GUARD = Hostile("a")

        def f(x):
            return x, GUARD
    """)
    before = fp(namespace["f"])
    assert fp(namespace["f"]) == before
    namespace["GUARD"] = namespace["Hostile"]("b")  # a different repr: a different value
    assert fp(namespace["f"]) != before


def test_a_value_that_neither_pickles_nor_prints_counts_by_its_type():
    from modal_magic.value_digest import pickle_digest, stable_repr

    class Sealed:
        def __reduce__(self):
            raise RuntimeError("sealed")

        def __repr__(self):
            raise ValueError("no repr either")

    assert stable_repr(Sealed()).endswith("Sealed:<unrepresentable>")
    assert pickle_digest(Sealed()) == b"r" + stable_repr(Sealed()).encode()
    assert pickle_digest(Sealed()) != pickle_digest(object())


def test_a_module_attribute_missing_when_hashed_counts_and_defining_it_changes_the_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "fp_lazy_helpers.py").write_text(textwrap.dedent("""
        def __getattr__(name):
            if name == "broken":
                raise ImportError("the optional dependency isn't installed")
            if name == "lazy":
                raise RuntimeError("Failed to import fp_lazy_helpers.lazy")  # as transformers' lazy modules do
            raise AttributeError(name)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import fp_lazy_helpers

    try:
        namespace = cell("import fp_lazy_helpers\n\n"
                         "def f(x):\n"
                         "    return fp_lazy_helpers.later(x), fp_lazy_helpers.broken, fp_lazy_helpers.lazy\n")
        before = fp(namespace["f"])
        assert fp(namespace["f"]) == before
        fp_lazy_helpers.later = abs
        assert fp(namespace["f"]) != before
    finally:
        sys.modules.pop("fp_lazy_helpers", None)


def test_a_library_version_comes_from_its_distribution_when_the_module_has_none():
    import google.protobuf  # noqa: F401  (the 'google' namespace package, from the protobuf distribution)
    from importlib.metadata import version

    assert code_origin.version_of("google.protobuf") == f"protobuf-{version('protobuf')}"
    assert code_origin.version_of("fp_no_such_module_anywhere") == "unknown"


def _fake_install(root, name: str, *, editable: bool) -> None:
    """An installed distribution of ``name`` whose code lives outside site-packages (as pip -e leaves it)."""
    source = root / "src" / name
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("")
    (source / "scoring.py").write_text("SCALE = 2\n\ndef score(x):\n    return x * SCALE\n")
    info = root / "site" / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    if editable:
        (info / "direct_url.json").write_text('{"url": "file:///src", "dir_info": {"editable": true}}')


@pytest.mark.parametrize("editable", [True, False])
def test_an_editable_install_is_the_users_own_code_and_an_installed_one_a_library(tmp_path, monkeypatch, editable):
    name = f"fp_dist_{'editable' if editable else 'installed'}"
    _fake_install(tmp_path, name, editable=editable)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    code_origin.forget()
    try:
        scoring = importlib.import_module(f"{name}.scoring")
        assert code_origin.module_origin(scoring.__name__) == ("editable" if editable else "library")
        assert code_origin.is_library_module(scoring.__name__) is not editable
        # either way the workers import it (it is installed); only modules installed nowhere go by value
        assert name not in own_packages()
        namespace = cell(f"from {name} import scoring\n\ndef f(x):\n    return scoring.score(x) + 1\n")
        before = fp(namespace["f"])
        (tmp_path / "src" / name / "scoring.py").write_text("SCALE = 3\n\ndef score(x):\n    return x * SCALE\n")
        importlib.reload(scoring)
        # an edit to a package in development re-runs the rows of a notebook function that calls
        # it; an installed library counts by its name and version
        assert (fp(namespace["f"]) != before) is editable
    finally:
        code_origin.forget()
        for module in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[module]


def test_an_int_too_large_to_print_counts_by_its_value():
    namespace = cell("BIG = 10**5000\n\ndef f(x):\n    return x + BIG\n")
    before = fp(namespace["f"])
    assert fp(namespace["f"]) == before
    namespace["BIG"] += 1
    assert fp(namespace["f"]) != before
def test_which_modules_are_imported_is_not_part_of_a_fingerprint():
    """A function that reads ``sys.modules`` (the LLM row runtime does) kept changing its fingerprint
    whenever anything was imported: the first LLM run of a kernel was never reused in that kernel."""
    def loaded(name):
        return sys.modules.get(name) is not None

    before = function_fingerprint(loaded, star=False, result_options={})
    sys.modules["modal_magic_test_fake_module"] = types.ModuleType("modal_magic_test_fake_module")
    try:
        assert function_fingerprint(loaded, star=False, result_options={}) == before
    finally:
        del sys.modules["modal_magic_test_fake_module"]


def test_importing_a_module_between_runs_keeps_the_fingerprint_of_a_function_that_reads_sys_modules():
    # An LLM client's first request imports a dozen modules; a function that looks in sys.modules
    # (as the LLM row function does, to rebuild errors) must not get a new fingerprint from that.
    def loaded(x):
        return x if sys.modules.get("json") is None else -x

    before = fp(loaded)
    sys.modules["modal_magic_test_fresh_module"] = type(sys)("modal_magic_test_fresh_module")
    try:
        assert fp(loaded) == before
    finally:
        del sys.modules["modal_magic_test_fresh_module"]
