"""The library's tests judged by a real mutation-testing tool, mutmut (on demand, never in CI).

    make mutation                                               # every core module: a night
    .venv/bin/python tests/mutation_tool.py evaluation.metrics  # some modules, by name
    .venv/bin/python tests/mutation_tool.py evaluation.metrics --tests tests/test_evaluation.py
                                        # judged by these test files only: minutes, a lower
                                        # bound of what the whole suite kills (the row says so)
    .venv/bin/python tests/mutation_tool.py MODULE --keep /tmp/mm # leave the scratch copy
                                        # there: `cd /tmp/mm && mutmut show NAME` per survivor
    .venv/bin/python tests/mutation_tool.py --readme            # re-render the table only

Why mutmut (3.x) rather than cosmic-ray: it records, in one instrumented run of the test
suite, which tests call each function, and then runs only those tests against each mutant of
that function. That is the "each module's run maps to the tests that cover it" the project
needs on 2 cores, with no hand-kept mapping to go stale; cosmic-ray runs one fixed test command
per mutant. mutmut mutates operators, comparisons, constants, strings, arguments and
keywords inside functions (code at module level is not mutated), so its list is not ours.

The run happens in a scratch copy of the checkout (``mutants/`` and the config never touch the
working tree), with the modules of :func:`core_modules` as ``only_mutate`` and the tests outside the
notebook runs as the suite. Per module it records mutants, killed, survived, timeouts, "no
tests" (no selected test calls the function) and the survivors judged equivalent in
``tests/mutation_triage.json`` (``{"mutant name": "one-line reason"}``), in
``tests/mutation_tool_results.json`` with the commit and date; modules not re-run keep their
saved rows. The score is killed / (mutants - equivalent); docs/tests.md renders the table.
Survivors of the functions in :data:`SUBPROCESS_TESTS` (tested under torchrun, where mutmut
cannot see the calls) are judged again by those tests with the mutant active in every process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("mutation_tool_results.json")
TRIAGE = Path(__file__).with_name("mutation_triage.json")
DOC = ROOT / "docs" / "tests.md"
TABLE_START, TABLE_END = ("<!-- mutation tool table: start -->",
                          "<!-- mutation tool table: end -->")

#: The core modules as issue #38 names them (the flat layout's names) ...
ISSUE_MODULES = ("evaluation", "losses", "gradcache", "modeling", "minimind", "expansion",
                 "batching", "training", "checkpoint", "records", "data", "windows", "reranker",
                 "serving", "memory", "m3", "mining")


def core_modules() -> tuple[str, ...]:
    """... and the modules of today's layout that hold them (``retrieval_lib.MOVED``)."""
    sys.path.insert(0, str(ROOT))
    from retrieval_lib import MOVED

    return tuple(m for old in ISSUE_MODULES for m in MOVED[old])


#: The suite each mutant is judged by: everything but the notebook runs and the benchmarks'
#: smoke runs (minutes each, in subprocesses whose calls mutmut cannot attribute) and the tests
#: that read the library's source text (module sizes, the curated mutations), which the tool's
#: instrumented copy changes by construction.
PYTEST_ARGS = ["-p", "no:cacheprovider", "-q", "-x", "-m", "not notebook",
               "--ignore=tests/test_architecture.py", "--ignore=tests/test_readme.py",
               "--ignore=tests/test_benchmarks.py"]


def module_file(name: str) -> str:
    return f"retrieval_lib/{name.replace('.', '/')}.py"


#: What a row's ``suite`` says when the whole suite above judged it.
WHOLE_SUITE = "tests (no notebook runs, benchmark smokes or source-reading tests)"


def _config(modules: list[str], tests: list[str]) -> str:
    only = ", ".join(json.dumps(module_file(m)) for m in modules)
    return ("\n[tool.mutmut]\n"
            'source_paths = ["retrieval_lib"]\n'
            f"only_mutate = [{only}]\n"
            f"pytest_add_cli_args_test_selection = {json.dumps(tests or ['tests'])}\n"
            f"pytest_add_cli_args = {json.dumps(PYTEST_ARGS)}\n"
            'also_copy = ["demo_models", "demo_stage1", "benchmarks", "notebooks", "README.md",'
            ' "docs", "reports", "figures", "book", "Makefile"]\n'
            'process_isolation = "forkserver"\n')


