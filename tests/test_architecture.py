"""The library's stages import one way: no cycle, no project import hidden in a function, and
every module imports only modules of earlier stages (``retrieval_lib.MODULES``)."""

import ast
from pathlib import Path

import retrieval_lib

PACKAGE = Path(retrieval_lib.__file__).parent


def _imports(path: Path) -> tuple[set[str], list[tuple[str, int]]]:
    """Project modules imported at the top of ``path``, and those imported elsewhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    at_top, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            module = node.module.split(".")[0]
            if id(node) in top:
                at_top.add(module)
            else:
                inner.append((module, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("retrieval_lib."):
                    inner.append((alias.name.split(".")[1], node.lineno))
    return at_top, inner


def test_every_module_is_listed_once_in_stage_order():
    files = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert sorted(retrieval_lib.MODULES) == sorted(files)
    assert len(set(retrieval_lib.MODULES)) == len(retrieval_lib.MODULES)
    for name in retrieval_lib.MODULES:  # the package docstring names every module
        assert f"``{name}``" in retrieval_lib.__doc__


def test_imports_flow_one_way_and_sit_at_the_top():
    order = {name: i for i, name in enumerate(retrieval_lib.MODULES)}
    backwards, hidden = [], []
    for name in retrieval_lib.MODULES:
        at_top, inner = _imports(PACKAGE / f"{name}.py")
        backwards += [f"{name} -> {dep}" for dep in sorted(at_top) if order[dep] >= order[name]]
        hidden += [f"{name}:{line} imports {dep} inside a function" for dep, line in inner]
    assert backwards == [], "a module imports one of a later stage (or itself)"
    assert hidden == []


def test_the_checker_sees_a_backward_and_a_hidden_import(tmp_path):
    """The checks above can fail: a module importing a later one, inside a function."""
    path = tmp_path / "config.py"
    path.write_text("from .data import x\n\ndef f():\n    from .experiment import y\n")
    at_top, inner = _imports(path)
    assert at_top == {"data"} and inner == [("experiment", 4)]
