"""The notebooks' table and comparison helpers on inputs whose answers are worked out by hand
(until now only the notebook runs exercised them)."""

import re
from dataclasses import replace

import pytest

from retrieval_lib import course, evaluation
from retrieval_lib.settings import config


def _result(values):
    return {"per_query": {"ndcg@5": dict(zip(("q1", "q2", "q3", "q4"), values, strict=True)),
                          "recall@100": dict(zip(("q1", "q2", "q3", "q4"), [1, 1, 0, 1],
                                                 strict=True))}}


def test_metrics_table_cells_are_mean_sample_std_and_the_bootstrap_interval():
    # values 1, 0, 0.5, 0.5: mean 0.5, sample std sqrt((0.25 + 0.25 + 0 + 0) / 3) = 0.4082
    table = evaluation.metrics_table({"A": _result([1.0, 0.0, 0.5, 0.5]),
                                      "B": _result([0.0, 0.0, 0.0, 1.0])["per_query"]},
                                     ["ndcg@5"], digits=4)
    low, high = evaluation.bootstrap_ci([1.0, 0.0, 0.5, 0.5], seed=0)
    assert table.loc["A", "ndcg@5"] == f"0.5000 ± 0.4082 [{low:.4f}, {high:.4f}]"
    assert 0.0 <= low < 0.5 < high <= 1.0
    # a bare per-query mapping (as metrics.json saves it) reads the same: mean 0.25, std 0.5
    assert table.loc["B", "ndcg@5"].startswith("0.2500 ± 0.5000 [")
    assert list(table.index) == ["A", "B"] and list(table.columns) == ["ndcg@5"]


def test_option_systems_label_each_run_and_add_the_m3_modes_but_not_dense_twice():
    dense, m3_dense, sparse, hybrid = (_result([v] * 4) for v in (0.1, 0.2, 0.3, 0.4))
    runs = {"dense": {"test": dense},
            "m3": {"test": m3_dense, "m3": {"dense": m3_dense, "sparse": sparse,
                                            "hybrid": hybrid}}}
    systems = course.option_systems(runs)
    m3 = course.OPTION_LABELS["m3"]
    assert systems == {course.OPTION_LABELS["dense"]: dense, m3: m3_dense,
                       f"{m3} · sparse": sparse, f"{m3} · hybrid": hybrid}


def test_option_comparisons_pair_each_option_with_what_it_changes():
    runs = {key: {"test": _result(values)} for key, values in {
        "dense": [0.0, 0.0, 0.5, 0.5], "ance": [1.0, 0.0, 0.5, 0.5],
        "last": [0.0, 0.0, 0.0, 0.5], "last_instr": [0.5, 0.5, 0.5, 0.5]}.items()}
    tests = course.option_comparisons(runs, metrics=("ndcg@5",))
    label = course.OPTION_LABELS
    # m3 was not run: its pair is left out; the instruction is compared with last-token
    assert set(tests) == {f"{label['ance']} − {label['dense']} · ndcg@5",
                          f"{label['last']} − {label['dense']} · ndcg@5",
                          f"{label['last_instr']} − {label['last']} · ndcg@5"}
    instr = tests[f"{label['last_instr']} − {label['last']} · ndcg@5"]
    assert instr["mean_difference"] == pytest.approx((2.0 - 0.5) / 4)  # 0.375
    assert instr == evaluation.paired_test(runs["last_instr"]["test"]["per_query"]["ndcg@5"],
                                           runs["last"]["test"]["per_query"]["ndcg@5"])


def test_option_variants_change_only_what_each_option_names():
    exp = config.get_experiment("minimind27_10k", "demo")
    variants = course.option_variants(exp)
    assert variants["dense"] is exp
    assert variants["m3"].model.m3_heads and not exp.model.m3_heads
    assert variants["ance"].training.remine_every == 1 and exp.training.remine_every == 0
    assert variants["last"].model.pooling == "last_token"
    assert variants["last_instr"].model.query_instruction == course.QUERY_INSTRUCTION
    for key, v in variants.items():  # everything else is the base experiment's
        if key != "dense":
            assert v.data == exp.data and v.name != exp.name
            assert v.model.hidden_size == exp.model.hidden_size


