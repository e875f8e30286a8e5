"""A retriever exported for sentence-transformers encodes exactly as the retriever does."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from retrieval_lib.data import tokenizer
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.serving import export_sentence_transformer
from retrieval_lib.settings import config

QUERIES = ["长江防汛", "足球联赛今天开幕了吗", "新年音乐会"]
PASSAGES = ["长江流域今年防汛形势严峻，各地加强巡查。" * 3, "黄河下游引水灌溉", "足球联赛今天开幕",
            "新年音乐会在北京举行，观众反响热烈。" * 4]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe_tokenizer((QUERIES + PASSAGES) * 5, vocab_size=300)


@pytest.mark.parametrize("base, separate, instruction", [
    (config.MINIMIND_27M, False, ""), (config.QWEN2_05B, False, ""),
    (config.MINIMIND_27M, True, ""), (config.QWEN2_05B, False, "检索相关文章：")],
    ids=["llama-mean", "qwen2-last-token", "separate-projections", "qwen2-instruction"])
def test_sentence_transformers_vectors_equal_the_retrievers(tok, tmp_path, base, separate,
                                                            instruction):
    from sentence_transformers import SentenceTransformer

    cfg = replace(base, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok),
                  max_query_length=8, max_passage_length=24, projection_dim=16,
                  separate_projections=separate, query_instruction=instruction)
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False).eval()
    st = SentenceTransformer(str(export_sentence_transformer(model, tmp_path / "st")),
                             device="cpu")
    # the long texts are truncated: each side must keep its own maximum length
    q_ours, p_ours = model.encode_queries(QUERIES), model.encode_passages(PASSAGES)
    q_st, p_st = st.encode_query(QUERIES), st.encode_document(PASSAGES)
    assert np.min(np.sum(q_ours * q_st, axis=1)) >= 0.9999
    assert np.min(np.sum(p_ours * p_st, axis=1)) >= 0.9999
    assert np.allclose(np.linalg.norm(p_st, axis=1), 1.0, atol=1e-5)
    if instruction:  # the prompt is really applied
        plain = replace(cfg, query_instruction="")
        torch.manual_seed(0)
        without = DualTowerRetriever.from_config(plain, tokenizer=tok, pretrained=False).eval()
        assert np.max(np.abs(without.encode_queries(QUERIES) - q_st)) > 1e-3
    if separate:  # the two routes really differ
        assert np.max(np.abs(st.encode_query(PASSAGES) - p_st)) > 1e-3


def test_the_export_says_how_to_score_long_documents_and_following_it_gives_maxp(tok, tmp_path):
    import json

    from sentence_transformers import SentenceTransformer

    from retrieval_lib.evaluation import windows

    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                  vocab_size=len(tok), max_query_length=8, max_passage_length=10,
                  projection_dim=16, passage_aggregation="max", passage_stride=4)
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False).eval()
    folder = export_sentence_transformer(model, tmp_path / "st")
    said = json.loads((folder / "passage_windows.json").read_text(encoding="utf-8"))
    # the toy BPE adds no special tokens: all 10 tokens of a window are text
    assert said == {"aggregation": "max", "window_tokens": 10, "stride": 4,
                    "document_length": 10}
    st = SentenceTransformer(str(folder), device="cpu")
    cut = windows.split_windows(PASSAGES, st.tokenizer, said["window_tokens"], said["stride"])
    assert cut.split_documents() >= 2
    theirs = windows.aggregate_scores(st.encode_query(QUERIES) @ st.encode_document(cut.texts).T,
                                      cut.owners, said["aggregation"])
    ours = windows.aggregate_scores(model.encode_queries(QUERIES)
                                    @ model.encode_passages(cut.texts).T, cut.owners, "max")
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def _run_folder(tmp_path, tok, preset="demo", base_model=None, instruction=""):
    """A run folder as run_experiment writes one, with hand-picked per-query test values."""
    import json

    exp = config.get_experiment("minimind27_10k", preset)
    exp = replace(exp, model=replace(exp.model, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=64, vocab_size=len(tok),
                                     max_query_length=8, max_passage_length=24,
                                     projection_dim=16, query_instruction=instruction,
                                     base_model=base_model or exp.model.base_model))
    torch.manual_seed(0)
    model = DualTowerRetriever.from_config(exp.model, tokenizer=tok, pretrained=False).eval()
    run = tmp_path / f"run-{preset}"
    model.save(run / "best")
    values = {"recall@5": [1, 0, 1, 1], "precision@5": [0.2, 0, 0.2, 0.2],
              "ndcg@5": [1.0, 0.0, 0.5, 0.5], "mrr": [1.0, 0.0, 0.5, 0.5]}
    files = {"config.json": {**exp.to_dict(), "parameters": 12345, "train_records": 600},
             "metrics.json": {"best_epoch": 2, "test": {"per_query": {
                 m: {f"q{i}": v for i, v in enumerate(vs)} for m, vs in values.items()}}},
             "env.json": {"command": "python -m retrieval_lib experiment --experiment "
                                     "minimind27_10k", "git_commit": "abc1234"}}
    for name, content in files.items():
        (run / name).write_text(json.dumps(content), encoding="utf-8")
    return run, model


def test_the_model_card_is_built_from_the_run_and_the_hub_reads_its_metadata(tok, tmp_path,
                                                                             monkeypatch):
    """The hub's own parser reads the card's metadata; base model and dataset appear only as
    hub ids; the metrics are the run's, worked by hand (ndcg@5 of 1, 0, .5, .5: mean .5,
    sample std √(.5/3))."""
    from huggingface_hub import ModelCard

    from retrieval_lib.serving import model_card

    run, model = _run_folder(tmp_path, tok)
    assert "C-MTEB" not in model_card(run, model)  # not evaluated on it
    (run / "cmteb.json").write_text(json.dumps({"tasks": {
        "T2Retrieval": {"split": "dev", "ndcg_at_10": 0.123456},
        "CovidRetrieval": {"split": "dev", "ndcg_at_10": 0.5}}}), encoding="utf-8")
    card = ModelCard(model_card(run, model))
    assert "| T2Retrieval | 0.1235 | yes (T2Ranking) |" in card.text
    assert "| CovidRetrieval | 0.5000 | no |" in card.text
    assert {(r.dataset_type, r.metric_value) for r in card.data.eval_results
            if r.dataset_type.startswith("mteb/")} == {("mteb/T2Retrieval", 0.1235),
                                                       ("mteb/CovidRetrieval", 0.5)}
    data = card.data.to_dict()
    assert (data["language"], data["library_name"], data["pipeline_tag"]) == (
        "zh", "sentence-transformers", "sentence-similarity")
    assert "base_model" not in data and "datasets" not in data  # the demo's are not on the hub
    results = {r.metric_type: r.metric_value for r in card.data.eval_results
               if not r.dataset_type.startswith("mteb/")}
    assert results == {"recall_at_5": 0.75, "precision_at_5": 0.15, "ndcg_at_5": 0.5,
                       "mrr": 0.5}
    assert f"| ndcg@5 | 0.5000 ± {math.sqrt(0.5 / 3):.4f} |" in card.text
    assert "Demo preset" in card.text and "600 training records" in card.text
    assert "`python -m retrieval_lib experiment --experiment minimind27_10k`" in card.text
    full, _ = _run_folder(tmp_path, tok, "full", base_model="jingyaogong/minimind-v1")
    data = ModelCard(model_card(full, model)).data.to_dict()
    assert data["base_model"] == "jingyaogong/minimind-v1"
    assert data["datasets"] == ["Shitao/bge-m3-data"]
    # a local folder is not a hub id, even one named like owner/name
    (tmp_path / "models" / "minimind").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path), "models/minimind"):
        local, _ = _run_folder(tmp_path / "l", tok, "full", base_model=path)
        assert "base_model" not in ModelCard(model_card(local, model)).data.to_dict()


@pytest.mark.parametrize("instruction", ["", "检索相关文章："], ids=["plain", "instruction"])
def test_an_exported_run_carries_its_card_and_the_cards_langchain_settings_give_our_vectors(
        tok, tmp_path, instruction):
    """export_run: the card is README.md, under the checksums; the encode settings the card
    gives LangChain (which passes them to SentenceTransformer.encode) reproduce the
    retriever's query and passage vectors."""
    from sentence_transformers import SentenceTransformer

    from retrieval_lib.serving import encode_kwargs, export_run, model_card
    from retrieval_lib.settings.saved_folder import verify_checksums

    run, model = _run_folder(tmp_path, tok, instruction=instruction)
    folder = export_run(run, tmp_path / "export")
    assert (folder / "README.md").read_text(encoding="utf-8") == model_card(run, model)
    assert verify_checksums(folder)
    doc, query = encode_kwargs(model)
    assert f"query_encode_kwargs={query!r}" in model_card(run, model)
    st = SentenceTransformer(str(folder), device="cpu")
    q, p = st.encode(QUERIES, **query), st.encode(PASSAGES, **doc)
    assert np.min(np.sum(q * model.encode_queries(QUERIES), axis=1)) >= 0.9999
    assert np.min(np.sum(p * model.encode_passages(PASSAGES), axis=1)) >= 0.9999
    # the card's FlagEmbedding code, run as written on the folder, gives the same vectors
    assert verify_checksums(folder / "flagembedding")
    card = model_card(run, model)
    code = card.split("FlagEmbedding (the folder")[1].split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code.replace("LOCAL_PATH", str(folder)).replace('["查询"]', "QUERIES")
         .replace('["段落"]', "PASSAGES"), {"QUERIES": QUERIES, "PASSAGES": PASSAGES}, scope)
    assert np.min(np.sum(scope["q"] * model.encode_queries(QUERIES), axis=1)) >= 0.9999
    assert np.min(np.sum(scope["p"] * model.encode_passages(PASSAGES), axis=1)) >= 0.9999


