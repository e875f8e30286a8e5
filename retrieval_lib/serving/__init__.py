"""Serving: sentence-transformers export, ONNX graphs run by onnxruntime (fp32, int8), faiss
indexes.

Modules, each importing only those before it: ``export``, ``card``, ``onnx_runtime``,
``index``.
"""

from .export import (
    ST_POOLING, export_cross_encoder, export_sentence_transformer, to_sentence_transformer
)
from .card import (
    encode_kwargs, export_run, model_card, push_to_hub
)
from .onnx_runtime import (
    ONNX_OPSET, export_reranker_onnx, export_retriever_onnx, int8_needs_reduced_range,
    OnnxReranker, OnnxRetriever, quantize_int8
)
from .index import (
    INDEX_KINDS, PassageIndex, recall_against_exact
)

__all__ = [
    "ST_POOLING", "to_sentence_transformer", "export_sentence_transformer",
    "export_cross_encoder", "encode_kwargs", "model_card", "export_run", "push_to_hub",
    "ONNX_OPSET", "export_retriever_onnx", "export_reranker_onnx",
    "quantize_int8", "int8_needs_reduced_range", "OnnxRetriever", "OnnxReranker", "INDEX_KINDS",
    "PassageIndex", "recall_against_exact"
]