def test_an_expansion_and_its_base_share_only_where_the_inputs_are(tmp_path):
    data_dir, model_path = str(tmp_path / "data"), str(tmp_path / "model")
    exp, base = course.expansion_experiments(
        "minimind186_288k", "demo", data_dir=data_dir, model_path=model_path,
        trust_remote_code=True, expansion_init="identity", unfreeze_every=1, epochs=3,
        learning_rate=1e-4, temperature=None)
    plain = config.get_experiment("minimind108_288k", "demo")
    assert exp.name == "minimind186_288k" and base.name == plain.name == exp.base_experiment
    # the expansion takes every parameter (None keeps the preset's value)
    assert (exp.training.epochs, exp.training.learning_rate, exp.model.expansion_init,
            exp.model.unfreeze_every) == (3, 1e-4, "identity", 1.0)
    assert exp.training.temperature == config.get_experiment("minimind186_288k",
                                                             "demo").training.temperature
    # the base: where the inputs are, and otherwise the settings of its own notebook
    for e in (exp, base):
        assert (e.data.data_dir, e.model.base_model, e.model.trust_remote_code) == (
            data_dir, model_path, True)
    assert base.training == plain.training
    assert replace(base.model, base_model=plain.model.base_model,
                   trust_remote_code=False) == plain.model
    with pytest.raises(ValueError, match="not an expansion"):
        course.expansion_experiments("minimind27_10k", "demo")
    # the full preset stops on the missing inputs (the demo, above, does not look for them)
    with pytest.raises(course.MissingInputsError, match="model"):
        course.expansion_experiments("minimind38_96k", "full", data_dir=data_dir,
                                      model_path=model_path)


def test_run_expansion_with_ablation_trains_the_configured_init_then_the_ablation_in_its_own_folder(
        monkeypatch):
    calls = []

    def fake_run(exp, splits, base_info, resume=False):
        calls.append((exp.name, exp.model.expansion_init, resume))
        return {"init": exp.model.expansion_init}

    monkeypatch.setattr("retrieval_lib.course.expansion.run_experiment", fake_run)
    exp = config.get_experiment("minimind38_96k", "demo")  # configured init: random
    runs = course.run_expansion_with_ablation(exp, None, {}, "identity", resume=True)
    assert list(runs) == ["random", "identity"]  # the configured one first: tables keep it first
    assert runs == {"random": {"init": "random"}, "identity": {"init": "identity"}}
    assert calls == [("minimind38_96k", "random", True),
                     ("minimind38_96k-identity", "identity", True)]  # its own run folder
    for ablation in (None, "", "random"):  # no ablation, or the configured init again
        calls.clear()
        assert list(course.run_expansion_with_ablation(exp, None, {}, ablation)) == ["random"]
        assert calls == [("minimind38_96k", "random", False)]


def _expansion_run(untrained, trained, parameters):
    def result(values):
        return {"per_query": {m: dict(zip(("q1", "q2", "q3"), values, strict=True))
                              for m in ("ndcg@10", "recall@100")},
                "aggregate": {m: {"mean": sum(values) / 3} for m in evaluation.REPORT_METRICS}}
    return {"out_dir": "runs/x", "parameters": parameters, "untrained": result(untrained),
            "test": result(trained), "wall_time_s": 1.0,
            "history": {"best_epoch": 1, "epochs": [{"trainable_new_layers": [2]}]},
            "expansion": {"parameters_before": 510_400, "new_layers": [2, 3]}}


def test_expansion_summary_of_hand_made_runs():
    exp = config.get_experiment("minimind38_96k", "demo")
    base_exp = config.get_experiment("minimind27_10k", "demo")
    base = _expansion_run([0.5, 1.0, 0.0], [0.5, 1.0, 0.5], 510_400)
    runs = {"random": _expansion_run([0.1, 1.0, 0.0], [1.0, 1.0, 0.5], 602_816),
            "identity": _expansion_run([0.5, 1.0, 0.0], [0.5, 1.0, 1.0], 602_816)}
    summary = course.expansion_summary(exp, base_exp, {"name": "lm"}, base, runs)
    assert summary["inits"] == ["random", "identity"] and summary["num_layers"] == 4
    assert summary["new_layers"] == [2, 3]
    params = summary["parameters"]
    # a MiniMind layer: q, o d×d; k, v d×(kv_heads·head_dim); gate, up, down d×ffn; 2 norms d.
    # full: d 512, 16 heads, 8 KV heads (head_dim 32), ffn 1408 -> 2,950,144 per layer, 4 added
    assert params["full"]["added"] == 4 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1408 + 1024)
    # demo: d 64, 4 heads, 2 KV heads (head_dim 16), ffn 176 -> 46,208 per layer, 2 added
    assert params["demo"]["added"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 128)
    assert (params["measured_before"], params["measured_after"]) == (510_400, 602_816)
    assert params["demo"]["before"] == 510_400 and params["demo"]["after"] == 602_816
    # untrained gaps: random changed q1 by 0.4; identity changed nothing
    assert summary["untrained_max_difference"] == pytest.approx({"random": 0.4, "identity": 0.0})
    tests = summary["paired_tests"]
    assert set(tests) == {f"{a} · {m}" for m in ("ndcg@10", "recall@100") for a in (
        "扩容（random）− 对照", "扩容（identity）− 对照", "identity − random")}
    assert tests["扩容（random）− 对照 · ndcg@10"]["mean_difference"] == pytest.approx(0.5 / 3)
    assert tests["identity − random · ndcg@10"]["mean_difference"] == pytest.approx(0.0)
    assert summary["runs"]["base"]["trained"]["ndcg@10"] == pytest.approx(2 / 3)
    assert summary["runs"]["identity"]["untrained"]["ndcg@10"] == pytest.approx(0.5)
    assert summary["runs"]["random"]["trained"]["ndcg@10"] == pytest.approx(2.5 / 3)
    # without a base run: no comparison with it, no untrained gap
    alone = course.expansion_summary(exp, base_exp, {}, None, runs)
    assert alone["runs"]["base"] is None and alone["untrained_max_difference"] == {}
    assert set(alone["paired_tests"]) == {"identity − random · ndcg@10",
                                          "identity − random · recall@100"}