def test_push_to_hub_checks_the_folder_then_uploads_it(tok, tmp_path, monkeypatch):
    """Everything up to the network call: the repository is created (private by default) and
    the checked folder uploaded; a folder edited after export never reaches the hub."""
    import huggingface_hub

    from retrieval_lib.serving import export_run, push_to_hub
    from retrieval_lib.settings.checkpoint import CheckpointError

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw)) or "commit")
    run, _ = _run_folder(tmp_path, tok)
    folder = export_run(run, tmp_path / "export")
    assert push_to_hub(folder, "me/minimind27-retriever") == "commit"
    assert calls == [("create", "me/minimind27-retriever", {"private": True, "exist_ok": True}),
                     ("upload", {"repo_id": "me/minimind27-retriever",
                                 "folder_path": str(folder),
                                 "commit_message": "Upload a retriever exported by "
                                                   "retrieval_lib"})]
    calls.clear()
    (folder / "README.md").write_text("edited", encoding="utf-8")
    with pytest.raises(CheckpointError, match="README.md"):
        push_to_hub(folder, "me/minimind27-retriever")
    (folder / "README.md").unlink()
    with pytest.raises(FileNotFoundError, match="export_run"):
        push_to_hub(folder, "me/minimind27-retriever")
    assert calls == []
