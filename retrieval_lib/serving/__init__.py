"""Serving: sentence-transformers export, ONNX graphs run by onnxruntime (fp32, int8), faiss
indexes.

Modules, each importing only those before it: ``export``, ``projected_encoder`` (the
remote code of a FlagEmbedding folder), ``flag`` (that folder), ``card``, ``onnx_runtime``,
``index``.
"""

from .export import (
    ST_POOLING, export_cross_encoder, export_sentence_transformer, to_sentence_transformer
)
from .projected_encoder import (
    PROJECTED_MODELS, ProjectedLlamaModel, ProjectedQwen2Model
)
from .flag import (
    export_flagembedding, FLAG_SETTINGS, flagembedding_settings, load_flagembedding,
    write_flagembedding
)
from .card import (
    FLAG_DIR, encode_kwargs, export_run, model_card, push_to_hub
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
    "export_cross_encoder", "ProjectedLlamaModel", "ProjectedQwen2Model", "PROJECTED_MODELS",
    "FLAG_SETTINGS", "flagembedding_settings", "write_flagembedding", "export_flagembedding",
    "load_flagembedding", "FLAG_DIR", "encode_kwargs", "model_card", "export_run", "push_to_hub",
    "ONNX_OPSET", "export_retriever_onnx", "export_reranker_onnx",
    "quantize_int8", "int8_needs_reduced_range", "OnnxRetriever", "OnnxReranker", "INDEX_KINDS",
    "PassageIndex", "recall_against_exact"
]