def _ablation():
    def variant(what, val, test, vs=None):
        v = {"what": what, "validation_ndcg@10": val, "test_ndcg@5": test,
             "test_share_of_bm25": test / 0.8, "heldout_perplexity": 123.45, "epochs_run": 4,
             "best_epoch": 3, "seconds": 10.0}
        if vs is not None:
            v["validation_vs_baseline"] = vs
        return v

    better = {"mean_difference": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p_value": 0.001, "n": 200}
    unclear = {"mean_difference": 0.01, "ci_low": -0.02, "ci_high": 0.04, "p_value": 0.4,
               "n": 200}
    return {"bm25": {"test_ndcg@5": 0.8}, "variants": {
        "baseline": variant("不变", 0.2, 0.08), "a": variant("改 A", 0.3, 0.2, better),
        "b": variant("改 B", 0.21, 0.09, unclear)}}


def test_ablation_table_and_sentences_say_what_the_saved_numbers_say():
    table = course.ablation_table(_ablation())
    assert list(table.index) == ["不变", "改 A", "改 B"]
    assert table.loc["改 A", "占 BM25 的比例（测试）"] == "25%"  # 0.2 / 0.8
    assert table.loc["改 A", "与不变相比（验证）"] == "+0.1000 [+0.0500, +0.1500] p=0.001"
    assert table.loc["不变", "与不变相比（验证）"] == "—"
    sentences = course.ablation_sentences(_ablation())
    assert len(sentences) == 2 and sentences[0].startswith(
        "在 200 个验证查询上，改 A的 NDCG@10 比不变的 demo 配置高 0.1000")
    assert sentences[1] == "其余 1 个改动在验证集上与不变的配置相比没有显著差别。"


def test_ablation_sentences_say_how_much_a_second_corpus_added_and_what_it_did():
    saved = _ablation()
    saved["variants"]["baseline"]["pretraining_chars"] = 1000
    saved["variants"]["c"] = {
        **saved["variants"]["b"], "what": "加语料 C", "heldout_perplexity": 150.0,
        "pretraining_chars": 1600, "extra_pretraining_texts": 30, "extra_pretraining_chars": 600,
        "extra_corpus_report": {"read": 45, "dropped": {"duplicate": 14, "blank_line": 1}}}
    sentences = course.ablation_sentences(saved)
    assert sentences[0] == ("「加语料 C」：语言模型共用 1,600 字预训练，其中第二份语料 30 条、"
                            "600 字（读入 45 行，去掉重复 14 行、空行 1 行）；不变的配置只用训练池"
                            "的 1,000 字。新闻验证文本上的留出困惑度 123.5 → 150.0。")
    assert sentences[-1] == "其余 2 个改动在验证集上与不变的配置相比没有显著差别。"
    assert len(sentences) == 3  # the corpus sentence, "改 A" better, the rest


def test_the_saved_demo_ablation_reads_as_a_table():
    saved = course.load_ablation()
    assert saved is not None, "benchmarks/demo_ablation.json is missing: run the script"
    table = course.ablation_table(saved)
    assert "baseline" in saved["variants"] and len(table) == len(saved["variants"])
    assert course.load_ablation(course.ABLATION_RESULTS.with_name("missing.json")) is None


@pytest.mark.parametrize(("given", "expected"), [
    (["10k", "96k"], ["10k", "96k"]),  # the parameters cell, or papermill -y
    ("10k", ["10k"]),  # papermill -p passes text: one name,
    ("10k,288k", ["10k", "288k"]),  # comma-separated (a trailing comma is no name),
    ("10k, ", ["10k"]),
    (' ["96k", "10k"] ', ["96k", "10k"]),  # or a list literal
])
def test_a_list_parameter_takes_every_form_papermill_passes(given, expected):
    assert course.list_parameter(given, "subsets", course.SUBSETS) == expected


@pytest.mark.parametrize("given", ['["10k"', "minimind108_[", "", " , ", 5, [3], ["1k"]])
def test_a_list_parameter_that_is_not_a_list_of_known_names_names_the_forms_that_work(given):
    forms = """-p subsets 10k,96k  or  -p subsets '["10k", "96k"]'  or  -y 'subsets: [10k, 96k]'"""
    with pytest.raises(ValueError, match=r"^subsets.*" + re.escape(forms)):
        course.list_parameter(given, "subsets", course.SUBSETS)
