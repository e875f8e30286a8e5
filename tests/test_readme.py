"""The README's and the docs' code examples run as written (on a toy model and toy data in
their places), their tables name what exists, and no link between the pages is broken."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
from toy import toy_model, toy_records

from retrieval_lib import data
from retrieval_lib.data import LoadReport

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _python_block_after(heading: str, page: Path = README) -> str:
    text = page.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_search_example_runs_as_written(tok, tmp_path, monkeypatch, capsys):
    """`make demo` leaves the prepared data and the 108M@288K run; here a toy retriever stands in
    the run folder and toy splits come from the data cache, and the snippet runs unchanged."""
    from retrieval_lib.results import run_dir
    from retrieval_lib.settings import config

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    dcfg = config.get_data_config("demo")
    records = toy_records(60, 3)
    small = replace(dcfg, val_size=10, test_size=20, subset_sizes={"10k": 30})
    splits = data.prepare_splits(records, small, {"toy": LoadReport(read=60, kept=60)})
    monkeypatch.setattr(data, "prepare_data", lambda cfg: splits)
    toy_model(tok).save(run_dir("demo", "minimind108_288k") / "best")
    exec(compile(_python_block_after("## Searching a large corpus", DOCS / "serving.md"),
                 "docs/serving.md", "exec"), {})
    out = capsys.readouterr().out
    assert f"{splits.test['query'][0]} -> [" in out
    recall = float(out.split("HNSW recall@10 against exact search:")[1])
    assert 0.9 <= recall <= 1.0  # 20 queries over a small corpus: HNSW is as good as exact
    assert (tmp_path / "my_index" / "index.faiss").exists()


def test_the_quick_start_example_runs_as_written(tok, tmp_path, monkeypatch, capsys):
    """The README's first Python lines load the run `make demo` leaves (a toy one here)."""
    from retrieval_lib.results import run_dir

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    model = toy_model(tok)
    model.save(run_dir("demo", "minimind27_10k") / "best")
    exec(compile(_python_block_after("## Quick start"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == f"(1, {model.projection_dim})"


def _links(page: Path) -> list[str]:
    """Relative link targets of a Markdown page (images included), without anchors."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t.split("#")[0]]


def test_every_link_of_the_readme_and_the_docs_resolves_and_every_page_is_linked():
    pages = [README, *sorted(DOCS.glob("*.md")), *sorted((ROOT / "reports").glob("*.md"))]
    broken = [f"{p.relative_to(ROOT)} -> {t}" for p in pages for t in _links(p)
              if not (p.parent / t).exists()]
    assert broken == []
    linked = {(README.parent / t).resolve() for t in _links(README)}
    assert {p.resolve() for p in DOCS.glob("*.md")} <= linked
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200  # a front door


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](docs/nothing.md#x) [web](https://x.org) "
                    "```\n[code](skipped.md)\n```")
    assert _links(page) == ["page.md", "docs/nothing.md"]


def test_every_test_the_reliability_table_names_exists():
    """The table cannot name a test that was renamed or removed."""
    section = (DOCS / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = {m for path in README.parent.glob("tests/test_*.py")
               for m in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)}
    assert len(named) >= 20 and named <= defined, sorted(named - defined)


def _rendered_block(script):
    """A mutation script's saved results and the text between its table markers."""
    import json

    text = script.DOC.read_text(encoding="utf-8")
    return (json.loads(script.RESULTS.read_text(encoding="utf-8")),
            text[text.index(script.TABLE_START) + len(script.TABLE_START):
                 text.index(script.TABLE_END)])


def test_the_mutation_table_is_rendered_from_the_saved_results():
    import mutation_check

    saved, block = _rendered_block(mutation_check)
    assert block.strip() == mutation_check.render_table(saved).strip()
    assert [r["what"] for r in saved["results"]] == [m.what for m in mutation_check.MUTATIONS]
    assert sum(r["caught"] for r in saved["results"]) >= 0.9 * len(saved["results"])


def test_the_mutation_tool_table_is_rendered_from_the_saved_results():
    import mutation_tool

    saved, block = _rendered_block(mutation_tool)
    assert block.strip() == mutation_tool.render_table(saved).strip()
    # one row per core module; a measured row's counts add up and its score is killed over
    # the non-equivalent mutants
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(mutation_tool.core_modules())
    for name, r in saved["modules"].items():
        assert r["killed"] + r["survived"] + r["timeout"] + r["no_tests"] <= r["mutants"], name
        assert r["score"] == round(r["killed"] / (r["mutants"] - r["equivalent"]), 4), name
        assert r["survived"] == r["equivalent"] + len(r["untriaged_survivors"]), name
        # which tests judged it, and how many survivors its torchrun tests killed
        outside = (f" (+ torchrun tests: {r['killed_in_subprocesses']} killed)"
                   if r.get("killed_in_subprocesses") else "")
        assert f"| {r['suite']}{outside} | {r['date']}" in block, name
    # the flat names all map to today's modules
    assert {m.split(".")[1] for m in mutation_tool.core_modules()} >= {
        "metrics", "losses", "gradcache", "minimind", "expansion", "batching", "loop",
        "checkpoint", "records", "windows", "reranker", "memory", "m3", "mining"}


def test_the_mutation_tool_counts_what_mutmut_recorded(tmp_path):
    """The counts come from mutmut's own records: its exit-code table applied to a module's
    .meta file (a fabricated one here: 3 killed, 2 survived of which one is triaged as
    equivalent, 1 timeout, 1 without tests)."""
    import json

    import mutation_tool

    pytest.importorskip("mutmut")
    meta = tmp_path / "mutants" / "retrieval_lib" / "evaluation" / "metrics.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0, "f": 36, "g": 33}
    meta.write_text(json.dumps({"exit_code_by_key": codes}), encoding="utf-8")
    row = mutation_tool.count(tmp_path, ["evaluation.metrics"], {"e": "same result"})
    assert row["evaluation.metrics"] == {
        "mutants": 7, "killed": 3, "survived": 2, "timeout": 1, "no_tests": 1,
        "equivalent": 1, "score": round(3 / 6, 4), "untriaged_survivors": ["d"]}


def test_survivors_killed_by_subprocess_tests_count_as_killed(tmp_path):
    import json

    import mutation_tool

    pytest.importorskip("mutmut")
    meta = tmp_path / "mutants" / "retrieval_lib" / "evaluation" / "metrics.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0, "f": 36, "g": 33}
    meta.write_text(json.dumps({"exit_code_by_key": codes}), encoding="utf-8")
    # "d" killed under torchrun; "a" (already killed) and "x" (not this module's) change nothing
    row = mutation_tool.count(tmp_path, ["evaluation.metrics"], {"e": "same result"},
                              killed_in_subprocesses=["d", "a", "x"])
    assert row["evaluation.metrics"] == {
        "mutants": 7, "killed": 4, "survived": 1, "timeout": 1, "no_tests": 1,
        "equivalent": 1, "score": round(4 / 6, 4), "untriaged_survivors": [],
        "killed_in_subprocesses": 1}


def test_retriage_moves_newly_judged_survivors_to_the_equivalents():
    import mutation_tool

    row = {"mutants": 10, "killed": 6, "survived": 3, "timeout": 0, "no_tests": 1,
           "equivalent": 1, "score": round(6 / 9, 4), "untriaged_survivors": ["b", "c"]}
    assert mutation_tool.retriage(dict(row), {"b": "same", "z": "other module"}) == {
        **row, "equivalent": 2, "score": 0.75, "untriaged_survivors": ["c"]}
    assert mutation_tool.retriage(dict(row), {}) == row


def test_subprocess_tests_judge_survivors_with_the_mutant_active_in_every_process(tmp_path):
    """A fabricated scratch copy: the function returns 2 under its mutant 1 (as mutmut's
    trampoline does, from MUTANT_UNDER_TEST), and the test checks it in a child process started
    from another folder, which finds the mutated copy only through PYTHONPATH."""
    import mutation_tool

    folder = tmp_path / "mutants"
    (folder / "tests").mkdir(parents=True)
    (folder / "under_test.py").write_text(
        "import os\n\ndef value():\n"
        "    return 2 if os.environ.get('MUTANT_UNDER_TEST') == 'under_test.x_value__mutmut_1'"
        " else 1\n", encoding="utf-8")
    (folder / "tests" / "test_child.py").write_text(
        "import subprocess, sys\n\ndef test_child():\n"
        "    code = 'import under_test; assert under_test.value() == 1'\n"
        "    assert subprocess.run([sys.executable, '-c', code], cwd='/').returncode == 0\n"
        "\ndef test_broken():\n    assert False\n", encoding="utf-8")
    tests = {"under_test.x_value": ["tests/test_child.py::test_child"]}
    survivors = ["under_test.x_value__mutmut_1", "under_test.x_value__mutmut_2",
                 "other.x_f__mutmut_1"]
    assert mutation_tool.rejudge_in_subprocesses(tmp_path, survivors, tests) == [
        "under_test.x_value__mutmut_1"]
    with pytest.raises(RuntimeError, match="no mutant active"):
        mutation_tool.rejudge_in_subprocesses(
            tmp_path, survivors, {"under_test.x_value": ["tests/test_child.py::test_broken"]})
    assert mutation_tool.function_of("m.xǁCǁ__call____mutmut_12") == "m.xǁCǁ__call__"


def test_the_mutation_tool_config_is_toml_that_selects_the_suite():
    """The [tool.mutmut] block appended to the scratch pyproject: valid TOML, the modules as
    files, and the tests that judge them (the whole suite unless --tests names files)."""
    import mutation_tool
    import tomllib

    whole = tomllib.loads(mutation_tool._config(["evaluation.metrics"], []))["tool"]["mutmut"]
    assert whole["only_mutate"] == ["retrieval_lib/evaluation/metrics.py"]
    assert whole["pytest_add_cli_args_test_selection"] == ["tests"]
    assert whole["pytest_add_cli_args"] == mutation_tool.PYTEST_ARGS
    some = tomllib.loads(mutation_tool._config(["evaluation.search", "models.losses"],
                                               ["tests/test_losses.py"]))["tool"]["mutmut"]
    assert some["only_mutate"] == ["retrieval_lib/evaluation/search.py",
                                   "retrieval_lib/models/losses.py"]
    assert some["pytest_add_cli_args_test_selection"] == ["tests/test_losses.py"]


def test_every_mutation_still_applies_to_the_library_as_it_is():
    """A refactor that moves a mutated line makes the mutation check stop at that mutation
    (its text must occur exactly once), and the README table goes stale unnoticed: caught here,
    where CI runs, instead of at the next on-demand run."""
    import mutation_check

    found = {m.what: mutation_check.occurrences(m) for m in mutation_check.MUTATIONS}
    assert {what: n for what, n in found.items() if n != 1} == {}