#: Functions whose real tests run the library in other processes (torchrun workers): mutmut
#: maps a test to a function only when the test process itself calls it, so these survive
#: every in-process suite. :func:`rejudge_in_subprocesses` runs the tests named here against
#: each such survivor with the mutant active in every process. Keys are mutmut's names of the
#: functions (``module.x_function``, ``module.xǁClassǁmethod``).
SUBPROCESS_TESTS = {
    "retrieval_lib.models.losses.x_cross_device_info_nce": [
        "tests/test_distributed.py::test_two_process_step_equals_the_single_process_global_step",
    ],
    "retrieval_lib.models.gradcache.xǁGradCacheLossǁ__call__": [
        "tests/test_distributed.py::test_grad_cache_under_torchrun_chunks_on_every_process_when_"
        "one_must",
        *(f"tests/test_distributed.py::test_train_retriever_under_torchrun_keeps_the_processes_"
          f"in_step[{chunking}]" for chunking in ("grad-cache", "sub-batches")),
    ],
}


def function_of(mutant: str) -> str:
    """mutmut's name of the function a mutant belongs to."""
    return mutant.rsplit("__mutmut_", 1)[0]


def rejudge_in_subprocesses(scratch: Path, survivors: list[str],
                            tests: dict[str, list[str]] | None = None) -> list[str]:
    """The ``survivors`` (mutmut's names) that fail their function's tests of
    :data:`SUBPROCESS_TESTS` when run with the mutant active: the tests run in the scratch copy's
    ``mutants/`` folder with ``MUTANT_UNDER_TEST`` set, which every process they start inherits,
    and ``PYTHONPATH`` pointing those processes at the mutated copy of the library. The same
    tests must pass first with no mutant active, or nothing is judged."""
    tests = SUBPROCESS_TESTS if tests is None else tests
    chosen = [m for m in survivors if function_of(m) in tests]
    if not chosen:
        return []
    folder = scratch / "mutants"

    def fails(mutant: str, ids: list[str]) -> bool:
        env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(folder),
               "PY_IGNORE_IMPORTMISMATCH": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *ids], cwd=folder, env=env,
                              capture_output=True, text=True)
        return done.returncode != 0

    for ids in {tuple(tests[function_of(m)]) for m in chosen}:
        if fails("", list(ids)):
            raise RuntimeError(f"{' '.join(ids)} fail(s) with no mutant active in {folder}; "
                               f"nothing re-judged")
    return [m for m in chosen if fails(m, tests[function_of(m)])]


def count(scratch: Path, modules: list[str], triage: dict[str, str],
          killed_in_subprocesses: Sequence[str] = ()) -> dict[str, dict]:
    """Per module, the outcome of every mutant from mutmut's own records (its ``.meta`` files
    and its exit-code table), with the survivors named; ``killed_in_subprocesses``
    (:func:`rejudge_in_subprocesses`) count as killed, and the row says how many."""
    from mutmut.stats import status_by_exit_code

    rows = {}
    for name in modules:
        meta = scratch / "mutants" / f"{module_file(name)}.meta"
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"] \
            if meta.exists() else {}
        status = {key: status_by_exit_code[code] for key, code in codes.items()}
        outside = [k for k in killed_in_subprocesses if status.get(k) == "survived"]
        status.update({k: "killed" for k in outside})
        survived = sorted(k for k, s in status.items() if s == "survived")
        equivalent = sorted(k for k in survived if k in triage)
        killed = sum(s == "killed" for s in status.values())
        judged = len(status) - len(equivalent)
        rows[name] = {"mutants": len(status), "killed": killed, "survived": len(survived),
                      "timeout": sum(s == "timeout" for s in status.values()),
                      "no_tests": sum(s == "no tests" for s in status.values()),
                      "equivalent": len(equivalent),
                      "score": round(killed / judged, 4) if judged else None,
                      "untriaged_survivors": [k for k in survived if k not in triage]}
        if outside:
            rows[name]["killed_in_subprocesses"] = len(outside)
    return rows


