"""The run registry and the report table, on runs written by hand."""

import json
from pathlib import Path

import pytest

from retrieval_lib import evaluation, results
from retrieval_lib.evaluation import HEADLINE_METRICS
from retrieval_lib.results import (
    collect_runs,
    environment_info,
    metrics_block,
    record_not_run,
    runs_root,
    save_baseline_run,
)

METRICS = HEADLINE_METRICS


def _scores(values):
    per_query = {m: {f"q{i}": v for i, v in enumerate(values)} for m in METRICS}
    return {"per_query": per_query,
            "aggregate": {m: evaluation.aggregate(values) for m in METRICS}}


def _experiment(root, name, test, untrained, base=None, params=1_000_000, records=600):
    out = runs_root("demo", root) / name
    out.mkdir(parents=True)
    config = {"name": name, "title": name,
              "model": {"name": "MiniMind", "num_new_layers": 4 if base else 0},
              "parameters": params, "train_records": records, "base_experiment": base}
    metrics = {"experiment": name, "test": metrics_block(_scores(test)),
               "untrained": metrics_block(_scores(untrained))}
    history = {"epochs": [{"epoch": 1, "val_ndcg@10": 0.1, "val_recall@10": 0.2}], "steps": []}
    for filename, payload in (("config.json", config), ("metrics.json", metrics),
                              ("history.json", history), ("env.json", {"wall_time_s": 1.0})):
        (out / filename).write_text(json.dumps(payload))


@pytest.fixture
def registry(tmp_path):
    save_baseline_run("bm25", _scores([1, 0, 0, 1]), "demo", {"title": "BM25"},
                              root=tmp_path)
    record_not_run("bge_m3", "demo", "no weights here", "pass -p bge_m3_path",
                           root=tmp_path)
    _experiment(tmp_path, "minimind27_10k", [1, 1, 0, 0], [0, 0, 0, 0.5])
    _experiment(tmp_path, "minimind38_96k", [1, 1, 1, 0], [0, 0, 0, 0.5],
                base="minimind27_10k", records=1200)
    # another preset's run must never appear in the demo table
    save_baseline_run("bm25", _scores([0, 0, 0, 0]), "full", {}, root=tmp_path)
    return tmp_path


def test_missing_bge_m3_falls_back_to_bm25_as_the_reference(registry):
    runs = collect_runs("demo", registry)
    # the report's order: experiments as in the course, then the baselines
    assert list(runs) == ["minimind27_10k", "minimind38_96k", "bge_m3", "bm25"]
    assert runs["bge_m3"]["status"] == "not run" and "test" not in runs["bge_m3"]
    assert results.reference_system(runs) == "bm25"
    table = results.report_table(runs)
    assert table.attrs["reference"] == "bm25"
    row = table.loc["minimind38_96k"]
    # by hand: means 0.75 (38M), 0.5 (27M), 0.5 (BM25), 0.125 (untrained)
    assert row["ndcg@5"] == pytest.approx(0.75)
    assert row["ndcg@5_pct_of_reference"] == pytest.approx(1.5)
    assert row["base"] == "minimind27_10k"
    assert row["ndcg@5_gain_over_base"] == pytest.approx(0.25)
    assert row["ndcg@5_gain_over_untrained"] == pytest.approx(0.625)
    assert table.loc["minimind27_10k", "ndcg@5_pct_of_reference"] == pytest.approx(1.0)
    # sample std (ddof=1) of [1, 1, 1, 0]: sqrt(0.25 * 4 / 3)
    assert row["ndcg@5_std"] == pytest.approx((0.75 * 0.25 * 4 / 3) ** 0.5)
    # the 27M run differs from BM25 query by query ([1,1,0,0] vs [1,0,0,1]) with mean 0:
    assert table.loc["minimind27_10k", "ndcg@5_vs_reference"] == pytest.approx(0.0)
    assert table.loc["minimind27_10k", "p_value_vs_reference"] == pytest.approx(1.0)
    assert table.loc["bge_m3", "status"] == "not run"
    markdown = results.markdown_table(table)
    assert "| bge_m3 |  |  | not run |" in markdown
    assert "150%" in markdown and "+0.250 (minimind27_10k)" in markdown
    assert len(markdown.strip().splitlines()) == 2 + 4


