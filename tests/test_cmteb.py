"""C-MTEB through mteb: a retriever evaluated by mteb's own evaluator on a local task in mteb's
published layout, checked against the library's own metrics on the same texts."""

import json

import mteb
import numpy as np
import pytest
from toy import toy_model, toy_records

from retrieval_lib.data import tokenizer
from retrieval_lib.evaluation import evaluate_retriever, qrels_for_split
from retrieval_lib.results import (
    CMTEB_FILE,
    IN_DOMAIN,
    MtebRetriever,
    cmteb_table,
    evaluate_mteb,
    local_retrieval_task,
    mteb_agreement,
    write_retrieval_folder,
)


def split_and_model(separate_projections):
    """24 toy records and a one-layer MiniMind-shaped retriever with a query instruction;
    with one projection, an untrained model already ranks by shared tokens (its @5 metrics
    are not all 0), with two the towers visibly differ."""
    records = toy_records(24, seed=5)
    texts = [r["query"] for r in records] + [p["text"] for r in records
                                             for p in r["positive_passages"]]
    tok = tokenizer.train_bpe_tokenizer(texts * 3, vocab_size=300)
    model = toy_model(tok, max_passage_length=32, separate_projections=separate_projections,
                      query_instruction="查询：")
    return records, model.eval()


def test_mtebs_evaluator_gives_the_librarys_metrics_on_the_same_split(tmp_path):
    """The split written in mteb's layout and evaluated by mteb: its NDCG@10, NDCG@5,
    Recall@5, Precision@5 and MRR@10 equal the library's on the same split (both exact
    search over the same vectors; mteb rounds nothing we compare beyond 1e-5)."""
    records, model = split_and_model(separate_projections=False)
    query_ids, queries, qrels, corpus = qrels_for_split(records)
    folder = write_retrieval_folder(tmp_path / "data", dict(zip(query_ids, queries, strict=True)),
                                    {f"d{j}": t for j, t in enumerate(corpus)}, qrels)
    agreement = mteb_agreement(model, records, tmp_path / "again")  # what notebook 04 shows
    assert set(agreement) == {"ndcg@10", "ndcg@5", "recall@5", "precision@5", "mrr@10"}
    for pair in agreement.values():
        assert pair["mteb"] == pytest.approx(pair["library"], abs=1e-5)
    assert agreement["ndcg@5"]["library"] > 0.1
    run = tmp_path / "run"
    run.mkdir()
    saved = evaluate_mteb(model, [local_retrieval_task(folder, "ToyRetrieval")], out_dir=run)
    ours = evaluate_retriever(model, records, ks=(5, 10))["aggregate"]
    scores = saved["tasks"]["ToyRetrieval"]
    assert scores["split"] == "test" and scores["in_domain"] is None
    for theirs, mine in (("ndcg_at_10", "ndcg@10"), ("ndcg_at_5", "ndcg@5"),
                         ("recall_at_5", "recall@5"), ("precision_at_5", "precision@5"),
                         ("mrr_at_10", "mrr@10")):
        assert scores[theirs] == pytest.approx(ours[mine]["mean"], abs=1e-5), theirs
    assert 0.1 < scores["ndcg_at_5"] < scores["ndcg_at_10"] < 1  # neither nothing nor all
    assert json.loads((run / CMTEB_FILE).read_text(encoding="utf-8")) == saved
    assert list((run / "mteb").rglob("ToyRetrieval.json"))  # mteb's own result file


def test_queries_go_to_the_query_tower_with_the_trained_instruction():
    """mteb's query texts reach encode_queries (the model's own instruction, not the task's
    prompt), its documents encode_passages; with separate projections the two differ."""
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    records, model = split_and_model(separate_projections=True)
    texts = [r["query"] for r in records[:5]]
    loader = DataLoader([{"text": t} for t in texts], batch_size=2,
                        collate_fn=lambda rows: {"text": [r["text"] for r in rows]})
    encoder = MtebRetriever(model)
    task = mteb.get_task("T2Retrieval").metadata  # has a query prompt of its own
    as_query = encoder.encode(loader, task_metadata=task, hf_split="dev", hf_subset="default",
                              prompt_type=PromptType.query)
    as_document = encoder.encode(loader, task_metadata=task, hf_split="dev",
                                 hf_subset="default", prompt_type=PromptType.document)
    np.testing.assert_allclose(as_query, model.encode_queries(texts), atol=1e-6)
    np.testing.assert_allclose(as_document, model.encode_passages(texts), atol=1e-6)
    assert np.abs(as_query - as_document).max() > 1e-2
    assert encoder.mteb_model_meta.embed_dim == 16


def test_the_report_table_marks_the_in_domain_tasks(tmp_path):
    """One row per run with a cmteb.json, C-MTEB's task order, † on the three tasks whose
    sources are in the full preset's training data, and the footnote naming them."""
    run = tmp_path / "minimind27_10k"
    run.mkdir()
    (run / CMTEB_FILE).write_text(json.dumps({"tasks": {
        "CovidRetrieval": {"ndcg_at_10": 0.5}, "T2Retrieval": {"ndcg_at_10": 0.25}}}))
    runs = {"minimind27_10k": {"status": "done", "out_dir": str(run)},
            "bm25": {"status": "done", "out_dir": str(tmp_path / "none")}}
    table = cmteb_table(runs)
    assert table.splitlines()[:3] == ["| run | T2Retrieval † | CovidRetrieval |",
                                      "| --- | --- | --- |",
                                      "| `minimind27_10k` | 0.250 | 0.500 |"]
    assert "T2Retrieval (T2Ranking)" in table and "CovidRetrieval (" not in table
    assert set(IN_DOMAIN) == {"T2Retrieval", "DuRetrieval", "MMarcoRetrieval"}
    assert cmteb_table({"bm25": runs["bm25"]}) is None


def test_the_results_report_shows_the_cmteb_table_of_its_runs(tmp_path):
    import pandas as pd

    from retrieval_lib import results

    run = tmp_path / "runs" / "full" / "minimind27_10k"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    row = {"status": "done", "train_records": 10_000, "parameters": 26e6}
    for metric in results.tables.HEADLINE_METRICS:
        row.update({metric: 0.3, f"{metric}_std": 0.1})
    table = pd.DataFrame([row], index=["minimind27_10k"])
    runs = {"minimind27_10k": {"status": "done", "out_dir": run, "config": {}}}
    page = results.write_markdown_report(table, "full", root=tmp_path, runs=runs)
    assert "C-MTEB" not in page.read_text(encoding="utf-8")  # no run was evaluated on it
    (run / CMTEB_FILE).write_text(json.dumps({"tasks": {"DuRetrieval": {"ndcg_at_10": 0.125}}}))
    page = results.write_markdown_report(table, "full", root=tmp_path, runs=runs)
    text = page.read_text(encoding="utf-8")
    assert "## C-MTEB retrieval (mteb)" in text
    assert cmteb_table(runs) in text and "| `minimind27_10k` | 0.125 |" in text
