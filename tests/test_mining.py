import json

import numpy as np
import pytest
from datasets import Dataset
from toy import toy_config, toy_model, toy_records

from retrieval_lib import training
from retrieval_lib.data import BM25Retriever, corpus_of
from retrieval_lib.training import mining


class ListSearcher:
    """A searcher with a fixed ranking: corpus index i scores ``score_of[i]``."""

    def __init__(self, score_of):
        self.score_of = score_of

    def search(self, queries, k=10):
        order = sorted(self.score_of, key=lambda i: -self.score_of[i])[:k]
        return [[(i, self.score_of[i]) for i in order] for _ in queries]

    def scores(self, query, indices):
        return [self.score_of[i] for i in indices]


CORPUS = [f"文档{i}" for i in range(10)]
# ranks (0-based): 0:d9 1:d8 2:d7 (the positive) 3:d6 ... 9:d0
SCORES = {i: float(i) for i in range(10)}
RECORD = {"query": "查询", "positive_passages": [{"text": "文档7"}],
          "negative_passages": [{"text": "旧的负例"}], "source": "toy"}


def test_mining_takes_the_rank_range_and_never_a_positive():
    (rec,), report = mining.mine_hard_negatives([RECORD], CORPUS, ListSearcher(SCORES),
                                                num_negatives=10, rank_range=(1, 5), seed=0)
    # ranks 1..4 are d8, d7 (positive: excluded), d6, d5
    assert sorted(n["text"] for n in rec["negative_passages"]) == ["文档5", "文档6", "文档8"]
    assert rec["query"] == "查询" and rec["positive_passages"] == RECORD["positive_passages"]
    assert report["candidates"] == 3 and report["positives_excluded"] == 1
    assert report["outrank_positive"] == 1  # d8 scores 8 > 7
    assert report["false_negative_rate"] == pytest.approx(1 / 3)
    assert report["short_records"] == 1 and report["negatives"] == 3


def test_the_margin_filter_drops_candidates_too_close_to_the_positive():
    (rec,), report = mining.mine_hard_negatives([RECORD], CORPUS, ListSearcher(SCORES),
                                                num_negatives=2, rank_range=(0, 10),
                                                margin=1.5, seed=0)
    # positive scores 7: anything above 5.5 goes (d9, d8, d6); d5 and below stay
    kept = {n["text"] for n in rec["negative_passages"]}
    assert len(kept) == 2 and kept <= {f"文档{i}" for i in range(6)}
    assert report["filtered_by_margin"] == 3 and report["outrank_positive"] == 2
    assert report["short_records"] == 0


def test_bm25_mining_on_real_text_respects_ranks(tok):
    records = toy_records(30, 4)
    corpus = corpus_of(records)
    bm25 = BM25Retriever(corpus)
    mined, report = mining.mine_hard_negatives(records, corpus, bm25, num_negatives=3,
                                               rank_range=(2, 12), seed=1)
    for rec, hits in zip(mined, bm25.search([r["query"] for r in records], k=13), strict=True):
        allowed = {corpus[j] for j, _ in hits[2:12]}
        texts = [n["text"] for n in rec["negative_passages"]]
        assert set(texts) <= allowed
        assert rec["positive_passages"][0]["text"] not in texts
    assert report["records"] == 30
    # BM25 ranks each toy positive (it repeats the query's words) above every candidate
    assert report["false_negative_rate"] == 0 and report["candidates"] > 0


def test_the_false_negative_rate_recounts_by_hand(tok):
    """Of the candidates in the rank range (positives excluded), the share scoring above the
    record's positive, recounted from an independent float64 score matrix; an untrained model
    ranks positives anywhere, so the share is neither 0 nor 1."""
    model, records = toy_model(tok), toy_records(30, 4)
    corpus = corpus_of(records)
    _, report = mining.mine_hard_negatives(records, corpus, mining.DenseSearcher(model, corpus),
                                           num_negatives=3, rank_range=(2, 12), seed=1)
    sims = model.encode_queries([r["query"] for r in records]).astype(np.float64) @ \
        model.encode_passages(corpus).astype(np.float64).T
    outrank = candidates = 0
    for row, rec in zip(sims, records, strict=True):
        positive = corpus.index(rec["positive_passages"][0]["text"])
        for rank, j in enumerate(np.argsort(-row, kind="stable")[:13]):
            if j != positive and 2 <= rank < 12:
                candidates += 1
                outrank += row[j] > row[positive]
    assert report["candidates"] == candidates
    assert 0 < outrank < candidates
    assert report["false_negative_rate"] == pytest.approx(outrank / candidates)


def test_dense_searcher_is_exact_search(tok):
    model = toy_model(tok)
    records = toy_records(12, 5)
    corpus = corpus_of(records)
    searcher = mining.DenseSearcher(model, corpus)
    queries = [r["query"] for r in records[:3]]
    hits = searcher.search(queries, k=4)
    # an independent brute force in float64: every inner product, sorted
    sims = model.encode_queries(queries).astype(np.float64) @ \
        model.encode_passages(corpus).astype(np.float64).T
    indices = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    assert [[j for j, _ in row] for row in hits] == indices.tolist()
    assert np.allclose([[s for _, s in row] for row in hits],
                       np.take_along_axis(sims, indices, axis=1), atol=1e-6)
    assert searcher.scores(queries[0], [3, 0]) == pytest.approx(sims[0, [3, 0]], abs=1e-6)


def test_dynamic_mining_re_mines_with_the_trained_model_and_logs_it(tok, tmp_path):
    train, val = Dataset.from_list(toy_records(40, 2)), Dataset.from_list(toy_records(16, 3))
    cfg = toy_config(epochs=3, batch_size=8, remine_every=1, mining_negatives=3,
                     mining_rank_range=(1, 20))
    history = training.train_retriever(toy_model(tok), train, val, cfg, tmp_path,
                                       show_progress=False)
    assert [m["epoch"] for m in history["mining"]] == [2, 3]
    assert all(m["records"] == 40 and m["candidates"] > 0 for m in history["mining"])
    corpus = corpus_of(train)
    saved = json.loads((tmp_path / "negatives" / "epoch-003.json").read_text(encoding="utf-8"))
    for row, ids in zip(train, saved["negatives"], strict=True):
        assert len(ids) == 3
        assert row["positive_passages"][0]["text"] not in {corpus[j] for j in ids}
    assert saved["report"] == {k: v for k, v in history["mining"][1].items() if k != "epoch"}
