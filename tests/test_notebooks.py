"""Notebook checks: structure of every committed notebook, and the demo run of each."""

import json
from pathlib import Path

import pytest

from retrieval_lib import course
from retrieval_lib.course import notebooks
from retrieval_lib.models import SHIPPED_DEMO_LMS, PretrainConfig
from retrieval_lib.results import runs
from retrieval_lib.settings import provenance

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = notebooks.notebook_paths(NOTEBOOKS)


def test_notebooks_come_in_course_order():
    assert [p.stem for p in ALL] == ["01_data_preprocessing", "02_loss_and_gradients",
                                     "03_stage1_pretraining", "03_train_minimind27",
                                     "03_train_minimind38", "03_train_minimind108",
                                     "03_train_minimind186", "03_train_qwen2_613",
                                     "03_beyond_the_report", "04_bge_m3_baseline",
                                     "05_results_and_plots"]


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
    # demo window: 128 tokens, the demo BPE adds no special tokens; more than half the
    # passages are longer exactly when the median passage is
    assert summary["window_tokens"] == 128
    longer = summary["longer_than_window"]["people_daily_1998"]
    assert (longer > 0.5) == (summary["median_passage_tokens"]["people_daily_1998"] > 128)
    # the saved percentiles (benchmarks/batching.py --summary reads them): 0, 5, ..., 100
    percentiles = summary["passage_token_percentiles"]["people_daily_1998"]
    assert len(percentiles) == 21 and percentiles == sorted(percentiles)
    assert percentiles[10] == pytest.approx(summary["median_passage_tokens"]["people_daily_1998"],
                                            abs=0.05)
    # bucket edges of the truncated lengths: within the 128-token window
    edges = summary["length_bucket_edges"]
    assert edges == sorted(set(edges)) and 0 < len(edges) <= 3 and edges[-1] <= 128
    return ["lengths_chars", "lengths_tokens", "split_counts"]


def check_02(summary, home):
    assert summary["max_abs_gradient_error"] < 1e-10 and summary["chain_rule_error"] < 1e-10
    assert summary["passage_gradient_error"] < 1e-10
    assert summary["normalisation_gradient_error"] < 1e-10
    probs = summary["positive_probability_by_tau"]
    assert probs["1.0"] < probs["0.1"] < probs["0.05"] < probs["0.01"]
    share = summary["hard_negative_gradient_share"]
    assert share["0.05"] > 0.9 > share["1.0"] > summary["hard_negative_fraction"]
    first, last = summary["optimisation"]["first"], summary["optimisation"]["last"]
    assert last["loss"] < first["loss"] / 10
    assert last["mean_positive_similarity"] > first["mean_positive_similarity"] + 0.2
    assert last["mean_negative_similarity"] < first["mean_negative_similarity"]
    return ["negative_gradients", "optimisation", "temperature_softmax"]


def _learned(run, gain: bool = False):
    """Fine-tuning never makes the model it starts from significantly worse on the shared test
    set (a paired test over the test queries, NDCG@10 and Recall@100). With ``gain`` it must
    also make it significantly better on NDCG@10. In the demo the model it starts from is the
    stage-1 encoder (``config.DEMO_PRETRAINING_STAGES``), already a retriever: its Recall@100
    leaves little room, and a significant gain is required where the demo shows one on every
    machine (the 10K runs: 27M +0.035, p 0.002; 108M +0.024, p 0.002), not on the larger
    subsets, where the 108M twin's gain is not significant."""
    tests = run["trained_vs_untrained"]
    for metric in ("ndcg@10", "recall@100"):
        t = tests[metric]
        assert not (t["p_value"] < 0.01 and t["mean_difference"] < 0), (metric, tests)
    if gain:
        t = tests["ndcg@10"]
        assert t["p_value"] < 0.01 and t["ci_low"] > 0, tests


def _run_folder_complete(run_dir):
    names = {p.name for p in Path(run_dir).iterdir()}
    assert {"config.json", "history.json", "metrics.json", "env.json", "best"} <= names


