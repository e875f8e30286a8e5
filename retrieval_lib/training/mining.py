"""Hard-negative mining, static (once, with BM25 or a retriever) and dynamic (ANCE-style: again
with the model being trained, every few epochs).

For each record the searcher ranks the mining corpus; negatives are drawn at random from the
ranks ``rank_range`` (0-based, end excluded; 10–210 by default, as FlagEmbedding's miner
does, which skips the very top where unlabelled positives crowd), never a positive, and — with
``margin`` set — never a candidate scoring above ``score(positive) − margin`` (the false-negative
filter). The report counts everything, including the false-negative rate proxy: the share of the
candidates in the rank range that outscore the record's positive.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.splits import corpus_of
from ..evaluation.search import exact_search
from ..settings.config import SEED, TrainingConfig
from ..settings.distributed import is_main

__all__ = ["DenseSearcher", "mine_hard_negatives", "RANK_RANGE", "remine_epoch"]

#: Ranks from which negatives are drawn (0-based, end excluded).
RANK_RANGE = (10, 210)


class DenseSearcher:
    """Exact inner-product search of a :class:`~retrieval_lib.models.retriever.DualTowerRetriever`
    over a fixed corpus, with the interface of
    :class:`~retrieval_lib.data.bm25.BM25Retriever` (``search`` and ``scores``)."""

    def __init__(self, model, corpus: Sequence[str], batch_size: int = 32):
        self.model = model
        self.passages = model.encode_passages(list(corpus), batch_size=batch_size)
        self._queries: dict[str, np.ndarray] = {}

    def _query(self, query: str) -> np.ndarray:
        if query not in self._queries:
            self._queries[query] = self.model.encode_queries([query])[0]
        return self._queries[query]

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[tuple[int, float]]]:
        embedded = self.model.encode_queries(list(queries))
        self._queries.update(zip(queries, embedded, strict=True))
        scores, indices = exact_search(embedded, self.passages, min(k, len(self.passages)))
        return [[(int(j), float(s)) for s, j in zip(row_s, row_i, strict=True) if j >= 0]
                for row_s, row_i in zip(scores, indices, strict=True)]

    def scores(self, query: str, indices: Sequence[int]) -> list[float]:
        return (self.passages[list(indices)] @ self._query(query)).tolist()


def mine_hard_negatives(records: Sequence[dict], corpus: Sequence[str], searcher,
                        num_negatives: int = 7, rank_range: tuple[int, int] = RANK_RANGE,
                        margin: float | None = None, seed: int = SEED
                        ) -> tuple[list[dict], dict]:
    """Records with new ``negative_passages`` mined from ``corpus`` by ``searcher`` (a
    :class:`DenseSearcher` or a :class:`~retrieval_lib.data.bm25.BM25Retriever`), and the
    report (see the module docstring). Records keep everything else."""
    lo, hi = rank_range
    if not 0 <= lo < hi:
        raise ValueError(f"rank_range must be 0 <= start < end, got {rank_range}")
    index_of = {text: i for i, text in enumerate(corpus)}
    rng = random.Random(seed)
    queries = [r["query"] for r in records]
    ranked = searcher.search(queries, k=hi + max(len(r["positive_passages"]) for r in records))
    report = {"records": len(records), "rank_range": [lo, hi], "margin": margin,
              "candidates": 0, "positives_excluded": 0, "outrank_positive": 0,
              "filtered_by_margin": 0, "short_records": 0, "negatives": 0}
    mined = []
    for record, hits in zip(records, ranked, strict=True):
        positives = {p["text"] for p in record["positive_passages"]}
        positive_ids = [index_of[t] for t in positives if t in index_of]
        pos_score = max(searcher.scores(record["query"], positive_ids)) if positive_ids else None
        candidates = []
        for rank, (j, score) in enumerate(hits):
            if corpus[j] in positives:
                report["positives_excluded"] += 1
                continue
            if rank < lo or rank >= hi:
                continue
            report["candidates"] += 1
            if pos_score is not None and score > pos_score:
                report["outrank_positive"] += 1
            if margin is not None and pos_score is not None and score > pos_score - margin:
                report["filtered_by_margin"] += 1
                continue
            candidates.append(j)
        chosen = rng.sample(candidates, min(num_negatives, len(candidates)))
        if len(chosen) < num_negatives:
            report["short_records"] += 1
        report["negatives"] += len(chosen)
        mined.append({**record, "negative_passages": [{"text": corpus[j]} for j in chosen]})
    report["false_negative_rate"] = (report["outrank_positive"] / report["candidates"]
                                     if report["candidates"] else 0.0)
    return mined, report


def remine_epoch(model, train, cfg: TrainingConfig, epoch: int, folder: Path, reuse: bool):
    """The training records with negatives mined by the current model (ANCE-style), and the
    mining report. Mined negatives are saved as corpus indices to ``folder/epoch-<epoch as 3
    digits>.json`` (e.g. ``epoch-002.json``) so that a resumed run trains on the same ones
    (``reuse``: read them when present)."""
    corpus = corpus_of(train)
    path = folder / f"epoch-{epoch:03d}.json"
    if reuse and path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        rows = [{**row, "negative_passages": [{"text": corpus[j]} for j in ids]}
                for row, ids in zip(train, saved["negatives"], strict=True)]
        return rows, saved["report"]
    rows, report = mine_hard_negatives(
        list(train), corpus, DenseSearcher(model, corpus), cfg.mining_negatives,
        tuple(cfg.mining_rank_range), cfg.mining_margin, seed=cfg.seed + epoch)
    if is_main():
        index_of = {text: i for i, text in enumerate(corpus)}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"report": report, "negatives": [
            [index_of[n["text"]] for n in row["negative_passages"]] for row in rows]}),
            encoding="utf-8")
        tmp.replace(path)
    return rows, report
