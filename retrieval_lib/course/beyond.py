"""Studies of ``03_beyond_the_report``, with the Chinese labels of their tables and figures.

* the options beyond the report (:func:`option_variants`, keyed by what each changes);
* documents longer than the window: one trained retriever scored by its first, best or summed
  windows (:func:`aggregation_study`);
* two-stage retrieval: a cross-encoder reranker over the dense and the BM25 top k
  (:func:`rerank_study`);
* CPU serving: the same retriever and reranker exported to ONNX, in fp32 and int8
  (:func:`serving_study`).

Runs come from :mod:`retrieval_lib.course.experiment` (rerankers from
:mod:`retrieval_lib.results.reranker`); nothing here trains except by calling them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.splits import Splits
from ..evaluation.metrics import (
    comparison_sentence,
    paired_test,
    rank_documents,
    score_run,
)
from ..evaluation.search import evaluate_embeddings, evaluate_retriever, qrels_for_split, retrieve
from ..models.base import count_parameters
from ..models.retriever import DualTowerRetriever
from ..results.baselines import bm25_run
from ..results.reranker import (
    PUBLISHED_RERANKER,
    CrossEncoderReranker,
    RandomScores,
    load_trained,
    rerank_split,
    reranker_is_trained,
    train_reranker,
)
from ..results.runs import (
    record_not_run,
    run_dir,
    save_baseline_run,
)
from ..serving.onnx_runtime import (
    OnnxReranker,
    OnnxRetriever,
    export_reranker_onnx,
    export_retriever_onnx,
)
from ..settings.config import (
    ExperimentConfig,
    RerankerConfig,
    variant,
)
from ..settings.hub import model_available
from ..training.optim import training_device

__all__ = ["OPTIONS_EXPERIMENT", "QUERY_INSTRUCTION", "OPTION_LABELS", "option_variants",
           "option_systems", "option_comparisons", "AGGREGATION_LABELS", "WINDOWED_LABEL",
           "windowed_variant", "aggregation_study", "RERANK_LABELS", "reranker_folder",
           "rerank_study", "SERVING_LABELS", "serving_study"]

# ---------------------------------------------------------------------------------------------
# Beyond the report (03_beyond_the_report): M3-style unified training, dynamic hard negatives
# and query instructions, each a variant of one experiment with its own run folder.
# ---------------------------------------------------------------------------------------------

#: The experiment whose variants ``03_beyond_the_report`` trains by default (4.1.1), and whose
#: variants the results notebook looks for.
OPTIONS_EXPERIMENT = "minimind27_10k"

#: Query instruction of the decoder-only ablation (the BGE family's Chinese retrieval prompt).
QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："


OPTION_LABELS = {"dense": "稠密（基线）", "m3": "统一训练（稠密+稀疏+多向量）",
                 "ance": "动态难负例（每轮重挖）", "last": "末位池化",
                 "last_instr": "末位池化 + 查询指令"}

#: Which option is compared with which (the paired tests): what each changes, against the run
#: that differs only in that.
_OPTION_PAIRS = (("m3", "dense"), ("ance", "dense"), ("last", "dense"), ("last_instr", "last"))


def option_variants(exp: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The options beyond the report as variants of ``exp``, keyed as :data:`OPTION_LABELS`
    (``exp`` itself, dense-only with static negatives, under ``dense``)."""
    return {
        "dense": exp,
        "m3": variant(exp, "m3", m3_heads=True),
        "ance": variant(exp, "ance", {"remine_every": 1}),
        "last": variant(exp, "last", pooling="last_token"),
        "last_instr": variant(exp, "last-instr", pooling="last_token",
                              query_instruction=QUERY_INSTRUCTION),
    }


def option_systems(runs: dict[str, dict]) -> dict[str, dict]:
    """Labelled test results of :func:`option_variants` runs (keyed the same way); a run with
    M3 heads adds its sparse, ColBERT and hybrid (rerank of the dense top 100) results."""
    systems = {}
    for key, run in runs.items():
        label = OPTION_LABELS[key]
        systems[label] = run["test"]
        for mode, result in (run.get("m3") or {}).items():
            if mode != "dense":
                systems[f"{label} · {mode}"] = result
    return systems


