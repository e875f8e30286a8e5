"""A retriever exported for sentence-transformers encodes exactly as the retriever does."""

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