def test_bge_m3_becomes_the_reference_once_it_ran(registry):
    save_baseline_run("bge_m3", _scores([1, 1, 1, 1]), "demo", {"title": "BGE-M3",
                                                                          "parameters": 568e6},
                              root=registry)
    runs = collect_runs("demo", registry)
    assert runs["bge_m3"]["status"] == "done"
    assert not (runs_root("demo", registry) / "bge_m3" / "not_run.json").exists()
    table = results.report_table(runs)
    assert table.attrs["reference"] == "bge_m3"
    assert table.loc["minimind38_96k", "ndcg@5_pct_of_reference"] == pytest.approx(0.75)
    assert table.loc["bm25", "ndcg@5_pct_of_reference"] == pytest.approx(0.5)
    assert "p_value_vs_reference" not in table.loc["bge_m3"].dropna()


def test_collect_runs_of_an_empty_preset_is_empty(tmp_path):
    assert collect_runs("demo", tmp_path) == {}
    assert results.reference_system({}) is None
    with pytest.raises(ValueError, match="no saved runs"):
        results.report_table({})


def test_markdown_report_says_what_made_it(registry):
    table = results.report_table(collect_runs("demo", registry))
    path = results.write_markdown_report(table, "demo", root=registry)
    assert path == registry / "reports" / "results_demo.md"
    text = path.read_text(encoding="utf-8")
    assert "runs/demo/" in text and "not how the real models compare" in text
    assert "\n\n" + results.markdown_table(table) + "\n" in text  # blank lines around a table
    assert text.endswith("- `bge_m3` not run: no weights here. To run it: pass -p "
                         "bge_m3_path.\n")


def test_figure_inputs_come_from_the_registry(registry):
    _experiment(registry, "minimind27_96k", [1, 1, 1, 1], [0, 0, 0, 0], records=1200)
    runs = collect_runs("demo", registry)
    summaries = results.system_summaries(runs, ["ndcg@5"])
    assert set(summaries) == {"bm25", "minimind27_10k", "minimind38_96k", "minimind27_96k"}
    assert summaries["minimind38_96k"]["ndcg@5"]["mean"] == pytest.approx(0.75)
    points = results.efficiency_points(runs)
    assert set(points) == {"minimind27_10k", "minimind38_96k", "minimind27_96k"}  # BM25: none
    assert points["minimind27_10k"]["parameters"] == 1_000_000
    # one unexpanded model on 600 and 1200 records: a data-scaling group (not the expansion)
    assert results.data_scaling_groups(runs) == {"MiniMind": {
        "minimind27_10k": 600, "minimind27_96k": 1200}}


def test_environment_names_the_commit_command_and_versions(monkeypatch, tmp_path):
    """The commit is the library checkout's, also when RETRIEVAL_HOME keeps the runs elsewhere
    (the demo run of the notebooks recorded None there)."""
    import subprocess

    from retrieval_lib.results import runs

    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    info = environment_info("demo", 42)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(runs.__file__).parents[1],
                          capture_output=True, text=True).stdout.strip()
    if head:  # a checkout (CI may test an export without .git)
        assert info["git_commit"].split("+")[0] == head
    else:
        assert info["git_commit"] is None
    assert info["torch_threads"] >= 1 and info["packages"]["torch"]
    assert (info["preset"], info["seed"]) == ("demo", 42) and info["command"]
    monkeypatch.setattr("retrieval_lib.results.runs.CHECKOUT", Path("/"))  # not a checkout
    assert environment_info()["git_commit"] is None


def test_write_between_markers_replaces_only_the_marked_block(tmp_path):
    from retrieval_lib.results import write_between_markers

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- t: start -->\nold\n<!-- t: end -->\noutro\n", encoding="utf-8")
    write_between_markers(doc, "<!-- t: start -->", "<!-- t: end -->", "| a |\n| 1 |")
    assert doc.read_text(encoding="utf-8") == ("intro\n<!-- t: start -->\n| a |\n| 1 |\n"
                                               "<!-- t: end -->\noutro\n")
    with pytest.raises(ValueError, match="markers"):
        write_between_markers(doc, "<!-- u: start -->", "<!-- t: end -->", "x")


def test_markdown_report_says_how_to_run_what_was_not_run(registry):
    from retrieval_lib.results import record_not_run

    record_not_run("bge_m3", "demo", "the model is not reachable",
                   "pass `-p bge_m3_path DIR`", root=registry)
    table = results.report_table(collect_runs("demo", registry))
    text = results.write_markdown_report(table, "demo", root=registry).read_text(
        encoding="utf-8")
    assert "| bge_m3 |  |  | not run |" in text
    assert text.endswith("\n\nNot in the table's numbers:\n\n- `bge_m3` not run: the model is "
                         "not reachable. To run it: pass `-p bge_m3_path DIR`.\n")