def option_comparisons(runs: dict[str, dict], metrics=("ndcg@10", "recall@100")
                       ) -> dict[str, dict]:
    """Paired randomisation tests of each option against what it changes: unified, dynamic
    and last-token against the dense baseline, the instruction against last-token without it,
    and the hybrid rerank against the same model's dense search. Keys say which minus which."""
    tests = {}
    for metric in metrics:
        for a, b in _OPTION_PAIRS:
            if a in runs and b in runs:
                tests[f"{OPTION_LABELS[a]} − {OPTION_LABELS[b]} · {metric}"] = paired_test(
                    runs[a]["test"]["per_query"][metric], runs[b]["test"]["per_query"][metric])
        m3 = runs.get("m3", {}).get("m3")
        if m3:
            tests[f"{OPTION_LABELS['m3']}：hybrid − dense · {metric}"] = paired_test(
                m3["hybrid"]["per_query"][metric], m3["dense"]["per_query"][metric])
    return tests


#: Labels of the passage aggregations (:mod:`retrieval_lib.evaluation.windows`) in tables and
#: figures.
AGGREGATION_LABELS = {"first": "FirstP（只读首个窗口）", "max": "MaxP（最佳窗口）",
                      "sum": "SumP（窗口得分之和）"}
#: Label of the run trained on random windows and searched with MaxP.
WINDOWED_LABEL = "MaxP，训练时读随机窗口"


def windowed_variant(exp: ExperimentConfig) -> ExperimentConfig:
    """``exp`` trained on a random window of each long positive and evaluated with MaxP (its
    own run folder, ``<name>-windows``): what MaxP gives when training saw more than the
    first window."""
    return variant(exp, "windows", {"positive_window": "random"}, passage_aggregation="max")


def aggregation_study(run: dict, split, stride: int | None = None,
                      metrics=("ndcg@5", "ndcg@10", "recall@100"), device=None,
                      windowed: dict | None = None) -> dict:
    """The trained retriever of ``run`` (its ``best`` folder) on ``split`` with each passage
    aggregation (FirstP, MaxP, SumP; windows ``stride`` tokens apart, default half a window),
    and the test result of ``windowed`` (the run of :func:`windowed_variant`) when given:
    ``{"results": {label: score_run result}, "windows": what was cut, "comparisons": paired
    tests of each against FirstP}``."""
    model = DualTowerRetriever.load(Path(run["out_dir"]) / "best", training_device(device))
    results = {AGGREGATION_LABELS[how]: evaluate_retriever(model, split, aggregation=how,
                                                           stride=stride)
               for how in AGGREGATION_LABELS}
    if windowed is not None:
        results[WINDOWED_LABEL] = windowed["test"]
    first = results[AGGREGATION_LABELS["first"]]
    comparisons = {f"{label} − {AGGREGATION_LABELS['first']} · {metric}": paired_test(
        result["per_query"][metric], first["per_query"][metric])
        for metric in metrics for label, result in results.items()
        if label != AGGREGATION_LABELS["first"]}
    return {"results": results, "windows": results[AGGREGATION_LABELS["max"]]["windows"],
            "comparisons": comparisons}


#: Where ``benchmarks/demo_ablation.py`` saves its results (in a checkout of the repository).
RERANK_LABELS = {"dense": ("稠密检索（第一阶段）", None),
                 "dense_rerank": ("稠密 → 交叉编码器重排", "rerank-dense"),
                 "bm25": ("BM25（第一阶段）", None),
                 "bm25_rerank": ("BM25 → 交叉编码器重排", "rerank-bm25"),
                 "bm25_random": ("BM25 → 随机打乱前 k 篇（参照）", None),
                 "published_dense": ("稠密 → bge-reranker-v2-m3", "rerank_published-dense"),
                 "published_bm25": ("BM25 → bge-reranker-v2-m3", "rerank_published-bm25")}

#: The paired tests of :func:`rerank_study`: (system, system it is compared with).
_RERANK_PAIRS = (("dense_rerank", "dense"), ("bm25_rerank", "bm25"), ("dense_rerank", "bm25"),
                 ("bm25_rerank", "bm25_random"),
                 ("bm25_rerank", "dense_rerank"), ("published_dense", "dense_rerank"),
                 ("published_bm25", "bm25_rerank"))


def reranker_folder(exp: ExperimentConfig) -> Path:
    """Where the reranker on ``exp``'s base model and training records is trained and kept:
    ``runs/<preset>/reranker_<experiment>`` (no ``metrics.json``: not a row of the tables)."""
    return run_dir(exp.preset, f"reranker_{exp.name}")


def _reranker(exp: ExperimentConfig, splits: Splits, cfg: RerankerConfig, device,
              show_progress: bool) -> tuple[CrossEncoderReranker, dict]:
    """The reranker of ``exp``: read back when its folder holds a finished training with these
    settings and records, else trained now. Says which."""
    folder, train = reranker_folder(exp), splits.subset(exp.subset)
    if reranker_is_trained(folder, cfg, exp.model.base_model, train):
        print(f"reranker: reusing the finished training in {folder}")
        return load_trained(folder, device)
    model = CrossEncoderReranker.from_base(exp.model, max_length=cfg.max_length, seed=cfg.seed)
    history = train_reranker(model, train, splits.validation, cfg, folder,
                             base=exp.model.base_model, device=device,
                             show_progress=show_progress)
    return model, history