def check_03_stage1_pretraining(summary, home):
    # only training text: the validation and test articles and every query were left out,
    # and what was left out is counted. The demo splits by article (a headline is its query), so
    # no training article is also a validation or test one: a count above 0 is a split leak
    texts = summary["texts"]
    assert texts["kept"] == texts["train"] + texts["heldout"] and texts["held_out_articles"] == 0
    assert texts["passages"] == texts["kept"] + texts["held_out_articles"] + texts["queries"] \
        + texts["repeats"], texts
    # both stages copied from demo_stage1/ (their inputs are today's), 1b fed by 1a's encoder
    first, second = summary["stage_runs"]
    assert (first["stage"], second["stage"]) == ("retromae", "contrastive")
    assert all(s["shipped_from"].startswith("demo_stage1/") for s in summary["stage_runs"])
    assert second["source"] == str(Path(first["folder"]) / "encoder")
    pairs = second["pairs"]
    assert pairs["crop"]["pairs"] > 0 and pairs["ict"]["pairs"] > 0
    assert pairs["title"] == {"pairs": 0, "no_title": texts["train"]}  # no titles in the demo
    recipes = summary["recipes"]
    assert list(recipes) == ["lm", "retromae", "retromae_contrastive", "contrastive"]
    assert [r["stages"] for r in recipes.values()] == [
        [], ["retromae"], ["retromae", "contrastive"], ["contrastive"]]
    # the default recipe is the course's own run of the experiment, the others variants
    assert Path(recipes["retromae_contrastive"]["run_dir"]).name == "minimind27_10k"
    assert Path(recipes["lm"]["run_dir"]).name == "minimind27_10k-lm"
    # what the saved ablation measured (benchmarks/stage1_ablation.py, same code and inputs):
    # the course's runs reproduce its 27M numbers
    saved = json.loads((Path(__file__).resolve().parents[1] / "benchmarks"
                        / "stage1_ablation.json").read_text(encoding="utf-8"))
    for key, row in saved["models"]["minimind27_10k"]["recipes"].items():
        assert recipes[key]["test_ndcg@5"] == pytest.approx(row["test_ndcg@5"], abs=0.02), key
    return ["recipe_metrics", "stage_curves"]


def check_03_train_minimind27(summary, home):
    assert summary["experiment"] == "minimind27_10k"
    base = summary["base_model"]
    assert base["heldout_perplexity_after"] < base["heldout_perplexity_before"] / 5
    # the demo LM is the one shipped in demo_models/ (its inputs are today's): when this fails,
    # the corpus, tokenizer or pretraining changed; rebuild with demo_models/build.py
    manifest = json.loads((SHIPPED_DEMO_LMS / "MANIFEST.json").read_text(encoding="utf-8"))
    steps = {m["pretrain"]["max_steps"] for m in manifest["models"]}
    assert base["shipped"] and steps == {base["pretrain_steps"]} == {PretrainConfig().max_steps}
    _learned(summary, gain=True)
    _run_folder_complete(summary["run_dir"])
    assert Path(summary["run_dir"]).parent == home / "runs" / "demo"
    return ["test_metrics", "training_curves"]


def check_03_train_minimind108(summary, home):
    assert list(summary["runs"]) == ["10k", "96k", "288k"]
    assert summary["subset_sizes"] == {"10k": 600, "96k": 1200, "288k": 1800}
    for subset, run in summary["runs"].items():
        _learned(run, gain=subset == "10k")
        _run_folder_complete(run["run_dir"])
    largest, smallest = summary["runs"]["288k"], summary["runs"]["10k"]
    assert largest["trained"]["recall@100"] >= smallest["trained"]["recall@100"] - 0.05
    return ["metrics_vs_data_size", "training_curves"]


#: The report's expansions: parameters after expansion (full shapes), within 5%.
REPORT_EXPANDED_PARAMETERS = {"minimind38_96k": 38e6, "minimind186_288k": 186e6,
                              "qwen2_613_288k": 613e6}


def _check_expansion(summary, home, experiment, base_experiment):
    assert (summary["experiment"], summary["base_experiment"]) == (experiment, base_experiment)
    params = summary["parameters"]
    full = params["full"]
    assert abs(full["after"] / REPORT_EXPANDED_PARAMETERS[experiment] - 1) < 0.05, full
    demo = params["demo"]
    # the count from the config equals the count of the model that was actually trained
    assert (demo["before"], demo["after"]) == (params["measured_before"], params["measured_after"])
    assert demo["layers_after"] - demo["layers_before"] == len(summary["new_layers"]) == 2
    assert summary["inits"] == ["random", "identity"]
    base = summary["runs"]["base"]
    assert Path(base["run_dir"]).parent == home / "runs" / "demo"
    assert Path(base["run_dir"]).name == base_experiment
    for init in summary["inits"]:
        run = summary["runs"][init]
        _learned(run)
        _run_folder_complete(run["run_dir"])
        # the whole schedule ran: no new layer, then one, then both
        assert [len(x) for x in run["trainable_new_layers"]] == [0, 1, 2]
        assert run["trainable_new_layers"][-1] == summary["new_layers"]
    assert Path(summary["runs"]["identity"]["run_dir"]).name == f"{experiment}-identity"
    # identity initialisation computes the base model's function: untrained results coincide
    gaps = summary["untrained_max_difference"]
    assert set(gaps) == {"random", "identity"} and gaps["identity"] < 0.02
    tests = summary["paired_tests"]
    assert {f"扩容（{i}）− 对照 · ndcg@10" for i in summary["inits"]} <= set(tests)
    assert "identity − random · recall@100" in tests
    return ["test_metrics", "training_curves", "unfreeze_schedule"]


