"""The README's code examples run as written (on a toy model and toy data in their places)."""

import re
from dataclasses import replace
from pathlib import Path

from toy import toy_model, toy_records

from retrieval_lib import data
from retrieval_lib.records import LoadReport

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_search_example_runs_as_written(tok, tmp_path, monkeypatch, capsys):
    """`make demo` leaves the prepared data and the 108M@288K run; here a toy retriever stands in
    the run folder and toy splits come from the data cache, and the snippet runs unchanged."""
    from retrieval_lib import config
    from retrieval_lib.runs import run_dir

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    dcfg = config.get_data_config("demo")
    records = toy_records(60, 3)
    small = replace(dcfg, val_size=10, test_size=20, subset_sizes={"10k": 30})
    splits = data.prepare_splits(records, small, {"toy": LoadReport(read=60, kept=60)})
    monkeypatch.setattr(data, "prepare_data", lambda cfg: splits)
    toy_model(tok).save(run_dir("demo", "minimind108_288k") / "best")
    exec(compile(_python_block_after("## Searching a large corpus"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert f"{splits.test['query'][0]} -> [" in out
    recall = float(out.split("HNSW recall@10 against exact search:")[1])
    assert 0.9 <= recall <= 1.0  # 20 queries over a small corpus: HNSW is as good as exact
    assert (tmp_path / "my_index" / "index.faiss").exists()


def test_every_test_the_reliability_table_names_exists():
    """The table cannot name a test that was renamed or removed."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## What survives faults"):text.index("## Performance")]
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = {m for path in README.parent.glob("tests/test_*.py")
               for m in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)}
    assert len(named) >= 20 and named <= defined, sorted(named - defined)


def test_the_mutation_table_is_rendered_from_the_saved_results():
    import json

    import mutation_check

    saved = json.loads(mutation_check.RESULTS.read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    block = text[text.index(mutation_check.TABLE_START) + len(mutation_check.TABLE_START):
                 text.index(mutation_check.TABLE_END)]
    assert block.strip() == mutation_check.render_table(saved).strip()
    assert [r["what"] for r in saved["results"]] == [m.what for m in mutation_check.MUTATIONS]
    assert sum(r["caught"] for r in saved["results"]) >= 0.9 * len(saved["results"])


def test_every_mutation_still_applies_to_the_library_as_it_is():
    """A refactor that moves a mutated line makes the mutation check stop at that mutation
    (its text must occur exactly once), and the README table goes stale unnoticed: caught here,
    where CI runs, instead of at the next on-demand run."""
    import mutation_check

    found = {m.what: mutation_check.occurrences(m) for m in mutation_check.MUTATIONS}
    assert {what: n for what, n in found.items() if n != 1} == {}