def rerank_study(exp: ExperimentConfig, splits: Splits, dense_run: dict, cfg: RerankerConfig,
                 published: str = "", device=None, show_progress: bool = False,
                 metrics=("ndcg@5", "ndcg@10", "mrr")) -> dict:
    """Two-stage retrieval on the test set of ``splits``.

    A cross-encoder on ``exp``'s base model, trained on ``exp``'s records and hard negatives
    (:func:`~retrieval_lib.results.reranker.train_reranker`; reused when already trained), reorders
    the top ``cfg.top_k`` of two first stages: the retriever of ``dense_run`` (its ``best``
    folder) and BM25, each retrieving the top 100. ``published`` (a local folder or a hub id,
    e.g. :data:`~retrieval_lib.results.reranker.PUBLISHED_RERANKER`; empty: not run) reranks the
    same two first stages when it can be loaded; otherwise it is recorded as not run. BM25's top k
    shuffled at random (:class:`~retrieval_lib.results.reranker.RandomScores`) is the reference a
    reranker that learned something beats.

    The reranked systems are saved as baseline runs (``rerank-dense``, ``rerank-bm25``, and
    ``rerank_published-*``), so the results notebook lists them. Returns ``{"results": {label:
    score_run result}, "comparisons": paired tests (keys say which minus which),
    "sentences": what the tests on the first metric say, "history": the reranker's
    training, "top_k", "published": "done" / the reason}``.
    """
    device = training_device(device)
    reranker, history = _reranker(exp, splits, cfg, device, show_progress)
    dense_model = DualTowerRetriever.load(Path(dense_run["out_dir"]) / "best", device)
    qrels, dense, _ = retrieve(dense_model, splits.test, 100)
    _, lexical, _ = bm25_run(splits.test, 100)
    first = {"dense": dense, "bm25": lexical}
    results = {}
    for key in ("dense", "bm25"):
        results[key] = score_run(qrels, first[key])
        results[f"{key}_rerank"] = rerank_split(reranker, splits.test, first[key], cfg.top_k)
    # what a reranker that learned nothing gives: BM25's top k shuffled
    results["bm25_random"] = rerank_split(RandomScores(cfg.seed), splits.test, lexical,
                                          cfg.top_k)
    status = "not asked for"
    if published and model_available(published):
        other = CrossEncoderReranker.load(published, device)
        for key in ("dense", "bm25"):
            results[f"published_{key}"] = rerank_split(other, splits.test, first[key],
                                                       cfg.top_k)
        status = "done"
    elif published:
        status = f"{published!r} is neither a local folder nor reachable on the hub"
        for key in ("published_dense", "published_bm25"):  # no stale numbers stay behind
            record_not_run(RERANK_LABELS[key][1], exp.preset, status,
                           f"download {PUBLISHED_RERANKER} (huggingface-cli download "
                           f"{PUBLISHED_RERANKER} --local-dir DIR) and pass its folder as "
                           f"`published_reranker`")
    for key, result in results.items():
        label, name = RERANK_LABELS[key]
        if name is None:
            continue
        own = key in ("dense_rerank", "bm25_rerank")
        save_baseline_run(name, {k: v for k, v in result.items() if k != "run"}, exp.preset, {
            "title": label, "model_name": "reranker",
            "reranker": str(reranker_folder(exp) / "best") if own else published,
            "first_stage": "BM25" if key.endswith("bm25") else exp.title,
            "dense_run": Path(dense_run["out_dir"]).name, "top_k": cfg.top_k,
            "parameters": count_parameters(reranker if own else other)})
    comparisons = {f"{RERANK_LABELS[a][0]} − {RERANK_LABELS[b][0]} · {metric}": paired_test(
        results[a]["per_query"][metric], results[b]["per_query"][metric])
        for metric in metrics for a, b in _RERANK_PAIRS if a in results and b in results}
    sentences = [comparison_sentence(RERANK_LABELS[a][0], RERANK_LABELS[b][0],
                                     comparisons[f"{RERANK_LABELS[a][0]} − {RERANK_LABELS[b][0]}"
                                                 f" · {metrics[0]}"], metrics[0].upper())
                 for a, b in _RERANK_PAIRS if a in results and b in results]
    return {"results": {RERANK_LABELS[k][0]: r for k, r in results.items()},
            "comparisons": comparisons, "sentences": sentences, "history": history,
            "top_k": cfg.top_k, "published": status}