def check_03_train_minimind38(summary, home):
    return _check_expansion(summary, home, "minimind38_96k", "minimind27_10k")


def check_03_train_minimind186(summary, home):
    return _check_expansion(summary, home, "minimind186_288k", "minimind108_288k")


def check_03_train_qwen2_613(summary, home):
    figures = _check_expansion(summary, home, "qwen2_613_288k", "qwen2_494_288k")
    plan = summary["memory_plan"]
    rows = {(r["batch_size"], r["gradient_checkpointing"]): r for r in plan["rows"]}
    # static memory: 16 bytes per parameter (fp32 weights, grads, AdamW) + 2 (bf16 copy)
    after = summary["parameters"]["full"]["after"]
    assert rows[1, False]["static_gib"] == pytest.approx(18 * after / 1024**3)
    assert rows[8, True]["total_gib"] < rows[8, False]["total_gib"]
    # 613M parameters do not train in fp32 AdamW with a batch of 8 on a 12 GB card
    assert plan["max_batch"]["RTX 3060"]["plain"] < 8
    return sorted(figures + ["memory_plan"])


def check_04(summary, home):
    bge = summary["bge_m3"]
    # offline: BGE-M3 is recorded as not run, with how to run it, and no number anywhere
    assert bge["status"] == "not run" and "BAAI/bge-m3" in bge["reason"]
    assert "bge_m3_path" in bge["how_to_run"] and bge["modes"] == {}
    folder = home / "runs" / "demo" / "bge_m3"
    assert (folder / "not_run.json").exists() and not (folder / "metrics.json").exists()
    # BM25 is scored on the very corpus and queries the trained models were tested on
    trained = json.loads((home / "runs" / "demo" / "minimind27_10k" / "metrics.json").read_text())
    assert summary["corpus_size"] == trained["test"]["corpus_size"]
    assert summary["test_queries"] == 300
    assert 0 < summary["bm25"]["ndcg@5"] <= summary["bm25"]["recall@5"] <= 1
    _run_folder_complete_baseline(home / "runs" / "demo" / "bm25")
    # the hybrid fuses the dense run that validation chose (every demo run exists by now) with
    # BM25: its BM25 half is the BM25 baseline above, and it is saved where 05 reads it
    hybrid = summary["hybrid"]
    assert hybrid["status"] == "done" and hybrid["fusion_setting"] == "auto"
    # fusion and dense weight: the best pair on validation over both fusions (JSON keys: text)
    curve = {(f, float(w)): v for f, ws in hybrid["validation_curve"].items()
             for w, v in ws.items()}
    assert {f for f, _ in curve} == {"rrf", "minmax"}
    fusion, weight = max(curve, key=curve.get)
    assert hybrid["fusion"] == fusion and hybrid["weights"] == [weight, 1.0]
    assert set(hybrid["paired_tests_ndcg@5"]) == {"BM25", f"稠密：{hybrid['dense_run']}"}
    bm25_test = hybrid["paired_tests_ndcg@5"]["BM25"]
    assert bm25_test["mean_difference"] == pytest.approx(
        hybrid["means"]["ndcg@5"] - summary["bm25"]["ndcg@5"], abs=1e-9)
    saved = json.loads((home / "runs" / "demo" / "hybrid" / "config.json").read_text())
    assert saved["dense_run"] == hybrid["dense_run"] and saved["kind"] == "baseline"
    # mteb's evaluator and the library's on the same test split and dense model agree; the
    # real C-MTEB tasks are not run offline (nothing saved beside the run)
    cmteb = summary["cmteb"]
    assert cmteb["status"] == "not run" and cmteb["tasks"] is None
    assert set(cmteb["agreement"]) == {"ndcg@10", "ndcg@5", "recall@5", "precision@5", "mrr@10"}
    for pair in cmteb["agreement"].values():
        assert pair["mteb"] == pytest.approx(pair["library"], abs=1e-5)
    assert cmteb["agreement"]["ndcg@5"]["library"] > 0.1  # a trained model, not an empty run
    assert not (home / "runs" / "demo" / hybrid["dense_run"] / "cmteb.json").exists()
    return ["baselines"]


