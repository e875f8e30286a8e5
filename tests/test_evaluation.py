import math
import random

import numpy as np
import pytest
import pytrec_eval  # the reference implementation of trec_eval

from retrieval_lib import evaluation

KS = (1, 3, 5, 10)


def _random_case(seed, n_queries=40, n_docs=60):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for i in range(n_queries):
        qid = f"q{i}"
        judged = rng.sample(range(n_docs), rng.randint(1, 8))
        qrels[qid] = {f"d{j}": rng.choice([0, 1, 1, 2, 3]) for j in judged}
        qrels[qid][f"d{judged[0]}"] = rng.choice([1, 2, 3])  # at least one relevant
        retrieved = rng.sample(range(n_docs), rng.randint(1, 30))
        # coarse scores make ties frequent; some queries retrieve no relevant document
        run[qid] = {f"d{j}": round(rng.random(), 1) for j in retrieved}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_trec_eval(seed):
    qrels, run = _random_case(seed)
    measures = {f"P_{k}" for k in KS} | {f"recall_{k}" for k in KS} | \
               {f"ndcg_cut_{k}" for k in KS} | {"recip_rank"}
    reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    ours = evaluation.score_run(qrels, run, KS)["per_query"]
    names = {"P": "precision", "recall": "recall", "ndcg_cut": "ndcg"}
    for qid, ref in reference.items():
        for measure, value in ref.items():
            if measure == "recip_rank":
                assert ours["mrr"][qid] == pytest.approx(value, abs=1e-6)
                continue
            base, k = measure.rsplit("_", 1)
            assert ours[f"{names[base]}@{k}"][qid] == pytest.approx(value, abs=1e-6), (qid, measure)
    assert any(ours["recall@10"][q] == 0 for q in qrels)  # the case is covered


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mrr_at_k_agrees_with_trec_eval_on_the_run_cut_at_k(seed):
    """trec_eval has no cut-off for the reciprocal rank: its recip_rank over each query's first
    k documents (in trec_eval's own order: score, then id, both descending) is MRR@k."""
    qrels, run = _random_case(seed)
    ours = evaluation.score_run(qrels, run, KS)["per_query"]
    for k in KS:
        cut = {qid: dict(sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k])
               for qid, docs in run.items()}
        reference = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        for qid, ref in reference.items():
            assert ours[f"mrr@{k}"][qid] == pytest.approx(ref["recip_rank"], abs=1e-9), (qid, k)
        # some query has its first relevant document beyond k, so the cut-off matters
        assert k == KS[-1] or any(0 < ours["mrr"][q] < 1 / k for q in qrels)


def test_hand_worked_query_with_ties_and_grades():
    qrels = {"q": {"d1": 1, "d2": 0, "d3": 2}}
    run = {"q": {"d1": 0.5, "d2": 0.5, "d3": 0.1, "d4": 0.5}}
    # ties broken by descending id: d4, d2, d1, d3
    assert evaluation.rank_documents(run["q"]) == ["d4", "d2", "d1", "d3"]
    m = {k: v["q"] for k, v in evaluation.score_run(qrels, run, [2, 5])["per_query"].items()}
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["mrr@2"] == 0.0 and m["mrr@5"] == pytest.approx(1 / 3)
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@2"] == 0.0
    dcg = 1 / math.log2(4) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@5"] == pytest.approx(dcg / idcg)


def test_missing_query_scores_zero_and_aggregates():
    qrels = {"a": {"x": 1}, "b": {"y": 1}}
    r = evaluation.score_run(qrels, {"a": {"x": 1.0}}, [1])
    assert r["per_query"]["recall@1"] == {"a": 1.0, "b": 0.0}
    agg = r["aggregate"]["recall@1"]
    assert agg == {"mean": 0.5, "std": pytest.approx(math.sqrt(0.5)), "n": 2}


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(30)
    big = rng.random(3000)
    lo, hi = evaluation.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = evaluation.bootstrap_ci(big)
    assert (hi2 - lo2) < (hi - lo) / 5
    assert evaluation.bootstrap_ci([0.3] * 10) == (pytest.approx(0.3), pytest.approx(0.3))