# ---------------------------------------------------------------------------------------------
# CPU serving: ONNX in fp32 and int8 against PyTorch.
# ---------------------------------------------------------------------------------------------

#: Labels of the systems of :func:`serving_study`, by how the model runs.
SERVING_LABELS = {"torch": "PyTorch（fp32）", "onnx": "ONNX Runtime（fp32）",
                  "int8": "ONNX Runtime（int8 动态量化）"}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def serving_study(exp: ExperimentConfig, splits: Splits, dense_run: dict, cfg: RerankerConfig,
                  metrics=("ndcg@5", "ndcg@10", "mrr")) -> dict:
    """The retriever of ``dense_run`` and the reranker of :func:`rerank_study` (trained
    already with ``cfg``; it reorders BM25's top ``cfg.top_k`` here too) exported to ONNX
    (``onnx/`` in their folders, fp32 and int8) and run by onnxruntime on the test set of
    ``splits``.

    Returns ``{"results": {label: score_run result}`` (the retriever alone: PyTorch, ONNX fp32,
    ONNX int8), ``"vectors"``: the cosine of each ONNX vector with the PyTorch one over the
    test queries and documents (min, mean), ``"seconds"``: wall time to encode the test
    corpus with each, ``"reranker"``: the largest score difference over the pairs of
    reranking BM25's top k and the reranked NDCG@5 of each, ``"comparisons"``: paired tests
    of each ONNX run against PyTorch}``."""
    device = torch.device("cpu")  # CPU serving: every contender on the CPU
    model = DualTowerRetriever.load(Path(dense_run["out_dir"]) / "best", device)
    folder = export_retriever_onnx(model, Path(dense_run["out_dir"]) / "onnx", quantize=True)
    contenders = {"torch": model, "onnx": OnnxRetriever(folder),
                  "int8": OnnxRetriever(folder, quantized=True)}
    query_ids, queries, qrels, corpus = qrels_for_split(splits.test)
    results, seconds, vectors = {}, {}, {}
    for key, contender in contenders.items():
        (q, p), seconds[key] = _timed(lambda c=contender: (c.encode_queries(queries),
                                                           c.encode_passages(corpus)))
        vectors[key] = (q, p)
        results[key] = evaluate_embeddings(q, p, query_ids, qrels)
    agreement = {}
    for key in ("onnx", "int8"):
        cos = np.concatenate([np.sum(a * b, axis=1) for a, b in
                              zip(vectors[key], vectors["torch"], strict=True)])
        agreement[key] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    # the reranker: PyTorch, ONNX fp32 and int8 on BM25's top k of the test queries
    folder_of_reranker = reranker_folder(exp)
    reranker, _ = load_trained(folder_of_reranker, device)
    rr_folder = export_reranker_onnx(reranker, folder_of_reranker / "onnx", quantize=True)
    top_k = cfg.top_k
    _, first, _ = bm25_run(splits.test, top_k)
    rerankers = {"torch": reranker, "onnx": OnnxReranker(rr_folder),
                 "int8": OnnxReranker(rr_folder, quantized=True)}
    reranked = {key: rerank_split(r, splits.test, first, top_k) for key, r in rerankers.items()}
    scores = {key: np.array([s for qid in first for s in (r["run"][qid][d] for d in
                                                             rank_documents(first[qid]))])
              for key, r in reranked.items()}
    reranker_info = {SERVING_LABELS[key]: {
        "largest_score_difference": float(np.abs(scores[key] - scores["torch"]).max()),
        "ndcg@5": r["aggregate"]["ndcg@5"]["mean"]} for key, r in reranked.items()}
    comparisons = {f"{SERVING_LABELS[key]} − {SERVING_LABELS['torch']} · {metric}": paired_test(
        results[key]["per_query"][metric], results["torch"]["per_query"][metric])
        for metric in metrics for key in ("onnx", "int8")}
    comparisons.update({f"重排器 {SERVING_LABELS['int8']} − {SERVING_LABELS['torch']} · "
                        f"{metric}": paired_test(reranked["int8"]["per_query"][metric],
                                                 reranked["torch"]["per_query"][metric])
                        for metric in metrics})
    return {"results": {SERVING_LABELS[k]: r for k, r in results.items()},
            "vectors": {SERVING_LABELS[k]: v for k, v in agreement.items()},
            "seconds": {SERVING_LABELS[k]: v for k, v in seconds.items()},
            "texts": len(queries) + len(corpus), "reranker": reranker_info,
            "comparisons": comparisons}
