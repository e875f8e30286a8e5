"""BM25 and BGE-M3 on the shared evaluation path; BGE-M3 on a tiny random XLM-R built here."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from retrieval_lib import evaluation
from retrieval_lib.data import BM25Retriever, tokenizer
from retrieval_lib.results import baselines

DOCS = ["长江流域今年防汛形势严峻", "黄河下游引水灌溉", "足球联赛今天开幕", "新年音乐会在北京举行",
        "铁路春运客流创新高", "港口吞吐量稳步增长"]


def _split():
    rows = []
    for query, doc in [("长江防汛", 0), ("足球联赛", 2), ("新年音乐会", 3), ("铁路春运", 4)]:
        negatives = [DOCS[(doc + 1) % len(DOCS)], DOCS[(doc + 3) % len(DOCS)]]
        rows.append({"query": query, "source": "toy", "positive_passages": [{"text": DOCS[doc]}],
                     "negative_passages": [{"text": t} for t in negatives]})
    return Dataset.from_list(rows)


def test_bm25_is_scored_on_the_same_corpus_and_qrels_as_dense_models():
    split = _split()
    result = baselines.evaluate_bm25(split, ks=(1, 5))
    query_ids, queries, qrels, corpus = evaluation.qrels_for_split(split)
    assert result["corpus_size"] == len(corpus) == 6
    # by hand: every query shares words only with its own positive, so BM25 ranks it first
    hits = BM25Retriever(corpus).search(queries, k=1)
    for qid, row in zip(query_ids, hits, strict=True):
        assert set(qrels[qid]) == {f"d{row[0][0]}"}
    assert result["aggregate"]["recall@1"]["mean"] == result["aggregate"]["mrr"]["mean"] == 1.0


@pytest.fixture(scope="module")
def tiny_m3(tmp_path_factory):
    """A 2-layer XLM-R with random weights and random M3 heads, saved like BAAI/bge-m3."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tmp_path_factory.mktemp("bge-m3-tiny")
    tok = tokenizer.train_bpe_tokenizer(DOCS * 3 + ["长江防汛", "足球联赛"], vocab_size=300)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=130, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    XLMRobertaModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(torch.nn.Linear(32, 1).state_dict(), folder / "sparse_linear.pt")
    torch.save(torch.nn.Linear(32, 32).state_dict(), folder / "colbert_linear.pt")
    return folder


def test_bge_m3_vectors_match_a_direct_computation(tiny_m3):
    m3 = baselines.BGEM3Retriever(str(tiny_m3), device="cpu")
    texts = ["长江长江流域", "足球", "新年音乐会在北京举行"]
    out = m3.encode(texts, batch_size=2, sparse=True, colbert=True)
    for i, text in enumerate(texts):  # one at a time, no padding: the same numbers
        ids = m3.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = m3.encoder(**ids).last_hidden_state[0]
            cls = torch.nn.functional.normalize(hidden[0], dim=-1).numpy()
            weights = torch.relu(m3.sparse_linear(hidden)).squeeze(-1).tolist()
            colbert = torch.nn.functional.normalize(m3.colbert_linear(hidden[1:]), dim=-1)
        np.testing.assert_allclose(out["dense"][i], cls, atol=1e-5)
        np.testing.assert_allclose(out["colbert"][i], colbert.numpy(), atol=1e-5)
        expected = {}
        for w, t in zip(weights, ids["input_ids"][0].tolist(), strict=True):
            if t not in m3.unused_tokens and w > 0:
                expected[t] = max(expected.get(t, 0.0), w)  # max over repeated tokens
        assert out["sparse"][i].keys() == expected.keys()
        for t, w in expected.items():
            assert out["sparse"][i][t] == pytest.approx(w, abs=1e-5)
    assert np.allclose(np.linalg.norm(out["dense"], axis=1), 1.0, atol=1e-5)


