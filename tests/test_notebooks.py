"""Notebook checks: structure of every committed notebook, and the demo run of each."""

import json
from pathlib import Path

import pytest

from retrieval_lib import notebook_utils, results

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = notebook_utils.notebook_paths(NOTEBOOKS)


def test_there_are_notebooks():
    assert [p.name for p in ALL][:2] == ["01_data_preprocessing.ipynb",
                                         "02_loss_and_gradients.ipynb"]


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


@pytest.mark.notebook
def test_01_data_preprocessing_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    notebook_utils.run_notebook(NOTEBOOKS / "01_data_preprocessing.ipynb", tmp_path / "executed",
                                {"preset": "demo"})
    summary = results.load_summary(tmp_path / "outputs" / "01_data_preprocessing" / "demo")
    assert summary["preset"] == "demo" and summary["env"]["preset"] == "demo"
    assert summary["pairs"] >= 2000
    assert sum(summary["splits"].values()) == summary["pairs"]
    assert summary["splits"]["test"] == 300 and summary["splits"]["validation"] == 200
    assert summary["subset_sizes"] == {"10k": 500, "96k": 1000, "288k": 1500}
    load = summary["load"]["people_daily_1998"]
    assert load["read"] == load["kept"] + sum(load["dropped"].values())
    assert summary["demo_parse"]["articles"] == load["read"]
    assert 100 < summary["median_passage_tokens"]["people_daily_1998"] < 2000
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["01_data_preprocessing_lengths_chars.png",
                       "01_data_preprocessing_lengths_tokens.png",
                       "01_data_preprocessing_split_counts.png"]


@pytest.mark.notebook
def test_02_loss_and_gradients_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(tmp_path))
    notebook_utils.run_notebook(NOTEBOOKS / "02_loss_and_gradients.ipynb", tmp_path / "executed",
                                {"preset": "demo"})
    summary = results.load_summary(tmp_path / "outputs" / "02_loss_and_gradients" / "demo")
    assert summary["max_abs_gradient_error"] < 1e-10 and summary["chain_rule_error"] < 1e-10
    probs = summary["positive_probability_by_tau"]
    assert probs["1.0"] < probs["0.1"] < probs["0.05"] < probs["0.01"]
    share = summary["hard_negative_gradient_share"]
    assert share["0.05"] > 0.9 > share["1.0"] > summary["hard_negative_fraction"]
    first, last = summary["optimisation"]["first"], summary["optimisation"]["last"]
    assert last["loss"] < first["loss"] / 10
    assert last["mean_positive_similarity"] > first["mean_positive_similarity"] + 0.2
    assert last["mean_negative_similarity"] < first["mean_negative_similarity"]
    assert len(list((tmp_path / "figures").glob("02_loss_and_gradients_*.png"))) == 3