def test_paired_test_detects_a_real_difference_only():
    rng = np.random.default_rng(1)
    base = rng.random(200)
    a = {f"q{i}": v + 0.1 for i, v in enumerate(base)}
    b = {f"q{i}": v for i, v in enumerate(base)}
    noise = {f"q{i}": v + rng.normal(0, 0.05) for i, v in enumerate(base)}
    strong = evaluation.paired_test(a, b)
    assert strong["mean_difference"] == pytest.approx(0.1)
    assert strong["p_value"] < 0.001 and strong["ci_low"] > 0.09
    null = evaluation.paired_test(noise, b)
    assert null["p_value"] > 0.05 and null["ci_low"] < 0 < null["ci_high"]
    # exact small case: d = (1, 1) -> only the two all-same sign patterns reach |mean| = 1
    exact = evaluation.paired_test({"x": 1, "y": 1}, {"x": 0, "y": 0}, n_resamples=20000)
    assert exact["p_value"] == pytest.approx(0.5, abs=0.02)



def _exact_sign_flip_p(d):
    """The exact two-sided sign-flip p-value: the share of all 2^n sign patterns whose mean is
    at least as far from 0 as the observed one."""
    from itertools import product

    d = np.asarray(d, dtype=float)
    means = [abs(np.dot(signs, d)) / len(d) for signs in product((-1.0, 1.0), repeat=len(d))]
    return sum(m >= abs(d.mean()) - 1e-12 for m in means) / len(means)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_paired_test_is_the_sign_flip_test_and_symmetric_in_its_arguments(seed):
    """The p-value against the exact enumeration of all 2^12 sign patterns and scipy's exact
    permutation test (within the Monte Carlo error of 20,000 resamples), the documented +1
    correction, and a - b versus b - a: the same p, the difference negated, the interval
    mirrored."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    a = {f"q{i}": float(v) for i, v in enumerate(rng.random(12))}
    b = {q: v - 0.15 + rng.normal(0, 0.3) for q, v in a.items()}
    d = [a[q] - b[q] for q in sorted(a)]
    ab = evaluation.paired_test(a, b, n_resamples=20_000, seed=seed)
    ba = evaluation.paired_test(b, a, n_resamples=20_000, seed=seed)
    exact = _exact_sign_flip_p(d)
    scipy_p = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                     alternative="two-sided").pvalue
    assert scipy_p == pytest.approx(exact, abs=1e-9)
    mc_error = 4 * math.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001
    assert ab["p_value"] == pytest.approx(exact, abs=mc_error)
    assert ba["p_value"] == ab["p_value"]
    assert ba["mean_difference"] == pytest.approx(-ab["mean_difference"])
    assert (ba["ci_low"], ba["ci_high"]) == (pytest.approx(-ab["ci_high"]),
                                             pytest.approx(-ab["ci_low"]))
    # one query: every sign pattern is as extreme as the observed one, so p = (N + 1)/(N + 1)
    assert evaluation.paired_test({"x": 0.7}, {"x": 0.2}, n_resamples=99)["p_value"] == 1.0
    # 200 equal differences: only the 2 of 2^200 patterns with one sign reach the mean, so no
    # resample does and p is the +1 correction's 1/(N + 1), never 0
    same = evaluation.paired_test({f"q{i}": 0.3 for i in range(200)},
                                  {f"q{i}": 0.2 for i in range(200)}, n_resamples=999)
    assert same["p_value"] == 1 / 1000


def test_the_bootstrap_interval_covers_the_mean_at_its_stated_level():
    """Coverage over 400 samples of 60 values from a skewed distribution whose mean is known
    (exponential, mean 0.5): about 95% of the 95% intervals hold it (percentile intervals cover
    a little less at this size; binomial spread at 400 draws is about 1.1 points), and about
    80% of the 80% ones. Each interval agrees with scipy's percentile bootstrap."""
    from scipy import stats

    rng = np.random.default_rng(7)
    hits = {0.95: 0, 0.80: 0}
    for i in range(400):
        values = rng.exponential(0.5, size=60)
        for level in hits:
            low, high = evaluation.bootstrap_ci(values, n_resamples=1000, confidence=level,
                                                seed=i)
            hits[level] += low <= 0.5 <= high
        if i < 5:
            ref = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=4000,
                                  method="percentile", random_state=i).confidence_interval
            low, high = evaluation.bootstrap_ci(values, n_resamples=4000, seed=i)
            width = ref.high - ref.low
            assert abs(low - ref.low) < 0.1 * width and abs(high - ref.high) < 0.1 * width
    assert 0.91 <= hits[0.95] / 400 <= 0.98
    assert 0.74 <= hits[0.80] / 400 <= 0.86

