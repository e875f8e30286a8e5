"""Evaluation: windows of long documents, trec_eval metrics with intervals and paired tests,
exact search and fusion.

Modules, each importing only those before it: ``windows``, ``metrics``, ``search``.
"""

from .windows import (
    AGGREGATIONS, POSITIVE_WINDOWS, aggregate_scores, search_documents, split_windows,
    window_stride, window_table, window_tokens, Windows
)
from .metrics import (
    HEADLINE_METRICS, REPORT_METRICS, aggregate, bootstrap_ci, comparison_sentence,
    metrics_table, paired_test, rank_documents, score_run, significant, std_from_mean_table,
    summarize_metrics, summarize_systems, two_valued_std
)
from .search import (
    FUSIONS, evaluate_embeddings, evaluate_retriever, exact_search, fuse_runs, qrels_for_split,
    retrieve, run_from_search
)

__all__ = [
    "AGGREGATIONS", "POSITIVE_WINDOWS", "Windows", "window_tokens", "window_stride",
    "split_windows", "aggregate_scores", "search_documents", "window_table", "REPORT_METRICS",
    "HEADLINE_METRICS", "rank_documents", "score_run", "aggregate", "bootstrap_ci",
    "paired_test", "summarize_metrics", "summarize_systems", "metrics_table", "two_valued_std",
    "std_from_mean_table", "significant", "comparison_sentence", "exact_search",
    "run_from_search", "qrels_for_split", "evaluate_embeddings", "retrieve",
    "evaluate_retriever", "FUSIONS", "fuse_runs"
]
