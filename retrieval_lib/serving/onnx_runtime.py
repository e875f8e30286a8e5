"""ONNX for CPU serving: the retriever and the reranker exported to ONNX, run by onnxruntime.

Most people who deploy a small Chinese retriever serve it on a CPU, where onnxruntime runs the
graph without Python in the loop and can quantise its matrix weights to int8.

* :func:`export_retriever_onnx` writes ``model.onnx``: from ``input_ids`` and ``attention_mask``
  (batch and length dynamic) the encoder, pooling, both towers' projections and the L2
  normalisation, as two outputs ``query_vectors`` and ``passage_vectors`` (equal when the
  projection is shared); beside it the tokenizer and ``retriever_config.json``, so
  :class:`OnnxRetriever` tokenizes exactly as the library does
  (:func:`~retrieval_lib.models.retriever.text_token_ids`). ``OnnxRetriever`` has
  ``encode_queries`` / ``encode_passages`` and the attributes the evaluation reads, so
  :func:`~retrieval_lib.evaluation.search.retrieve` (FirstP and the windowed aggregations) and
  :class:`~retrieval_lib.serving.index.PassageIndex` take it in place of the PyTorch model.
* :func:`export_reranker_onnx` writes the cross-encoder's ``model.onnx`` (pairs in, one score
  each out) with its tokenizer; :class:`OnnxReranker` has the reranker's ``score``, so
  :func:`~retrieval_lib.results.reranker.rerank_run` takes it.
* ``quantize=True`` adds ``model_int8.onnx``: onnxruntime's dynamic quantisation (int8 weights
  of the matrix products, activations quantised on the fly, no calibration data); load it with
  ``quantized=True``. What it costs in quality is measured, not assumed (a paired test in
  ``03_beyond_the_report`` §7; the speed in ``benchmarks/serving.py``).

Graphs are exported by ``torch.onnx.export(..., dynamo=True)`` (PyTorch 2.5 or newer, with
``onnxscript``), opset 18, in float32; the folders are written whole or not at all, with
``checksums.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.retriever import DualTowerRetriever, pad_token_ids, text_token_ids
from ..results.reranker import CrossEncoderReranker, pair_tokens
from ..settings.saved_folder import (
    atomic_folder,
    restore_interrupted,
    verify_checksums,
    write_checksums,
)

__all__ = ["ONNX_OPSET", "export_retriever_onnx", "export_reranker_onnx", "quantize_int8",
           "int8_needs_reduced_range", "OnnxRetriever", "OnnxReranker"]

ONNX_OPSET = 18
_MODEL, _INT8 = "model.onnx", "model_int8.onnx"


class _RetrieverGraph(nn.Module):
    """What the retriever's graph computes: one encoder pass, both towers' heads."""

    def __init__(self, model: DualTowerRetriever):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
        return (self.model.head(hidden, attention_mask, "query"),
                self.model.head(hidden, attention_mask, "passage"))


class _RerankerGraph(nn.Module):
    def __init__(self, reranker: CrossEncoderReranker):
        super().__init__()
        self.reranker = reranker

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.reranker(input_ids, attention_mask)


@contextlib.contextmanager
def _on_cpu_in_fp32(module: nn.Module):
    """``module`` on the CPU in float32 while the exporter traces it, then back where and in
    the dtype it was (a model trained on a GPU stays there)."""
    first = next(module.parameters())
    device, dtype = first.device, first.dtype
    module.to("cpu", torch.float32)
    try:
        yield module
    finally:
        module.to(device, dtype)


def _export(graph: nn.Module, example: dict, outputs: list[str], path: Path) -> None:
    """``graph`` (eval mode, float32, CPU) to ``path`` with batch and length dynamic."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        raise RuntimeError(f"ONNX export needs PyTorch 2.5 or newer (torch.onnx.export with "
                           f"dynamo=True); this is {torch.__version__}")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    shapes = ({0: batch, 1: length}, {0: batch, 1: length})
    was_training = graph.training
    graph.eval()
    try:  # the exporter reports each of its passes on stdout: kept out of the notebooks
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, UserWarning))  # the exporter's own
            torch.onnx.export(graph, (example["input_ids"], example["attention_mask"]),
                              str(path), input_names=["input_ids", "attention_mask"],
                              output_names=outputs, opset_version=ONNX_OPSET, dynamo=True,
                              dynamic_shapes=shapes, external_data=False, verbose=False)
    finally:
        graph.train(was_training)


def int8_needs_reduced_range() -> bool:
    """True on an x86 CPU without VNNI. There onnxruntime multiplies uint8 activations by int8
    weights with ``VPMADDUBSW``, whose int16 sums of two products saturate (its quantisation
    guide: "try reduce_range"); 7-bit weights keep every sum in range. With VNNI, and on other
    architectures, the full 8 bits are used."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return False
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (check is not None and check())


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike,
                  reduce_range: bool | None = None) -> None:
    """onnxruntime's dynamic int8 quantisation of ``source`` (weights of MatMul / Gemm in
    signed int8, per channel; activations quantised at run time) into ``target``.
    ``reduce_range`` (7-bit weights) defaults to :func:`int8_needs_reduced_range` of this CPU:
    a graph quantised here is meant to be served on a CPU of the same kind."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None:
        reduce_range = int8_needs_reduced_range()
    logging.disable(logging.WARNING)  # "consider pre-processing": for static quantisation
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=reduce_range)
    finally:
        logging.disable(logging.NOTSET)


