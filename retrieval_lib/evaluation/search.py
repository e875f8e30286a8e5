"""Search: exact inner-product top k with faiss, runs and qrels of a split, a retriever
evaluated end to end (windows of long documents included), and the fusion of runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.splits import corpus_of
from .metrics import Qrels, Run, rank_documents, score_run
from .windows import search_documents, split_windows, window_tokens

__all__ = ["exact_search", "run_from_search", "qrels_for_split", "evaluate_embeddings", "retrieve",
           "evaluate_retriever", "FUSIONS", "fuse_runs"]

# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def exact_search(query_embeddings: np.ndarray, passage_embeddings: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with faiss ``IndexFlatIP``: ``(scores, indices)``."""
    import faiss

    passages = np.ascontiguousarray(passage_embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(passages.shape[1])
    index.add(passages)
    return index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32),
                        min(k, len(passages)))


def run_from_search(query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray,
                    indices: np.ndarray) -> dict[str, dict[str, float]]:
    return {qid: {doc_ids[j]: float(s) for s, j in zip(row_s, row_i, strict=True) if j >= 0}
            for qid, row_s, row_i in zip(query_ids, scores, indices, strict=True)}


def qrels_for_split(split) -> tuple[list[str], list[str], dict, list[str]]:
    """Queries, corpus and qrels of a split: every passage of the split, deduplicated by text.

    Returns ``(query_ids, queries, qrels, corpus)``: query ``q{i}`` is row i; document ``d{j}``
    is ``corpus[j]``; each query's positives have grade 1.
    """
    corpus = corpus_of(split)
    doc_id = {text: f"d{j}" for j, text in enumerate(corpus)}
    query_ids, queries, qrels = [], [], {}
    for i, row in enumerate(split):
        qid = f"q{i}"
        query_ids.append(qid)
        queries.append(row["query"])
        qrels[qid] = {doc_id[p["text"]]: 1 for p in row["positive_passages"]}
    return query_ids, queries, qrels, corpus


def evaluate_embeddings(query_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                        query_ids: Sequence[str], qrels: Qrels, ks: Sequence[int] = (5, 10, 100),
                        top_k: int = 100) -> dict:
    """Exact search of every query over the corpus, then :func:`score_run`."""
    scores, indices = exact_search(query_embeddings, passage_embeddings, top_k)
    doc_ids = [f"d{j}" for j in range(len(passage_embeddings))]
    return score_run(qrels, run_from_search(query_ids, doc_ids, scores, indices), ks)


def retrieve(model, split, top_k: int = 100, batch_size: int = 32,
             aggregation: str | None = None, stride: int | None = None
             ) -> tuple[dict, dict, dict]:
    """The top-``top_k`` run of ``model`` over the split's deduplicated passage corpus:
    ``(qrels, run, info)`` (as :func:`qrels_for_split` numbers queries and documents; ``info``
    has ``corpus_size`` and, for windowed aggregations, ``windows``). ``aggregation`` and
    ``stride`` as in :func:`evaluate_retriever`."""
    aggregation = aggregation or getattr(model, "passage_aggregation", "first")
    query_ids, queries, qrels, corpus = qrels_for_split(split)
    doc_ids = [f"d{j}" for j in range(len(corpus))]
    q = model.encode_queries(queries, batch_size=batch_size)
    info: dict = {"corpus_size": len(corpus)}
    if aggregation == "first":
        p = model.encode_passages(corpus, batch_size=batch_size)
        scores, indices = exact_search(q, p, top_k)
    else:
        windows = split_windows(corpus, model.tokenizer, window_tokens(model),
                                stride or getattr(model, "passage_stride", None))
        p = model.encode_passages(windows.texts, batch_size=batch_size)
        scores, indices = search_documents(q, p, windows.owners, aggregation, top_k)
        info["windows"] = {"aggregation": aggregation, "size": windows.size,
                           "stride": windows.stride, "windows": len(windows.texts),
                           "split_documents": windows.split_documents()}
    return qrels, run_from_search(query_ids, doc_ids, scores, indices), info


def evaluate_retriever(model, split, ks: Sequence[int] = (5, 10, 100), top_k: int = 100,
                       batch_size: int = 32, aggregation: str | None = None,
                       stride: int | None = None) -> dict:
    """Encode the split's queries and its deduplicated passage corpus, search, score.

    The corpus is every passage of the split (positives and hard negatives); a model must find
    each query's positive among all of them. ``aggregation`` (default: the model's
    ``passage_aggregation``, ``first`` when it has none) says how a passage longer than the
    model's window is scored (:mod:`retrieval_lib.evaluation.windows`): ``first``, its first window
    (truncation); ``max`` / ``sum``, the best / the sum of its overlapping windows, ``stride``
    tokens apart (default: the model's ``passage_stride``, else half a window). Windowed
    results say what was cut under ``"windows"``.
    """
    qrels, run, info = retrieve(model, split, top_k, batch_size, aggregation, stride)
    return {**score_run(qrels, run, ks), **info}


#: How :func:`fuse_runs` combines the runs of several retrievers.
FUSIONS = ("rrf", "minmax")


def fuse_runs(runs: Sequence[Run], how: str = "rrf", k: int = 60,
              weights: Sequence[float] | None = None, depth: int = 100) -> dict:
    """One run from several runs of the same queries (hybrid retrieval), top ``depth`` per
    query. ``rrf``, reciprocal-rank fusion (Cormack, Clarke & Büttcher, 2009): a document
    scores the sum over runs of ``w / (k + rank)``, its rank from 1 in each run (in
    :func:`rank_documents` order); ``minmax``: the sum of ``w`` times its score scaled to
    [0, 1] within each run's list for the query. A run that does not list a document adds 0."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}; choose one of {', '.join(FUSIONS)}")
    weights = list(weights) if weights is not None else [1.0] * len(runs)
    if len(weights) != len(runs):
        raise ValueError(f"{len(weights)} weights for {len(runs)} runs")
    fused: dict[str, dict[str, float]] = {}
    for run, w in zip(runs, weights, strict=True):
        for qid, scores in run.items():
            out = fused.setdefault(qid, {})
            if how == "rrf":
                for rank, doc in enumerate(rank_documents(scores), start=1):
                    out[doc] = out.get(doc, 0.0) + w / (k + rank)
            elif scores:
                low, high = min(scores.values()), max(scores.values())
                for doc, s in scores.items():
                    scaled = (s - low) / (high - low) if high > low else 1.0
                    out[doc] = out.get(doc, 0.0) + w * scaled
    return {qid: {d: scores[d] for d in rank_documents(scores)[:depth]}
            for qid, scores in fused.items()}

