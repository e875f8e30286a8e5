"""ONNX serving: the exported graphs give the PyTorch vectors and scores, in the evaluation's
place too; the int8 graph is really quantised; a missing or edited file is named."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from datasets import Dataset
from toy import toy_model, toy_records

from retrieval_lib import evaluation, serving
from retrieval_lib.models import DualTowerRetriever
from retrieval_lib.results import CrossEncoderReranker, rerank_run
from retrieval_lib.settings import CheckpointError, config


def _texts(n=24):
    rows = toy_records(n, 5)
    return [r["query"] for r in rows], [r["positive_passages"][0]["text"] * (1 + i % 3)
                                        for i, r in enumerate(rows)]


def _variant(tok, **kw):
    if not kw:
        return toy_model(tok)
    cfg = replace(config.MINIMIND_27M, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                  vocab_size=len(tok), max_query_length=16, max_passage_length=48,
                  projection_dim=16, **kw)
    torch.manual_seed(1)
    return DualTowerRetriever.from_config(cfg, tokenizer=tok, pretrained=False)


@pytest.mark.parametrize("kw", [{}, {"pooling": "last_token", "separate_projections": True,
                                     "query_instruction": "检索："}],
                         ids=["mean-shared", "last-token-separate-instruction"])
def test_onnx_vectors_equal_the_pytorch_ones(tok, tmp_path, kw):
    model = _variant(tok, **kw).eval()
    serving.export_retriever_onnx(model, tmp_path / "onnx")
    onnx = serving.OnnxRetriever(tmp_path / "onnx")
    queries, passages = _texts()  # passages of 1-3 times a toy text: padded, some cut at 48
    for got, want in ((onnx.encode_queries(queries, batch_size=5),
                       model.encode_queries(queries)),
                      (onnx.encode_passages(passages, batch_size=5),
                       model.encode_passages(passages))):
        assert np.min(np.sum(got * want, axis=1)) >= 0.9999
        np.testing.assert_allclose(got, want, atol=1e-5)
    if kw:  # the two towers' projections differ, and each route takes its own
        assert not np.allclose(onnx.encode_queries(passages[:3]),
                               onnx.encode_passages(passages[:3]), atol=1e-3)


def test_export_leaves_the_model_where_and_as_it_was(tok, tmp_path):
    model = toy_model(tok).to(torch.bfloat16)
    serving.export_retriever_onnx(model, tmp_path / "onnx")  # traced in fp32 on the CPU
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    queries, _ = _texts(4)
    got = serving.OnnxRetriever(tmp_path / "onnx").encode_queries(queries)
    want = model.float().encode_queries(queries)
    assert np.min(np.sum(got * want, axis=1)) >= 0.9999


def test_onnx_retriever_takes_the_models_place_in_the_evaluation(tok, tmp_path):
    model = toy_model(tok).eval()
    serving.export_retriever_onnx(model, tmp_path / "onnx")
    onnx = serving.OnnxRetriever(tmp_path / "onnx")
    split = Dataset.from_list(toy_records(20, 7))
    for how in ("first", "max"):
        _, run_torch, info = evaluation.retrieve(model, split, top_k=5, aggregation=how)
        _, run_onnx, info_onnx = evaluation.retrieve(onnx, split, top_k=5, aggregation=how)
        assert info == info_onnx
        for qid in run_torch:
            assert list(run_torch[qid]) == list(run_onnx[qid])
            np.testing.assert_allclose(list(run_torch[qid].values()),
                                       list(run_onnx[qid].values()), atol=1e-5)


def test_int8_graph_is_quantised_and_close(tok, tmp_path):
    import onnx

    model = toy_model(tok).eval()
    serving.export_retriever_onnx(model, tmp_path / "onnx", quantize=True)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "onnx" / "model_int8.onnx"))
           .graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops
                                               or "DynamicQuantizeMatMul" in ops)
    plain = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node}
    assert "DynamicQuantizeLinear" not in plain
    queries, passages = _texts()
    got = serving.OnnxRetriever(tmp_path / "onnx", quantized=True).encode_passages(passages)
    assert np.min(np.sum(got * model.encode_passages(passages), axis=1)) > 0.99


@pytest.mark.parametrize(("machine", "vnni", "reduced"), [
    ("x86_64", False, True),  # AVX2 / AVX-512 without VNNI: VPMADDUBSW saturates
    ("x86_64", True, False),
    ("AMD64", None, True),  # a torch without the check: assume the saturating kernel
    ("aarch64", False, False),  # another architecture, other kernels
])
def test_int8_weights_lose_a_bit_only_where_the_cpu_kernel_saturates(monkeypatch, machine, vnni,
                                                                     reduced):
    monkeypatch.setattr(serving.onnx_runtime.platform, "machine", lambda: machine)
    if vnni is None:
        monkeypatch.delattr(torch.cpu, "_is_vnni_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    assert serving.int8_needs_reduced_range() is reduced


def test_onnx_reranker_scores_equal_the_pytorch_ones(tok, tmp_path):
    cfg = replace(config.QWEN2_05B, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, vocab_size=len(tok))
    reranker = CrossEncoderReranker.from_base(cfg, tokenizer=tok, pretrained=False,
                                              max_length=40, seed=0)
    serving.export_reranker_onnx(reranker, tmp_path / "rr", quantize=True)
    onnx = serving.OnnxReranker(tmp_path / "rr")
    queries, passages = _texts()
    np.testing.assert_allclose(onnx.score(queries, passages, batch_size=7),
                               reranker.score(queries, passages), atol=1e-4)
    int8 = serving.OnnxReranker(tmp_path / "rr", quantized=True).score(queries, passages)
    assert np.abs(int8 - reranker.score(queries, passages)).max() < 0.05
    run = {"q": {f"d{i}": float(-i) for i in range(len(passages))}}
    docs = {f"d{i}": p for i, p in enumerate(passages)}
    assert rerank_run(onnx, {"q": queries[0]}, docs, run, 10)["q"] == pytest.approx(
        rerank_run(reranker, {"q": queries[0]}, docs, run, 10)["q"], abs=1e-4)


def test_a_missing_or_edited_graph_is_named(tok, tmp_path):
    model = toy_model(tok).eval()
    serving.export_retriever_onnx(model, tmp_path / "onnx")
    with pytest.raises(FileNotFoundError, match="model_int8.onnx.*quantize=True"):
        serving.OnnxRetriever(tmp_path / "onnx", quantized=True)
    graph = tmp_path / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.onnx"):
        serving.OnnxRetriever(tmp_path / "onnx")
