"""Export a trained retriever as a sentence-transformers model folder.

The folder holds ``Transformer`` (the encoder and tokenizer, with the retriever's query and
passage maximum lengths as ``query_length`` / ``document_length``), ``Pooling`` (mean,
lasttoken or cls), ``Dense`` (the 128-d projection, no activation) and ``Normalize``, written by
sentence-transformers itself, so that

    model = SentenceTransformer(path)
    model.encode_query(queries)      # == DualTowerRetriever.encode_queries(queries)
    model.encode_document(passages)  # == DualTowerRetriever.encode_passages(passages)

Two details keep the vectors identical:

* last-token pooling reads the EOS state, and :meth:`DualTowerRetriever.tokenize` appends EOS to
  every text; the exported tokenizer gets a post-processor that appends it too;
* separate query and passage projections (experiment 4.1.1's variant) become a ``Router`` with
  one ``Dense`` per route, so ``encode_query`` and ``encode_document`` take their own.

Plain ``model.encode`` follows the document route (passages).

sentence-transformers truncates a document at ``document_length`` tokens (FirstP). How the
retriever was evaluated on longer documents goes into ``passage_windows.json``: the aggregation
(``first``, or ``max`` / ``sum`` over windows of ``window_tokens`` text tokens every ``stride``
tokens, :mod:`retrieval_lib.windows`); to score like it, split documents with
``windows.split_windows``, ``encode_document`` each window and aggregate the scores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .checkpoint import atomic_folder, write_checksums
from .modeling import DualTowerRetriever
from .windows import window_stride, window_tokens

__all__ = ["ST_POOLING", "to_sentence_transformer", "export_sentence_transformer"]

#: Our pooling names -> sentence-transformers' pooling modes.
ST_POOLING = {"mean": "mean", "last_token": "lasttoken", "cls": "cls"}


def _append_eos(tokenizer):
    """A copy of a fast tokenizer whose encodings always end with EOS."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    eos, eos_id = tok.eos_token, tok.eos_token_id
    if eos is None or not tok.is_fast:
        raise ValueError("last-token pooling needs a fast tokenizer with an EOS token")
    template = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                             special_tokens=[(eos, eos_id)])
    backend = tok.backend_tokenizer
    existing = backend.post_processor
    backend.post_processor = (processors.Sequence([existing, template]) if existing is not None
                              else template)
    return tok


def _dense(projection: torch.nn.Linear):
    from sentence_transformers.sentence_transformer.modules import Dense

    return Dense(projection.in_features, projection.out_features, bias=True,
                 activation_function=torch.nn.Identity(),
                 init_weight=projection.weight.detach().cpu().clone(),
                 init_bias=projection.bias.detach().cpu().clone())


def to_sentence_transformer(model: DualTowerRetriever, workdir: str | Path):
    """A ``SentenceTransformer`` computing ``model``'s embeddings (the encoder is written to
    ``workdir/encoder`` first, as the Transformer module loads from a folder)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Router,
        Transformer,
    )

    workdir = Path(workdir)
    tokenizer = _append_eos(model.tokenizer) if model.pooling == "last_token" else model.tokenizer
    model.encoder.save_pretrained(str(workdir / "encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(workdir / "encoder"))
    transformer = Transformer(str(workdir / "encoder"), max_seq_length=model.max_passage_length,
                              query_length=model.max_query_length,
                              document_length=model.max_passage_length)
    hidden = model.encoder.config.hidden_size
    modules = [transformer, Pooling(hidden, ST_POOLING[model.pooling])]
    if model.separate_projections:
        modules.append(Router.for_query_document([_dense(model.query_projection)],
                                                 [_dense(model.passage_projection)]))
    else:
        modules.append(_dense(model.query_projection))
    modules.append(Normalize())
    # a query instruction becomes the "query" prompt, which encode_query puts in front
    prompts = {"query": model.query_instruction} if model.query_instruction else None
    return SentenceTransformer(modules=modules, device="cpu", prompts=prompts)


def export_sentence_transformer(model: DualTowerRetriever, path: str | Path) -> Path:
    """Write ``model`` as a sentence-transformers folder at ``path``; returns ``path``. The
    folder is written whole or not at all (a failed re-export leaves the previous one), with
    ``checksums.json`` recording each file; ``path`` is replaced whole (a folder of its own)."""
    import tempfile

    path = Path(path)
    size = window_tokens(model)
    windows = {"aggregation": model.passage_aggregation, "window_tokens": size,
               "stride": window_stride(size, model.passage_stride),
               "document_length": model.max_passage_length}
    with tempfile.TemporaryDirectory() as workdir, atomic_folder(path) as tmp:
        to_sentence_transformer(model, workdir).save(str(tmp))
        (tmp / "passage_windows.json").write_text(json.dumps(windows, indent=2) + "\n",
                                                  encoding="utf-8")
        write_checksums(tmp)
    return path