def _run_folder_complete_baseline(run_dir):
    assert {"config.json", "metrics.json", "env.json"} <= {p.name for p in run_dir.iterdir()}


def check_03_beyond_the_report(summary, home):
    runs = summary["runs"]
    assert [r["name"] for r in runs.values()] == [
        "minimind27_10k", "minimind27_10k-m3", "minimind27_10k-ance", "minimind27_10k-last",
        "minimind27_10k-last-instr"]
    for run in runs.values():
        _learned(run)
        _run_folder_complete(run["run_dir"])
    assert list(runs) == list(course.OPTION_LABELS)  # keyed by what each option changes
    modes = {label.rsplit(" · ", 1)[-1] for label in summary["systems"] if " · " in label}
    assert modes == {"sparse", "colbert", "hybrid"}
    unified = course.OPTION_LABELS["m3"]
    assert summary["systems"][unified]["ndcg@5"] == runs["m3"]["trained"]["ndcg@5"]
    metrics = json.loads((Path(runs["m3"]["run_dir"]) / "metrics.json").read_text())
    assert set(metrics["m3"]) == {"dense", "sparse", "colbert", "hybrid"}
    assert [m["epoch"] for m in summary["mining"]] == [2, 3, 4][: len(summary["mining"])]
    assert summary["mining"] and all(0 <= m["false_negative_rate"] <= 1
                                     for m in summary["mining"])
    assert len(summary["comparisons"]) == 2 * 5  # 4 options + hybrid vs dense, two metrics
    # long documents: the dense baseline's FirstP row is its test result, read again
    long_docs = summary["long_documents"]
    first = long_docs["systems"][course.AGGREGATION_LABELS["first"]]
    assert first["ndcg@5"] == pytest.approx(runs["dense"]["trained"]["ndcg@5"], abs=1e-6)
    assert list(long_docs["systems"]) == [*course.AGGREGATION_LABELS.values(),
                                          course.WINDOWED_LABEL]
    assert 0 < long_docs["windows"]["split_documents"] and long_docs["windows"]["size"] == 128
    # MaxP, SumP and the run trained on random windows, each against FirstP on three metrics
    assert len(long_docs["comparisons"]) == 3 * 3
    windowed = json.loads((home / "runs" / "demo" / "minimind27_10k-windows" /
                           "history.json").read_text())
    assert windowed["windowed_positives"] > 0  # it did train on windows other than the first
    # two-stage retrieval: the dense first stage is the dense baseline's test result again; a
    # reranked run keeps every document of its first stage (same Recall@100), reorders the top
    two = summary["two_stage"]
    labels = [course.RERANK_LABELS[k][0]
              for k in ("dense", "dense_rerank", "bm25", "bm25_rerank", "bm25_random")]
    assert list(two["systems"]) == labels and two["published"] == "not asked for"
    assert two["systems"][labels[0]]["ndcg@5"] == pytest.approx(runs["dense"]["trained"]["ndcg@5"],
                                                                abs=1e-6)
    demo = home / "runs" / "demo"
    for first_stage, reranked, name in ((0, 1, "rerank-dense"), (2, 3, "rerank-bm25")):
        a, b = two["systems"][labels[first_stage]], two["systems"][labels[reranked]]
        assert b["recall@100"] == pytest.approx(a["recall@100"], abs=1e-12)
        assert b["ndcg@5"] != a["ndcg@5"]  # the top was reordered
        saved = json.loads((demo / name / "metrics.json").read_text())["test"]["aggregate"]
        assert saved["ndcg@5"]["mean"] == pytest.approx(b["ndcg@5"], abs=1e-12)
    assert len(two["comparisons"]) == 5 * 3  # 5 pairs of systems, three metrics
    # the shuffled reference keeps BM25's top-k set: the same Recall@k for every k up to 20
    shuffled = two["systems"][labels[4]]
    assert shuffled["recall@100"] == two["systems"][labels[2]]["recall@100"]
    assert two["reranker_epochs"] and (demo / "reranker_minimind27_10k" / "best" /
                                       "checksums.json").exists()
    # CPU serving: ONNX fp32 gives the PyTorch vectors, scores and metrics; int8 ran
    serving = summary["serving"]
    torch_label, onnx_label, int8_label = course.SERVING_LABELS.values()
    assert serving["systems"][torch_label]["ndcg@5"] == pytest.approx(
        runs["dense"]["trained"]["ndcg@5"], abs=1e-6)
    assert serving["vectors"][onnx_label]["min_cosine"] >= 0.9999
    assert serving["systems"][onnx_label]["ndcg@5"] == pytest.approx(
        serving["systems"][torch_label]["ndcg@5"], abs=1e-6)
    assert serving["reranker"][onnx_label]["largest_score_difference"] < 1e-4
    assert 0.9 < serving["vectors"][int8_label]["min_cosine"] < 1
    assert len(serving["comparisons"]) == 3 * 3  # ONNX, int8, reranker int8; three metrics
    return sorted(["test_metrics", "unified_loss_parts", "rerank_metrics"])