def test_a_query_with_no_relevant_passage_scores_zero_on_every_metric():
    """Judged, but every grade 0 (or the query absent from the run): nothing to find, so
    recall and NDCG are 0 by convention (trec_eval's), not 1 and not a division by zero."""
    qrels = {"none": {"d1": 0, "d2": 0}, "one": {"d1": 1}}
    run = {"none": {"d1": 0.9, "d2": 0.5}, "one": {"d2": 0.9, "d1": 0.5}}
    per_query = evaluation.score_run(qrels, run, ks=(2,))["per_query"]
    assert {m: v["none"] for m, v in per_query.items()} == {
        "mrr": 0.0, "precision@2": 0.0, "recall@2": 0.0, "ndcg@2": 0.0, "mrr@2": 0.0}
    # the other query: its relevant passage at rank 2 -> 1/log2(3) over an ideal of 1
    assert per_query["ndcg@2"]["one"] == pytest.approx(1 / math.log2(3))
    assert per_query["recall@2"]["one"] == 1.0 and per_query["mrr"]["one"] == 0.5


def test_aggregating_one_value_or_none_is_quiet():
    """One query: its value, a std of 0 (not numpy's NaN for ddof=1); none: NaN, n 0, and no
    'mean of empty slice' warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluation.aggregate([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
        empty = evaluation.aggregate([])
    assert math.isnan(empty["mean"]) and empty["std"] == 0.0 and empty["n"] == 0
    # two values: the sample std (ddof = 1) by hand, |a - b| / sqrt(2)
    assert evaluation.aggregate([0.1, 0.5])["std"] == pytest.approx(0.4 / math.sqrt(2))


def test_the_bootstrap_interval_is_the_stated_quantiles_of_the_resampled_means():
    """Values (0, 1): a resampled mean of two is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    A 40% interval cuts 30% off each side, inside the mass at 0.5: (0.5, 0.5); a 90% interval
    cuts 5%, inside the masses at 0 and 1: (0, 1)."""
    assert evaluation.bootstrap_ci([0.0, 1.0], n_resamples=20_000, confidence=0.4) == (0.5, 0.5)
    assert evaluation.bootstrap_ci([0.0, 1.0], n_resamples=20_000, confidence=0.9) == (0.0, 1.0)


def test_the_statistics_defaults_are_the_ones_saved_results_were_computed_with():
    """Every saved report's intervals and p-values came from 2,000 bootstrap resamples, 10,000
    sign flips and seed 0: a silent change of a default would change published numbers."""
    rng = np.random.default_rng(3)
    values = rng.random(25)
    assert evaluation.bootstrap_ci(values) == evaluation.bootstrap_ci(
        values, n_resamples=2000, confidence=0.95, seed=0)
    a = {f"q{i}": float(v) for i, v in enumerate(values)}
    b = {q: v - 0.05 + float(rng.normal(0, 0.2)) for q, v in a.items()}
    assert evaluation.paired_test(a, b) == evaluation.paired_test(a, b, n_resamples=10_000,
                                                                  seed=0)
    # the summaries the figures and tables read use the same seed
    result = {"per_query": {"mrr": a}}
    assert evaluation.summarize_systems({"A": result}) == evaluation.summarize_systems(
        {"A": result}, seed=0)
    assert evaluation.summarize_metrics(result).equals(evaluation.summarize_metrics(result,
                                                                                    seed=0))


def test_the_paired_test_uses_the_shared_queries_and_its_seed():
    """Only the queries both systems answered count (n and the mean difference by hand); a
    system pair with none in common is refused; the seed drives the interval too."""
    a = {"q1": 0.9, "q2": 0.5, "q3": 0.4}
    b = {"q2": 0.1, "q3": 0.6, "q4": 0.0}
    test = evaluation.paired_test(a, b)
    assert test["n"] == 2 and test["mean_difference"] == pytest.approx((0.4 - 0.2) / 2)
    with pytest.raises(ValueError, match="^the two systems share no query$"):
        evaluation.paired_test({"q1": 1.0}, {"q2": 1.0})
    rng = np.random.default_rng(4)
    c = {f"q{i}": float(v) for i, v in enumerate(rng.random(30))}
    d = {q: float(rng.random()) for q in c}
    one, other = evaluation.paired_test(c, d, seed=1), evaluation.paired_test(c, d, seed=2)
    assert one["mean_difference"] == other["mean_difference"]
    assert (one["ci_low"], one["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert evaluation.paired_test(c, d, seed=1) == one


def test_significance_needs_p_below_alpha_and_an_interval_that_excludes_zero():
    """Boundaries by hand: p equal to alpha is not below it; an interval ending at 0 does not
    exclude it; the default alpha is 0.05, and the sentence uses the alpha it is given."""
    test = {"mean_difference": 0.02, "ci_low": 0.01, "ci_high": 0.03, "p_value": 0.03, "n": 9}
    assert evaluation.significant(test)
    assert not evaluation.significant({**test, "p_value": 0.06})  # default alpha 0.05
    assert not evaluation.significant({**test, "p_value": 0.05})
    assert not evaluation.significant({**test, "ci_low": 0.0})
    assert not evaluation.significant({**test, "mean_difference": -0.02, "ci_low": -0.03,
                                       "ci_high": 0.0})
    assert evaluation.significant({**test, "mean_difference": -0.02, "ci_low": -0.03,
                                   "ci_high": -0.01})
    assert evaluation.comparison_sentence("A", "B", test, "mrr", alpha=0.01).endswith(
        "在这个测试集上看不出两者有差异。")
    # a test without its query count: the sentence starts with the system, not a count
    no_n = {k: v for k, v in test.items() if k != "n"}
    assert evaluation.comparison_sentence("A", "B", no_n, "mrr").startswith("A的 mrr 比B高")


def test_system_summaries_are_the_mean_sample_std_and_interval_of_each_metric():
    """summarize_systems / summarize_metrics, what the figures read: by hand, ndcg@5 of
    1, 0, .5, .5 has mean .5 and sample std √(.5/3); the interval is the bootstrap's of the
    same values and seed; without a metric list, every metric of the result."""
    result = {"per_query": {"ndcg@5": {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.5},
                            "mrr": {"a": 1.0, "b": 0.5, "c": 0.5, "d": 0.0}}}
    summary = evaluation.summarize_systems({"A": result}, ["ndcg@5"], seed=3)
    low, high = evaluation.bootstrap_ci([1.0, 0.0, 0.5, 0.5], seed=3)
    assert summary == {"A": {"ndcg@5": {"mean": 0.5, "std": pytest.approx(math.sqrt(0.5 / 3)),
                                        "ci_low": low, "ci_high": high, "n": 4}}}
    # the seed reaches the interval (25 distinct values: another seed, another interval)
    values = {f"q{i}": float(v) for i, v in enumerate(np.random.default_rng(5).random(25))}
    seeded = evaluation.summarize_systems({"B": {"per_query": {"mrr": values}}}, seed=3)
    assert (seeded["B"]["mrr"]["ci_low"], seeded["B"]["mrr"]["ci_high"]) == \
        evaluation.bootstrap_ci(list(values.values()), seed=3) != \
        evaluation.bootstrap_ci(list(values.values()), seed=0)
    table = evaluation.summarize_metrics(result)
    assert list(table.index) == ["ndcg@5", "mrr"]
    assert table.loc["mrr", "mean"] == 0.5 and table.loc["mrr", "n"] == 4
    assert (table.loc["mrr", "ci_low"], table.loc["mrr", "ci_high"]) == \
        evaluation.bootstrap_ci([1.0, 0.5, 0.5, 0.0], seed=0)


def test_embeddings_are_judged_on_their_top_100():
    """The default run holds each query's top 100 passages: a relevant passage at rank 101
    is not retrieved (MRR 0, Recall@100 0), one at rank 100 is (MRR 1/100). By hand: one query
    at angle 0, 150 unit passages at growing angles, so passage j ranks j + 1."""
    angles = np.linspace(0, 1.5, 150)
    p = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    at_101 = evaluation.evaluate_embeddings(q, p, ["q"], {"q": {"d100": 1}})["per_query"]
    at_100 = evaluation.evaluate_embeddings(q, p, ["q"], {"q": {"d99": 1}})["per_query"]
    assert at_101["mrr"]["q"] == 0.0 and at_101["recall@100"]["q"] == 0.0
    assert at_100["mrr"]["q"] == pytest.approx(1 / 100) and at_100["recall@100"]["q"] == 1.0


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    p = rng.normal(size=(50, 8)).astype(np.float32)
    scores, idx = evaluation.exact_search(q, p, 7)
    expected = np.argsort(-(q @ p.T), axis=1)[:, :7]
    assert np.array_equal(idx, expected)
    assert np.allclose(scores, np.take_along_axis(q @ p.T, expected, 1), atol=1e-5)


def test_qrels_for_split_uses_the_deduplicated_corpus():
    split = [
        {"query": "a", "positive_passages": [{"text": "P1"}], "negative_passages": [{"text": "N"}]},
        {"query": "b", "positive_passages": [{"text": "N"}], "negative_passages": [{"text": "P1"}]},
    ]
    qids, queries, qrels, corpus = evaluation.qrels_for_split(split)
    assert corpus == ["P1", "N"] and queries == ["a", "b"]
    assert qrels == {"q0": {"d0": 1}, "q1": {"d1": 1}} and qids == ["q0", "q1"]
    # a perfect encoder (one-hot per text) finds every positive first
    emb_q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    r = evaluation.evaluate_embeddings(emb_q, np.eye(2, dtype=np.float32), qids, qrels, [1])
    assert r["aggregate"]["recall@1"]["mean"] == 1.0 and r["aggregate"]["mrr"]["mean"] == 1.0


def test_the_std_of_a_two_valued_metric_follows_from_its_mean():
    """One relevant passage per query: per-query Recall@5 is 0 or 1, Precision@5 0 or 0.2, so
    their sample std is √(m(c − m)·n/(n − 1)); NDCG@5 takes other values and has no such std."""
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(7)}
    # the relevant document at rank 1, 3, 9 (outside the top 5) or missing
    ranks = [1, 3, 9, 1, None, 2, 7]
    run = {}
    for i, rank in enumerate(ranks):
        docs = [f"x{j}" for j in range(10)]
        if rank is not None:
            docs[rank - 1] = f"d{i}"
        run[f"q{i}"] = {d: 10.0 - j for j, d in enumerate(docs)}
    result = evaluation.score_run(qrels, run, ks=(5,))
    table = evaluation.std_from_mean_table({"sys": result}, ["recall@5", "precision@5", "ndcg@5"])
    m = 4 / 7  # ranks 1, 3, 1, 2 are inside the top 5
    recall = table.loc[("sys", "recall@5")]
    assert recall["mean"] == pytest.approx(m)
    assert recall["std"] == pytest.approx(math.sqrt(m * (1 - m) * 7 / 6), abs=1e-12)
    assert recall["std_from_mean"] == pytest.approx(recall["std"], abs=1e-12)
    precision = table.loc[("sys", "precision@5")]
    assert precision["std_from_mean"] == pytest.approx(precision["std"], abs=1e-12)
    assert precision["std"] == pytest.approx(math.sqrt(m / 5 * (0.2 - m / 5) * 7 / 6))
    assert math.isnan(table.loc[("sys", "ndcg@5")]["std_from_mean"])
    # a bare {metric: {query: value}} mapping reads the same; a metric alone in its column
    # still says NaN (a float), not None
    bare = evaluation.std_from_mean_table({"sys": result["per_query"]}, ["ndcg@5"])
    assert isinstance(bare["std_from_mean"].iloc[0], float)
    assert math.isnan(bare["std_from_mean"].iloc[0])
    # by hand: two values 0 and 1 (n = 2): √(0.5·0.5·2/1); all zeros: 0; values 0, 0.5, 1: None
    assert evaluation.two_valued_std([0.0, 1.0]) == pytest.approx(math.sqrt(0.5))
    assert evaluation.two_valued_std([0.0, 0.0, 0.0]) == 0.0
    assert evaluation.two_valued_std([0.0, 0.5, 1.0]) is None
    assert evaluation.two_valued_std([0.3]) is None


def test_the_comparison_sentence_says_what_the_paired_test_found():
    better = {"mean_difference": 0.031, "ci_low": 0.012, "ci_high": 0.05, "p_value": 0.002,
              "n": 300}
    assert evaluation.comparison_sentence("训练后", "训练前", better, "ndcg@10") == (
        "在 300 个测试查询上，训练后的 ndcg@10 比训练前高 0.0310（95% 置信区间 [0.0120, 0.0500]，"
        "p = 0.002）：差异显著，训练后更好。")
    worse = {**better, "mean_difference": -0.031, "ci_low": -0.05, "ci_high": -0.012}
    assert evaluation.comparison_sentence("A", "B", worse, "mrr").endswith(
        "A的 mrr 比B低 0.0310（95% 置信区间 [-0.0500, -0.0120]，p = 0.002）：差异显著，A更差。")
    # p below alpha but the interval touches 0, or p above alpha: no difference is claimed
    for unclear in ({**better, "ci_low": -0.001}, {**better, "p_value": 0.2}):
        assert evaluation.comparison_sentence("A", "B", unclear, "mrr").endswith(
            "在这个测试集上看不出两者有差异。")
    # from a real test: two systems that differ on every query
    a = {f"q{i}": 1.0 for i in range(20)}
    b = {f"q{i}": 0.0 for i in range(20)}
    assert "差异显著，A更好" in evaluation.comparison_sentence(
        "A", "B", evaluation.paired_test(a, b), "recall@5")


def test_reciprocal_rank_fusion_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.8, "c": 0.1}}
    lexical = {"q": {"c": 12.0, "a": 3.0, "d": 1.0}}
    fused = evaluation.fuse_runs([dense, lexical], "rrf", k=60)["q"]
    # a: 1/61 + 1/62; c: 1/63 + 1/61; b: 1/62; d: 1/63 (a run that lacks a document adds 0)
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62,
                                   "d": 1 / 63})
    assert list(fused) == ["a", "c", "b", "d"]
    # weights scale each run's share; depth keeps the top of the fused list
    weighted = evaluation.fuse_runs([dense, lexical], "rrf", k=0, weights=[1.0, 3.0], depth=2)
    # k 0: a 1/1 + 3/2 = 2.5; c 1/3 + 3/1 = 3.33; b 1/2; d 3/3 = 1
    assert weighted == {"q": pytest.approx({"c": 1 / 3 + 3.0, "a": 2.5})}


def test_min_max_score_fusion_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.7, "c": 0.5}}
    lexical = {"q": {"c": 12.0, "a": 4.0, "d": 2.0}}
    fused = evaluation.fuse_runs([dense, lexical], "minmax")["q"]
    # dense scaled: a 1, b 0.5, c 0; lexical scaled: c 1, a 0.2, d 0
    assert fused == pytest.approx({"a": 1.2, "b": 0.5, "c": 1.0, "d": 0.0})
    with pytest.raises(ValueError, match="unknown fusion"):
        evaluation.fuse_runs([dense], "max")


def test_fusion_edge_cases_by_hand():
    """A query only one run answers, a run whose scores are all equal, a query with no
    documents, tied scores (ranked by descending id, as trec_eval ranks them), and mismatched
    weights."""
    dense = {"q1": {"a": 0.5, "b": 0.5, "c": 0.2}, "q2": {"x": 1.0}, "q3": {}}
    lexical = {"q1": {"b": 2.0, "a": 2.0}, "q4": {"y": 3.0, "z": 3.0}}
    rrf = evaluation.fuse_runs([dense, lexical], "rrf", k=10)
    # ties: b before a in both runs (descending id), so b 1/11 + 1/11, a 1/12 + 1/12, c 1/13
    assert rrf["q1"] == pytest.approx({"b": 2 / 11, "a": 2 / 12, "c": 1 / 13})
    assert list(rrf["q1"]) == ["b", "a", "c"]
    assert rrf["q2"] == pytest.approx({"x": 1 / 11}) and rrf["q3"] == {}
    assert list(rrf["q4"]) == ["z", "y"] and rrf["q4"] == pytest.approx({"z": 1 / 11,
                                                                          "y": 1 / 12})
    minmax = evaluation.fuse_runs([dense, lexical], "minmax", weights=[2.0, 1.0])
    # dense q1 scaled: a 1, b 1, c 0; lexical q1 all equal: each 1.0 (not a division by 0)
    assert minmax["q1"] == pytest.approx({"a": 3.0, "b": 3.0, "c": 0.0})
    assert list(minmax["q1"]) == ["b", "a", "c"]
    assert minmax["q2"] == pytest.approx({"x": 2.0}) and minmax["q3"] == {}
    with pytest.raises(ValueError, match="1 weights for 2 runs"):
        evaluation.fuse_runs([dense, lexical], weights=[1.0])
    with pytest.raises(ValueError, match="'sum'; choose one of rrf, minmax$"):
        evaluation.fuse_runs([dense, lexical], "sum")


def test_fusion_defaults_are_the_papers_k_and_a_top_100():
    """Called with no settings: reciprocal-rank fusion with Cormack et al.'s k = 60, each
    query's list cut to its top 100 (by hand: 150 documents in one run, ranks 1..150)."""
    run = {"q": {f"d{i:03d}": 150.0 - i for i in range(150)}}
    fused = evaluation.fuse_runs([run])["q"]
    assert len(fused) == 100 and list(fused)[:2] == ["d000", "d001"]
    assert fused["d000"] == pytest.approx(1 / 61) and fused["d099"] == pytest.approx(1 / 160)
