"""Notebook checks: structure of every committed notebook, and the demo run of each."""

import json
from pathlib import Path

import pytest

from retrieval_lib import notebook_utils, results

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = notebook_utils.notebook_paths(NOTEBOOKS)


def test_notebooks_come_in_course_order():
    assert [p.stem for p in ALL][:4] == ["01_data_preprocessing", "02_loss_and_gradients",
                                         "03_train_minimind27", "03_train_minimind108"]


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "preset = " in "".join(tagged[0]["source"])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        "commit notebooks without outputs"
    assert "google.colab" in "".join(code[0]["source"]), "first code cell installs in Colab"
    assert "colab.research.google.com" in "".join(nb["cells"][0]["source"])


# --- demo runs: every notebook executed with papermill, then its summary checked ----------------


def check_01(summary, home):
    assert summary["pairs"] >= 2000
    assert sum(summary["splits"].values()) == summary["pairs"]
    assert summary["splits"]["test"] == 300 and summary["splits"]["validation"] == 200
    assert summary["subset_sizes"] == {"10k": 600, "96k": 1200, "288k": 1800}
    load = summary["load"]["people_daily_1998"]
    assert load["read"] == load["kept"] + sum(load["dropped"].values())
    assert summary["demo_parse"]["articles"] == load["read"]
    assert 100 < summary["median_passage_tokens"]["people_daily_1998"] < 2000
    return ["lengths_chars", "lengths_tokens", "split_counts"]


def check_02(summary, home):
    assert summary["max_abs_gradient_error"] < 1e-10 and summary["chain_rule_error"] < 1e-10
    probs = summary["positive_probability_by_tau"]
    assert probs["1.0"] < probs["0.1"] < probs["0.05"] < probs["0.01"]
    share = summary["hard_negative_gradient_share"]
    assert share["0.05"] > 0.9 > share["1.0"] > summary["hard_negative_fraction"]
    first, last = summary["optimisation"]["first"], summary["optimisation"]["last"]
    assert last["loss"] < first["loss"] / 10
    assert last["mean_positive_similarity"] > first["mean_positive_similarity"] + 0.2
    assert last["mean_negative_similarity"] < first["mean_negative_similarity"]
    return ["negative_gradients", "optimisation", "temperature_softmax"]


def _learned(run):
    """The demo must show learning: trained clearly above untrained on the shared test set,
    i.e. better on average and significantly so in a paired test over the test queries."""
    before, after, tests = run["untrained"], run["trained"], run["trained_vs_untrained"]
    assert after["ndcg@10"] > before["ndcg@10"] and after["recall@100"] > before["recall@100"]
    assert tests["recall@100"]["p_value"] < 0.01 and tests["recall@100"]["ci_low"] > 0, tests
    assert tests["ndcg@10"]["mean_difference"] > 0, tests


def _run_folder_complete(run_dir):
    names = {p.name for p in Path(run_dir).iterdir()}
    assert {"config.json", "history.json", "metrics.json", "env.json", "best"} <= names


def check_03_train_minimind27(summary, home):
    assert summary["experiment"] == "minimind27_10k"
    base = summary["base_model"]
    assert base["heldout_perplexity_after"] < base["heldout_perplexity_before"] / 5
    _learned(summary)
    _run_folder_complete(summary["run_dir"])
    assert Path(summary["run_dir"]).parent == home / "runs" / "demo"
    return ["test_metrics", "training_curves"]


def check_03_train_minimind108(summary, home):
    assert list(summary["runs"]) == ["10k", "96k", "288k"]
    assert summary["subset_sizes"] == {"10k": 600, "96k": 1200, "288k": 1800}
    for run in summary["runs"].values():
        _learned(run)
        _run_folder_complete(run["run_dir"])
    largest, smallest = summary["runs"]["288k"], summary["runs"]["10k"]
    assert largest["trained"]["recall@100"] >= smallest["trained"]["recall@100"] - 0.05
    return ["metrics_vs_data_size", "training_curves"]


CHECKS = {"01_data_preprocessing": check_01, "02_loss_and_gradients": check_02,
          "03_train_minimind27": check_03_train_minimind27,
          "03_train_minimind108": check_03_train_minimind108}


def test_every_notebook_has_a_demo_check():
    assert sorted(p.stem for p in ALL) == sorted(CHECKS)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One project home for all demo runs, so the prepared data and demo LMs are shared."""
    return tmp_path_factory.mktemp("home")


@pytest.mark.notebook
@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_runs_with_demo_preset(path, home, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(home))
    notebook_utils.run_notebook(path, home / "executed", {"preset": "demo"})
    summary = results.load_summary(home / "outputs" / path.stem / "demo")
    assert summary["preset"] == "demo" and summary["env"]["preset"] == "demo"
    figures = CHECKS[path.stem](summary, home)
    written = sorted(p.name for p in (home / "figures").glob(f"{path.stem}_*.png"))
    assert written == [f"{path.stem}_{name}.png" for name in figures]