def check_05(summary, home):
    saved = {p.name for p in (home / "runs" / "demo").iterdir()
             if (p / "metrics.json").exists() or (p / "not_run.json").exists()}
    # every demo run of every notebook is in the table: the 8 experiments (7 of the report and
    # the unexpanded Qwen2 base), 3 identity ablations, 3 stage recipes of the stage chapter
    # (-lm, -retromae, -contrastive), 4 options beyond the report, 3 baselines (BM25, BGE-M3 not
    # run, the dense + BM25 hybrid), the run trained on random windows and the two reranked
    # first stages (neither the reranker's own folder nor the stage-1 runs are rows)
    assert set(summary["runs"]) == saved and len(saved) == 24
    assert {"minimind27_10k-lm", "minimind27_10k-retromae", "minimind27_10k-contrastive"} <= saved
    assert summary["reference"] == "bm25" and set(summary["not_run"]) == {"bge_m3"}
    assert set(summary["ndcg@5"]) == saved - {"bge_m3"}
    # the options of 03_beyond_the_report: 5 runs, and the sparse/ColBERT/hybrid rows of one
    assert len(summary["options"]) == 5 + 3
    assert summary["options"][course.OPTION_LABELS["dense"]] == summary["ndcg@5"]["minimind27_10k"]
    assert summary["data_scaling"] == {"MiniMind-108M (demo)": {
        "minimind108_10k": 600, "minimind108_96k": 1200, "minimind108_288k": 1800}}
    # Recall@5 and Precision@5 take two values: their std is fixed by the mean (an identity)
    assert summary["std_identity_error"] < 1e-9
    report = Path(summary["report"])
    assert report == home / "reports" / "results_demo.md"
    text = report.read_text(encoding="utf-8")
    assert all(f"| {name} |" in text for name in saved)
    # each file holds the figure its name says: the title saved in the PNG
    titles = {"data_scaling_minimind-108m-demo": "MiniMind-108M (demo)：指标随训练数据量的变化",
              "efficiency_frontier": "参数量与 NDCG@5", "metric_bars": "所有运行的测试集指标",
              "per_query_distributions": "逐查询 NDCG@5 的分布", "training_curves": "所有训练运行"}
    for name, title in titles.items():
        figure = home / "figures" / "demo" / f"05_results_and_plots_{name}.png"
        assert _png_title(figure).startswith(title)
    # every figure of every notebook so far was drawn from the runs of this table, as saved
    assert provenance.stale_figures(home / "figures" / "demo", report.with_suffix(".json")) == {}
    return sorted(titles)


def _png_title(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Title", "")


CHECKS = {"01_data_preprocessing": check_01, "02_loss_and_gradients": check_02,
          "03_stage1_pretraining": check_03_stage1_pretraining,
          "03_train_minimind27": check_03_train_minimind27,
          "03_train_minimind38": check_03_train_minimind38,
          "03_train_minimind108": check_03_train_minimind108,
          "03_train_minimind186": check_03_train_minimind186,
          "03_train_qwen2_613": check_03_train_qwen2_613,
          "03_beyond_the_report": check_03_beyond_the_report,
          "04_bge_m3_baseline": check_04, "05_results_and_plots": check_05}


def test_every_notebook_has_a_demo_check():
    assert sorted(p.stem for p in ALL) == sorted(CHECKS)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One project home for all demo runs, so the prepared data and demo LMs are shared and
    the later notebooks (expansions, baselines, results) read the earlier ones' runs: the
    demo runs are meant to run together, in course order."""
    return tmp_path_factory.mktemp("home")


@pytest.mark.notebook
@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_runs_with_demo_preset(path, home, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_HOME", str(home))
    notebooks.run_notebook(path, home / "executed", {"preset": "demo"})
    summary = runs.load_summary(home / "outputs" / path.stem / "demo")
    assert summary["preset"] == "demo" and summary["env"]["preset"] == "demo"
    figures = CHECKS[path.stem](summary, home)
    folder = home / "figures" / "demo"
    written = sorted(p.name for p in folder.glob(f"{path.stem}_*.png"))
    assert written == [f"{path.stem}_{name}.png" for name in figures]
    assert all(_png_title(folder / name) for name in written)  # every figure titled
