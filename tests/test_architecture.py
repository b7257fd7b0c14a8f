"""The package's shape, checked from its source: no import cycles, the library never imports the
IPython face, no generic layer reads attributes off the user's function, and the supported modal
client range warns outside the tested versions.

The import graph is built from ``ast``: every ``import`` and ``from ... import`` of a modal_magic
module counts, at module level or inside a function (a lazy import is still a dependency a reader
must follow), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import warnings
from pathlib import Path

import pytest

from modal_magic import versions

PACKAGE = Path(__file__).resolve().parents[1] / "modal_magic"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modal_magic modules ``path`` imports (outside ``if TYPE_CHECKING:`` blocks)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    # "from . import x" names a module x when one exists, else an attribute of the package; a
    # module's own parent packages are always initialised before it, so they are no dependency
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in ancestors}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_ipython_face():
    offenders = {
        module: sorted(m for m in imported if m.startswith("modal_magic.ipython"))
        for module, imported in import_graph().items()
        if not module.startswith("modal_magic.ipython") and module != "modal_magic"
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_generic_layer_reads_attributes_off_the_users_function():
    pattern = re.compile(r"getattr\([^)]*[\"']modal_magic_")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def _mentions(pattern: str) -> list[str]:
    found = re.compile(pattern)
    return sorted({str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if found.search(p.read_text())})


def test_one_place_decides_which_modules_are_libraries():
    """Shipping and the fingerprint must agree on what is the user's code: one function says."""
    assert _mentions(r"sysconfig|getsitepackages|packages_distributions") == ["code_origin.py"]
    assert _mentions(r"def _?is_library") == ["code_origin.py"]


def test_every_default_and_cap_of_max_containers_is_declared_in_options():
    from modal_magic import llm, options
    from modal_magic.backends import modal as modal_backend
    from modal_magic.backends import threads

    assert modal_backend.DEFAULT_CONTAINERS is options.DEFAULT_MODAL_CONTAINERS
    assert llm.DEFAULT_CONCURRENCY is options.DEFAULT_LLM_CONCURRENCY
    assert threads.MAX_THREADS is options.MAX_THREADS
    # no backend or LLM module spells a concurrency number of its own
    assert _mentions(r"(?m)^[A-Z_]*(CONTAINERS|CONCURRENCY|THREADS|PER_CORE)\s*=\s*\d") == ["options.py"]


def test_dev_only_code_is_not_shipped():
    assert not (PACKAGE / "_notebook.py").exists()
    assert not (PACKAGE / "datasets" / "_make_reviews.py").exists()
    assert (PACKAGE / "py.typed").exists()


def test_the_tested_modal_client_gives_no_warning():
    assert versions.modal_version_problem(importlib.metadata.version("modal")) is None


def test_an_untested_modal_client_warns_once_with_the_tested_versions(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.9.2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.warn_if_untested_modal()
    assert [w.category for w in caught] == [versions.UntestedModalClient]
    message = str(caught[0].message)
    assert "tested with the modal client 1.6.x" in message and "you have modal 1.9.2" in message


@pytest.mark.parametrize("version", ["1.6.0", "1.6.4", "1.6.10"])
def test_every_patch_release_of_a_tested_minor_is_accepted(version):
    assert versions.modal_version_problem(version) is None


def test_every_exception_a_user_catches_is_exported_from_the_package():
    import modal_magic

    for name in ["FunctionError", "TemplateError", "MissingAPIKey", "BudgetExceeded", "RateLimitError",
                 "SchemaValidationError", "RowFailed", "MapInterrupted", "ModalSetupError", "OptionsError"]:
        assert issubclass(getattr(modal_magic, name), BaseException), name
    assert modal_magic.RunSummary.__name__ == "RunSummary"
    assert callable(modal_magic.register_backend)
    assert sorted(modal_magic.__all__) == sorted(set(modal_magic.__all__))
    assert all(hasattr(modal_magic, name) for name in modal_magic.__all__)
