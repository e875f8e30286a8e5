"""The library's stages import one way: no cycle, no project import hidden in a function, and
every module imports only modules of earlier stages, or those before it in its own folder
(``retrieval_lib.MODULES``); each folder is a stage (``retrieval_lib.PACKAGES``)."""

import ast
import importlib
import types
import warnings
from pathlib import Path

import pytest

import retrieval_lib

PACKAGE = Path(retrieval_lib.__file__).parent
#: Files at the top of the package: its docstring and stage lists, the command line, and the
#: old flat module paths kept importable.
TOP_LEVEL = {"__init__", "__main__", "_moved"}
#: The size a reader can hold; the modules above it, with the reason they stay whole.
MAX_LINES = 400
LARGER = {
    "settings.config": "every number of the report, once: the presets and experiments are one "
                       "table a reader looks things up in, not logic to follow",
    "results.reranker": "the cross-encoder, its listwise training and reranking a run, one "
                        "concept whose parts share private helpers",
}


def _imports(path: Path, package: str) -> tuple[set[str], list[tuple[str, int]]]:
    """Project modules (``package.module``) imported at the top of ``path``, and those imported
    elsewhere (inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    at_top, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:
            parts = node.module.split(".")
            name = f"{package}.{parts[0]}" if node.level == 1 else ".".join(parts[:2])
            if id(node) in top:
                at_top.add(name)
            else:
                inner.append((name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("retrieval_lib."):
                    inner.append((".".join(alias.name.split(".")[1:3]), node.lineno))
    return at_top, inner


def _module_files() -> set[str]:
    return {f"{p.parent.name}.{p.stem}" for p in PACKAGE.glob("*/*.py") if p.stem != "__init__"}


def test_every_module_is_listed_once_in_stage_order():
    assert sorted(retrieval_lib.MODULES) == sorted(_module_files())
    assert len(set(retrieval_lib.MODULES)) == len(retrieval_lib.MODULES)
    packages = [m.split(".")[0] for m in retrieval_lib.MODULES]
    assert list(dict.fromkeys(packages)) == list(retrieval_lib.PACKAGES)  # folders contiguous
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP_LEVEL
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        retrieval_lib.PACKAGES)
    for package in retrieval_lib.PACKAGES:  # the package docstring names every stage
        assert f"``{package}``" in retrieval_lib.__doc__


@pytest.mark.parametrize("package", retrieval_lib.PACKAGES)
def test_imports_flow_one_way_and_sit_at_the_top(package):
    order = {name: i for i, name in enumerate(retrieval_lib.MODULES)}
    backwards, hidden = [], []
    for name in [m for m in retrieval_lib.MODULES if m.startswith(package + ".")]:
        at_top, inner = _imports(PACKAGE / f"{name.replace('.', '/')}.py", package)
        backwards += [f"{name} -> {dep}" for dep in sorted(at_top) if order[dep] >= order[name]]
        hidden += [f"{name}:{line} imports {dep} inside a function" for dep, line in inner]
    assert backwards == [], "a module imports one of a later stage (or itself)"
    assert hidden == []


@pytest.mark.parametrize("package", retrieval_lib.PACKAGES)
def test_a_folder_names_its_modules_in_stage_order_and_exports_their_public_api(package):
    modules = [m.split(".")[1] for m in retrieval_lib.MODULES if m.startswith(package + ".")]
    init = PACKAGE / package / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    imported = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert imported == modules
    pkg = importlib.import_module(f"retrieval_lib.{package}")
    for module in modules:
        mod = importlib.import_module(f"retrieval_lib.{package}.{module}")
        public = [n for n in mod.__all__ if n != "main"]  # a command line is run, not imported
        # the same object (by its defining module: pytest's doctests may import a module twice)
        assert [n for n in public if not hasattr(pkg, n) or getattr(
            getattr(pkg, n), "__module__", mod.__name__) != getattr(
            getattr(mod, n), "__module__", mod.__name__)] == [], module
        assert set(public) <= set(pkg.__all__)


def test_no_module_is_larger_than_a_reader_can_hold_without_a_stated_reason():
    lines = {m: len((PACKAGE / f"{m.replace('.', '/')}.py").read_text().splitlines())
             for m in retrieval_lib.MODULES}
    assert {m for m, n in lines.items() if n > MAX_LINES} == set(LARGER)


def test_the_checker_sees_a_backward_and_a_hidden_import(tmp_path):
    """The checks above can fail: a module importing a later one, inside a function."""
    path = tmp_path / "config.py"
    path.write_text("from .tokenizer import x\nfrom ..data.splits import z\n\n"
                    "def f():\n    from ..course.experiment import y\n")
    at_top, inner = _imports(path, "settings")
    assert at_top == {"settings.tokenizer", "data.splits"}
    assert inner == [("course.experiment", 5)]


@pytest.mark.parametrize("old", sorted(retrieval_lib.MOVED))
def test_an_old_import_path_still_gives_the_same_object_and_names_the_new_one(old):
    """Saved code that imports the flat layout keeps working: every public name of the
    modules an old module became is reachable through the old path (the same object), and a
    name read through an alias module warns with the module it lives in now."""
    module = importlib.import_module(f"retrieval_lib.{old}")
    for target in retrieval_lib.MOVED[old]:
        new = importlib.import_module(f"retrieval_lib.{target}")
        for name in new.__all__:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert getattr(module, name) is getattr(new, name)
            if type(module) is types.ModuleType:  # a real package now: nothing to warn about
                continue
            assert any(f"from {new.__name__}" in str(w.message) for w in caught), (old, name)


def test_an_unknown_name_of_an_old_module_names_where_the_module_went():
    import retrieval_lib.modeling as modeling

    with pytest.raises(AttributeError, match="retrieval_lib.models.base, "
                                             "retrieval_lib.models.checkpoints, "
                                             "retrieval_lib.models.retriever"):
        modeling.no_such_name  # noqa: B018