def run(modules: list[str], tests: list[str] | None = None,
        keep: Path | None = None) -> dict[str, dict]:
    """mutmut over ``modules`` in a scratch copy of the checkout, judged by ``tests`` (test
    files; default: the whole suite of :data:`PYTEST_ARGS`); the counts per module. ``keep``:
    make the scratch copy there and leave it, to read a survivor with ``mutmut show NAME``
    (run inside it) while triaging."""
    triage = json.loads(TRIAGE.read_text(encoding="utf-8")) if TRIAGE.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(keep) if keep else Path(tmp) / "checkout"
        if scratch.exists():
            raise SystemExit(f"{scratch}: already exists; --keep wants a new folder")
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(
            ".git", ".venv", "mutants", "runs", "outputs", "data_cache", "build", "__pycache__"))
        with (scratch / "pyproject.toml").open("a", encoding="utf-8") as f:
            f.write(_config(modules, tests or []))
        mutmut = Path(sys.executable).with_name("mutmut")
        subprocess.run([str(mutmut), "run"], cwd=scratch, check=True)
        survivors = [m for row in count(scratch, modules, {}).values()
                     for m in row["untriaged_survivors"]]
        return count(scratch, modules, triage, rejudge_in_subprocesses(scratch, survivors))


def retriage(row: dict, triage: dict[str, str]) -> dict:
    """``row`` (a saved module row) with its untriaged survivors that ``triage`` now names
    counted as equivalent, and its score recomputed; what mutmut measured is unchanged."""
    judged = [m for m in row["untriaged_survivors"] if m in triage]
    row["untriaged_survivors"] = [m for m in row["untriaged_survivors"] if m not in triage]
    row["equivalent"] += len(judged)
    rest = row["mutants"] - row["equivalent"]
    row["score"] = round(row["killed"] / rest, 4) if rest else None
    return row


def render_table(saved: dict) -> str:
    lines = [f"mutmut {saved['mutmut']}, measured per module (date and commit in each row) "
             f"by `tests/mutation_tool.py`; score = killed / (mutants − equivalent). Survivors "
             f"are listed in `tests/mutation_tool_results.json`, equivalents with their reason "
             f"in `tests/mutation_triage.json`.", "",
             "| module | mutants | killed | survived | timeout | no tests | equivalent | score "
             "| judged by | measured |", "| --- " * 10 + "|"]
    for name in core_modules():
        r = saved["modules"].get(name)
        if r is None:
            lines.append(f"| `{name}` | not run yet |  |  |  |  |  |  |  |  |")
            continue
        score = f"{r['score']:.0%}" if r["score"] is not None else "—"
        outside = (f" (+ torchrun tests: {r['killed_in_subprocesses']} killed)"
                   if r.get("killed_in_subprocesses") else "")
        lines.append(f"| `{name}` | {r['mutants']} | {r['killed']} | {r['survived']} | "
                     f"{r['timeout']} | {r['no_tests']} | {r['equivalent']} | {score} | "
                     f"{r['suite']}{outside} | {r['date']}, `{r['commit'][:10]}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="core modules (default: all), e.g. "
                        "evaluation.metrics")
    parser.add_argument("--tests", nargs="+", metavar="FILE",
                        help="judge the mutants by these test files only (recorded per row)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="leave the scratch copy in DIR (new) to read survivors there with "
                        "`mutmut show NAME`")
    parser.add_argument("--readme", action="store_true", help="only re-render the table")
    parser.add_argument("--retriage", action="store_true",
                        help="count the saved rows' survivors that the triage file now judges "
                        "equivalent as such (no run), then re-render the table")
    args = parser.parse_args(argv)
    from retrieval_lib.results.runs import git_commit
    from retrieval_lib.results.tables import write_between_markers

    core = core_modules()
    unknown = sorted(set(args.modules) - set(core))
    if unknown:
        parser.error(f"not a core module: {', '.join(unknown)}")
    saved = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {
        "mutmut": None, "modules": {}}
    if args.retriage:
        triage = json.loads(TRIAGE.read_text(encoding="utf-8"))
        for row in saved["modules"].values():
            retriage(row, triage)
        RESULTS.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    elif not args.readme:
        from importlib.metadata import version

        modules = args.modules or list(core)
        start = time.perf_counter()
        missing = [t for t in args.tests or [] if not (ROOT / t).is_file()]
        if missing:
            parser.error(f"no such test file: {', '.join(missing)}")
        commit = git_commit()  # of the tree the scratch copy is made from, before any edit
        rows = run(modules, args.tests, args.keep)
        stamp = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
                 "seconds": round(time.perf_counter() - start),
                 "suite": " ".join(args.tests) if args.tests else WHOLE_SUITE}
        saved["mutmut"] = version("mutmut")
        saved["modules"].update({name: {**row, **stamp} for name, row in rows.items()})
        RESULTS.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    write_between_markers(DOC, TABLE_START, TABLE_END, render_table(saved))
    print(render_table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