def export_retriever_onnx(model: DualTowerRetriever, path: str | os.PathLike,
                          quantize: bool = False, overwrite: bool = False) -> Path:
    """Write ``model`` as an ONNX serving folder at ``path`` (see the module docstring);
    ``quantize`` adds the int8 graph. A ``path`` holding anything but an earlier export of a
    retriever is refused unless ``overwrite``. Returns ``path``."""
    example = model.tokenize(["示例查询", "一段更长一些的示例文章文本"], "passage")
    path = Path(path)
    with atomic_folder(path, (_MODEL, "retriever_config.json"), overwrite) as tmp:
        with _on_cpu_in_fp32(model):
            _export(_RetrieverGraph(model), example, ["query_vectors", "passage_vectors"],
                    tmp / _MODEL)
        if quantize:
            quantize_int8(tmp / _MODEL, tmp / _INT8)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "retriever_config.json").write_text(
            json.dumps(model.retriever_config(), indent=2), encoding="utf-8")
        write_checksums(tmp)
    return path


def export_reranker_onnx(reranker: CrossEncoderReranker, path: str | os.PathLike,
                         quantize: bool = False, overwrite: bool = False) -> Path:
    """Write ``reranker`` as an ONNX serving folder at ``path``: ``model.onnx`` (``scores``
    of the pairs), the tokenizer (its pair template saved in ``tokenizer.json``) and
    ``reranker_config.json``; ``quantize`` adds the int8 graph. A ``path`` holding anything but
    an earlier export of a reranker is refused unless ``overwrite``. Returns ``path``."""
    example = reranker.tokenize(["示例查询", "查询"], ["一段示例文章", "另一段更长一些的示例文章"])
    path = Path(path)
    with atomic_folder(path, (_MODEL, "reranker_config.json"), overwrite) as tmp:
        with _on_cpu_in_fp32(reranker):
            _export(_RerankerGraph(reranker), example, ["scores"], tmp / _MODEL)
        if quantize:
            quantize_int8(tmp / _MODEL, tmp / _INT8)
        reranker.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "reranker_config.json").write_text(
            json.dumps({"max_length": reranker.max_length}, indent=2), encoding="utf-8")
        write_checksums(tmp)
    return path


def _session(folder: Path, quantized: bool, threads: int | None):
    import onnxruntime as ort

    name = _INT8 if quantized else _MODEL
    restore_interrupted(folder)
    if not (folder / name).exists():
        raise FileNotFoundError(f"{folder / name} does not exist"
                                + (" (export with quantize=True)" if quantized else ""))
    verify_checksums(folder)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])


def _order(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class OnnxRetriever:
    """A retriever served by onnxruntime from a folder of :func:`export_retriever_onnx`."""

    def __init__(self, path: str | os.PathLike, quantized: bool = False,
                 threads: int | None = None):
        from transformers import AutoTokenizer

        folder = Path(path)
        self.session = _session(folder, quantized, threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        config = json.loads((folder / "retriever_config.json").read_text(encoding="utf-8"))
        self.pooling = config["pooling"]
        self.projection_dim = config["projection_dim"]
        self.max_query_length = config["max_query_length"]
        self.max_passage_length = config["max_passage_length"]
        self.query_instruction = config.get("query_instruction", "")
        self.passage_aggregation = config.get("passage_aggregation", "first")
        self.passage_stride = config.get("passage_stride", 0)
        self.quantized = quantized

    def _encode(self, texts: Sequence[str], tower: str, batch_size: int) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_* takes a list of texts, not one string")
        out = np.zeros((len(texts), self.projection_dim), dtype=np.float32)
        max_length = self.max_query_length if tower == "query" else self.max_passage_length
        output = 0 if tower == "query" else 1
        for start in range(0, len(texts), 4096):  # tokenise in slices: bounded memory
            chunk = list(range(start, min(start + 4096, len(texts))))
            ids = text_token_ids(self.tokenizer, [texts[i] for i in chunk], max_length,
                                 self.pooling == "last_token",
                                 self.query_instruction if tower == "query" else "")
            order = _order([len(x) for x in ids])  # longest first: less padding
            for b in range(0, len(order), batch_size):
                rows = order[b:b + batch_size]
                enc = pad_token_ids([ids[r] for r in rows], self.tokenizer.pad_token_id,
                                    self.tokenizer.padding_side == "left")
                vectors = self.session.run(None, {k: v.numpy() for k, v in enc.items()})[output]
                out[[chunk[r] for r in rows]] = vectors
        return out

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64, **_) -> np.ndarray:
        """Query embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "query", batch_size)

    def encode_passages(self, texts: Sequence[str], batch_size: int = 32, **_) -> np.ndarray:
        """Passage embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "passage", batch_size)


class OnnxReranker:
    """A cross-encoder served by onnxruntime from a folder of :func:`export_reranker_onnx`."""

    def __init__(self, path: str | os.PathLike, quantized: bool = False,
                 threads: int | None = None):
        from transformers import AutoTokenizer

        folder = Path(path)
        self.session = _session(folder, quantized, threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        config = json.loads((folder / "reranker_config.json").read_text(encoding="utf-8"))
        self.max_length = config["max_length"]
        self.quantized = quantized

    def score(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 32
              ) -> np.ndarray:
        """Scores of the pairs ``(queries[i], passages[i])``, float32."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries for {len(passages)} passages")
        out = np.zeros(len(queries), dtype=np.float32)
        order = _order([len(q) + len(p) for q, p in zip(queries, passages, strict=True)])
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            enc = pair_tokens(self.tokenizer, [queries[i] for i in rows],
                              [passages[i] for i in rows], self.max_length)
            feed = {"input_ids": enc["input_ids"].numpy(),
                    "attention_mask": enc["attention_mask"].numpy()}
            out[rows] = self.session.run(None, feed)[0]
        return out

