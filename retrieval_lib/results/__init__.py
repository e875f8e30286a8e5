"""Results: run folders (their one owner), C-MTEB through mteb, report tables, baselines (BM25,
BGE-M3, hybrid) and the cross-encoder reranker.

Modules, each importing only those before it: ``runs``, ``cmteb``, ``tables``, ``baselines``,
``reranker``.
"""

from .runs import (
    collect_runs, default_output_dir, environment_info, git_commit, load_run, load_summary,
    metrics_block, record_not_run, run_dir, RunError, runs_root, save_baseline_run, save_summary,
    scores_from_block, write_json_files, write_run
)
from .cmteb import (
    AGREEMENT_METRICS, CMTEB_FILE, CMTEB_RETRIEVAL, cmteb_table, evaluate_mteb, IN_DOMAIN,
    local_retrieval_task, mteb_agreement, MtebRetriever, write_retrieval_folder
)
from .tables import (
    KEY_FIGURES, PUBLISHED_RESULTS, data_scaling_groups, efficiency_points, markdown_table,
    reference_system, report_sources, report_table, save_benchmark, system_summaries,
    write_between_markers, write_markdown_report
)
from .baselines import (
    BGE_M3, BGE_M3_MODES, FUSION_WEIGHTS, HYBRID_WEIGHTS, best_dense_run, bge_m3_available,
    bge_m3_baseline, BGEM3Retriever, bm25_baseline, bm25_run, choose_fusion, colbert_score,
    evaluate_bge_m3, evaluate_bm25, hybrid_baseline, lexical_score
)
from .reranker import (
    PUBLISHED_RERANKER, CrossEncoderReranker, listwise_loss, load_trained, pair_tokens,
    RandomScores, rerank_run, rerank_split, RerankCollator, reranker_is_trained, train_reranker
)

__all__ = [
    "environment_info", "default_output_dir", "save_summary", "load_summary", "metrics_block",
    "scores_from_block", "run_dir", "write_run", "load_run", "RunError", "runs_root",
    "save_baseline_run", "record_not_run", "collect_runs", "write_json_files",
    "git_commit", "CMTEB_RETRIEVAL", "IN_DOMAIN", "CMTEB_FILE", "MtebRetriever",
    "evaluate_mteb", "write_retrieval_folder", "local_retrieval_task", "AGREEMENT_METRICS",
    "mteb_agreement", "cmteb_table",
    "reference_system", "report_table", "markdown_table", "write_markdown_report",
    "report_sources", "KEY_FIGURES",
    "write_between_markers", "save_benchmark", "system_summaries", "efficiency_points",
    "data_scaling_groups", "PUBLISHED_RESULTS", "bm25_run", "evaluate_bm25", "BGE_M3",
    "HYBRID_WEIGHTS", "BGE_M3_MODES", "lexical_score", "colbert_score", "bge_m3_available",
    "BGEM3Retriever", "evaluate_bge_m3", "bm25_baseline", "bge_m3_baseline", "best_dense_run",
    "FUSION_WEIGHTS", "choose_fusion", "hybrid_baseline", "PUBLISHED_RERANKER", "pair_tokens",
    "CrossEncoderReranker", "RandomScores", "listwise_loss", "RerankCollator", "rerank_run",
    "rerank_split", "train_reranker", "reranker_is_trained", "load_trained"
]
