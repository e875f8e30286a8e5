"""Evaluation: exact search, trec_eval-compatible metrics, mean ± std, CIs and paired tests.

Metric definitions follow trec_eval (checked against pytrec_eval in the tests):

* ``precision@k``: relevant documents in the top k, divided by k;
* ``recall@k``: relevant documents in the top k, divided by all relevant documents of the query;
* ``ndcg@k``: DCG with linear gain (the grade) and log2 discount, over the ideal DCG of the
  query's judged grades;
* ``mrr``: reciprocal rank of the first relevant document in the whole ranked list
  (``mrr@k``: 0 when it is below rank k).

A document is relevant when its grade is > 0. Ranked lists are sorted by score, ties broken by
document id in descending order, as trec_eval does. Every query of ``qrels`` is scored; a query
missing from the run scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["REPORT_METRICS", "HEADLINE_METRICS", "rank_documents", "score_run", "aggregate",
           "bootstrap_ci", "paired_test", "summarize_metrics", "summarize_systems",
           "metrics_table", "two_valued_std", "std_from_mean_table", "significant",
           "comparison_sentence"]

REPORT_METRICS = ("recall@5", "precision@5", "ndcg@5", "mrr", "recall@10", "ndcg@10",
                  "recall@100")
HEADLINE_METRICS = REPORT_METRICS[:4]

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Document ids by descending score; ties by descending id (trec_eval's order)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _query_metrics(judged: Mapping[str, int], scores: Mapping[str, float],
                   ks: Sequence[int]) -> dict[str, float]:
    ranking = rank_documents(scores)
    relevant = {d for d, g in judged.items() if g > 0}
    gains = [max(judged.get(d, 0), 0) for d in ranking]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    first = next((i for i, d in enumerate(ranking) if d in relevant), None)
    out = {"mrr": 0.0 if first is None else 1.0 / (first + 1)}
    for k in ks:
        hits = sum(1 for d in ranking[:k] if d in relevant)
        out[f"precision@{k}"] = hits / k
        out[f"recall@{k}"] = hits / len(relevant) if relevant else 0.0
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]) if g)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        out[f"ndcg@{k}"] = dcg / idcg if idcg else 0.0
        out[f"mrr@{k}"] = out["mrr"] if first is not None and first < k else 0.0
    return out


def score_run(qrels: Qrels, run: Run, ks: Sequence[int] = (5, 10, 100)) -> dict:
    """Per-query values and aggregates of every metric for a trec-style run.

    Returns ``{"per_query": {metric: {qid: value}}, "aggregate": {metric: {"mean", "std",
    "n"}}}`` over all queries of ``qrels``.

    >>> r = score_run({"q": {"a": 1, "b": 2}}, {"q": {"a": 0.9, "c": 0.8, "b": 0.1}}, ks=[2])
    >>> q = {m: v["q"] for m, v in r["per_query"].items()}
    >>> q["recall@2"], q["precision@2"], q["mrr"]
    (0.5, 0.5, 1.0)
    """
    per_query: dict[str, dict[str, float]] = {}
    for qid in sorted(qrels):
        for metric, value in _query_metrics(qrels[qid], run.get(qid, {}), ks).items():
            per_query.setdefault(metric, {})[qid] = value
    return {"per_query": per_query,
            "aggregate": {m: aggregate(list(v.values())) for m, v in per_query.items()}}


def aggregate(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1) over queries, as the report prints them."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def bootstrap_ci(values: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over queries."""
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_resamples, len(v)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_test(a: Mapping[str, float], b: Mapping[str, float], n_resamples: int = 10_000,
                seed: int = 0) -> dict[str, float]:
    """Two-sided paired randomisation (sign-flip) test of mean(a) − mean(b) on shared queries.

    Returns the mean difference, its bootstrap 95% CI and the p-value (with the +1 correction,
    so it is never exactly 0).
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two systems share no query")
    d = np.array([a[q] - b[q] for q in shared], dtype=float)
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, len(d)))
    extreme = int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    low, high = bootstrap_ci(d, seed=seed)
    return {"mean_difference": float(d.mean()), "ci_low": low, "ci_high": high,
            "p_value": (extreme + 1) / (n_resamples + 1), "n": len(d)}


def significant(test: Mapping[str, float], alpha: float = 0.05) -> bool:
    """A :func:`paired_test` says the two systems differ: p < ``alpha`` and the 95% CI of the
    difference excludes 0."""
    return test["p_value"] < alpha and (test["ci_low"] > 0 or test["ci_high"] < 0)


def comparison_sentence(a: str, b: str, test: Mapping[str, float], metric: str,
                        alpha: float = 0.05, split: str = "测试") -> str:
    """A sentence (Chinese, for the notebooks) that says what a :func:`paired_test` of ``a``
    minus ``b`` on ``metric`` found, with its figures: ``a`` is better or worse when p < alpha
    and the 95% CI of the difference excludes 0, else no difference shows on this ``split``
    (the queries' set: ``测试`` or ``验证``).
    """
    d, low, high, p = (test["mean_difference"], test["ci_low"], test["ci_high"],
                       test["p_value"])
    figures = f"（95% 置信区间 [{low:.4f}, {high:.4f}]，p = {p:.3g}）"
    where = f"在 {test['n']} 个{split}查询上，" if "n" in test else ""
    if significant(test, alpha):
        word, verdict = ("高", f"差异显著，{a}更好") if d > 0 else ("低", f"差异显著，{a}更差")
        return f"{where}{a}的 {metric} 比{b}{word} {abs(d):.4f}{figures}：{verdict}。"
    return (f"{where}{a}与{b}的 {metric} 之差为 {d:+.4f}{figures}：在这个{split}集上看不出"
            f"两者有差异。")


def summarize_metrics(result: dict, metrics: Sequence[str] | None = None, seed: int = 0):
    """A table (pandas) of mean, std and bootstrap 95% CI per metric."""
    import pandas as pd

    rows = []
    for metric in metrics or list(result["per_query"]):
        values = list(result["per_query"][metric].values())
        low, high = bootstrap_ci(values, seed=seed)
        agg = aggregate(values)
        rows.append({"metric": metric, "mean": agg["mean"], "std": agg["std"], "ci_low": low,
                     "ci_high": high, "n": agg["n"]})
    return pd.DataFrame(rows).set_index("metric")


def summarize_systems(results: Mapping[str, dict], metrics: Sequence[str] | None = None,
                      seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """``{system: {metric: {mean, std, ci_low, ci_high, n}}}`` for labelled ``score_run``
    results: what the bar charts and curves of :mod:`retrieval_lib.course` take."""
    return {label: summarize_metrics(result, metrics, seed).to_dict(orient="index")
            for label, result in results.items()}



def metrics_table(results: Mapping[str, dict], metrics: Sequence[str], seed: int = 0,
                  digits: int = 4):
    """A report table: one row per system, one "mean ± std [CI low, high]" cell per metric.

    ``results`` maps a system label to a :func:`score_run` result (or to the ``per_query`` part
    saved in a run's ``metrics.json``).
    """
    import pandas as pd

    rows = {}
    for label, result in results.items():
        per_query = result.get("per_query", result)
        row = {}
        for metric in metrics:
            values = list(per_query[metric].values())
            agg = aggregate(values)
            low, high = bootstrap_ci(values, seed=seed)
            row[metric] = (f"{agg['mean']:.{digits}f} ± {agg['std']:.{digits}f} "
                           f"[{low:.{digits}f}, {high:.{digits}f}]")
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def two_valued_std(values: Sequence[float]) -> float | None:
    """The sample std that the mean alone fixes when every value is 0 or one constant c.

    With one relevant passage per query, Recall@k is 0 or 1 and Precision@k is 0 or 1/k for
    every query: for values in {0, c} with mean m, the sample standard deviation is
    √(m(c − m) · n/(n − 1)), so a lower std says nothing beyond a lower (or higher) mean.
    None when the values take more than one non-zero value (NDCG, MRR).

    >>> round(two_valued_std([0, 1, 1, 0, 0]), 4), round(two_valued_std([0, 0.2, 0, 0]), 4)
    (0.5477, 0.1)
    >>> two_valued_std([0, 0.5, 1]) is None
    True
    """
    v = np.asarray(values, dtype=float)
    nonzero = set(v[v != 0].tolist())
    if len(nonzero) > 1 or len(v) < 2:
        return None
    c = nonzero.pop() if nonzero else 0.0
    m = float(v.mean())
    return float(np.sqrt(max(m * (c - m), 0.0) * len(v) / (len(v) - 1)))


def std_from_mean_table(results: Mapping[str, dict], metrics: Sequence[str]):
    """For each system and metric: the mean, the observed sample std and, for a two-valued
    metric, the std its mean alone implies (:func:`two_valued_std`); a table for the notebooks.
    """
    import pandas as pd

    rows = []
    for label, result in results.items():
        per_query = result.get("per_query", result)
        for metric in metrics:
            values = list(per_query[metric].values())
            agg = aggregate(values)
            implied = two_valued_std(values)
            rows.append({"system": label, "metric": metric, "mean": agg["mean"],
                         "std": agg["std"],
                         "std_from_mean": implied if implied is not None else float("nan")})
    return pd.DataFrame(rows).set_index(["system", "metric"])
