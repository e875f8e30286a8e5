"""The notebooks' table and comparison helpers on inputs whose answers are worked out by hand
(until now only the notebook runs exercised them)."""

import pytest

from retrieval_lib import config, evaluation, studies


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
    systems = studies.option_systems(runs)
    m3 = studies.OPTION_LABELS["m3"]
    assert systems == {studies.OPTION_LABELS["dense"]: dense, m3: m3_dense,
                       f"{m3} · sparse": sparse, f"{m3} · hybrid": hybrid}


def test_option_comparisons_pair_each_option_with_what_it_changes():
    runs = {key: {"test": _result(values)} for key, values in {
        "dense": [0.0, 0.0, 0.5, 0.5], "ance": [1.0, 0.0, 0.5, 0.5],
        "last": [0.0, 0.0, 0.0, 0.5], "last_instr": [0.5, 0.5, 0.5, 0.5]}.items()}
    tests = studies.option_comparisons(runs, metrics=("ndcg@5",))
    label = studies.OPTION_LABELS
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
    variants = studies.option_variants(exp)
    assert variants["dense"] is exp
    assert variants["m3"].model.m3_heads and not exp.model.m3_heads
    assert variants["ance"].training.remine_every == 1 and exp.training.remine_every == 0
    assert variants["last"].model.pooling == "last_token"
    assert variants["last_instr"].model.query_instruction == studies.QUERY_INSTRUCTION
    for key, v in variants.items():  # everything else is the base experiment's
        if key != "dense":
            assert v.data == exp.data and v.name != exp.name
            assert v.model.hidden_size == exp.model.hidden_size