def test_bge_m3_modes_rerank_the_dense_candidates(tiny_m3):
    m3 = baselines.BGEM3Retriever(str(tiny_m3), device="cpu")
    split = _split()
    results = baselines.evaluate_bge_m3(m3, split, ks=(1, 5), top_k=3)
    assert set(results) == set(baselines.BGE_M3_MODES)
    assert all(r["corpus_size"] == 6 for r in results.values())
    # every query's hybrid ranking of its dense top 3, by hand from the encoded vectors (the
    # dense score as a float64 inner product), scored by the same trec-checked metrics
    query_ids, queries, qrels, corpus = evaluation.qrels_for_split(split)
    q = m3.encode(queries, sparse=True, colbert=True)
    p = m3.encode(corpus, sparse=True, colbert=True)
    dense = q["dense"].astype(np.float64) @ p["dense"].astype(np.float64).T
    # weights that let the sparse score reorder: the hybrid mode must differ from dense here
    w = (0.05, 1.0, 0.05)
    results["hybrid"] = baselines.evaluate_bge_m3(m3, split, ks=(1, 5), top_k=3,
                                                  modes=("hybrid",), weights=w)["hybrid"]
    run = {}
    for i, qid in enumerate(query_ids):
        top = np.argsort(-dense[i], kind="stable")[:3]
        run[qid] = {f"d{j}": w[0] * dense[i, j]
                    + w[1] * baselines.lexical_score(q["sparse"][i], p["sparse"][j])
                    + w[2] * baselines.colbert_score(q["colbert"][i], p["colbert"][j])
                    for j in top}
    by_hand = evaluation.score_run(qrels, run, ks=(1, 5))["per_query"]
    for metric in ("recall@1", "mrr", "ndcg@5"):
        assert results["hybrid"]["per_query"][metric] == pytest.approx(by_hand[metric]), metric
    # the reranking matters here: hybrid and dense order some query's top 3 differently
    assert any(sorted(run[qid], key=run[qid].get, reverse=True)
               != [f"d{j}" for j in np.argsort(-dense[i], kind="stable")[:3]]
               for i, qid in enumerate(query_ids))
    # reranking only reorders the dense top-k: recall at k=top_k is the same in every mode
    dense_r3 = baselines.evaluate_bge_m3(m3, split, ks=(3,), top_k=3)
    for mode in ("sparse", "colbert", "hybrid"):
        assert dense_r3[mode]["per_query"]["recall@3"] == dense_r3["dense"]["per_query"]["recall@3"]


def test_bge_m3_missing_heads_are_named(tiny_m3, tmp_path):
    import shutil

    folder = tmp_path / "no-heads"
    shutil.copytree(tiny_m3, folder)
    (folder / "colbert_linear.pt").unlink()
    with pytest.raises(FileNotFoundError, match="colbert_linear.pt is missing"):
        baselines.BGEM3Retriever(str(folder), device="cpu")
    dense_only = baselines.BGEM3Retriever(str(folder), heads=False, device="cpu")
    assert dense_only.encode(["足球"])["dense"].shape == (1, 32)
    with pytest.raises(ValueError, match="need the M3 heads"):
        dense_only.encode(["足球"], sparse=True)
    assert baselines.bge_m3_available(str(folder))
    assert not baselines.bge_m3_available(str(tmp_path / "nowhere"))


def test_the_baselines_are_saved_as_runs_the_report_table_reads(tiny_m3, tmp_path, capsys):
    """bm25_baseline and bge_m3_baseline save what they measured (each BGE-M3 mode its own run)
    where collect_runs finds it, with the same per-query values; asked not to run, BGE-M3 is
    recorded as not run (no number) with how to run it, replacing an earlier result."""
    from retrieval_lib.results import runs

    split = _split()
    bm25 = baselines.bm25_baseline(split, "demo", root=tmp_path)
    m3 = baselines.bge_m3_baseline(split, "demo", name_or_path=str(tiny_m3), max_length=64,
                                   root=tmp_path)
    assert m3["status"] == "done"
    found = runs.collect_runs("demo", tmp_path)
    assert set(found) == {"bge_m3", "bge_m3-sparse", "bge_m3-colbert", "bge_m3-hybrid", "bm25"}
    assert found["bm25"]["test"]["per_query"] == bm25["per_query"]
    assert found["bge_m3-hybrid"]["test"]["per_query"] == m3["results"]["hybrid"]["per_query"]
    assert found["bge_m3"]["parameters"] == sum(
        p.numel() for p in baselines.BGEM3Retriever(str(tiny_m3)).encoder.parameters())
    skipped = baselines.bge_m3_baseline(split, "demo", run=False, root=tmp_path)
    assert skipped["status"] == "not run" and "run_bge_m3=False" in skipped["reason"]
    assert "BGE-M3 not run" in capsys.readouterr().out
    again = runs.collect_runs("demo", tmp_path)["bge_m3"]
    assert again["status"] == "not run" and "huggingface-cli download" in again["how_to_run"]


def test_the_hybrid_fusion_and_weight_are_the_best_over_every_curve_ties_to_the_first_listed():
    choose_fusion = baselines.choose_fusion
    # min-max wins anywhere on its curve: not the best of the first fusion listed (RRF 0.72)
    assert choose_fusion({"rrf": {0.02: 0.70, 0.5: 0.72},
                          "minmax": {0.02: 0.71, 0.5: 0.74}}) == ("minmax", 0.5)
    # ties: the fusion listed first, then the weight listed first
    assert choose_fusion({"rrf": {0.02: 0.7, 0.5: 0.7}, "minmax": {0.02: 0.7}}) == ("rrf", 0.02)
    assert choose_fusion({"rrf": {0.02: 0.6},
                          "minmax": {0.02: 0.7, 0.5: 0.7}}) == ("minmax", 0.02)
