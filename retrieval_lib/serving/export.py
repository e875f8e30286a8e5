"""Export a trained retriever as a sentence-transformers model folder (and a reranker as a
``CrossEncoder`` folder, :func:`export_cross_encoder`).

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
tokens, :mod:`retrieval_lib.evaluation.windows`); to score like it, split documents with
``windows.split_windows``, ``encode_document`` each window and aggregate the scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.tokenizer import with_eos_template
from ..evaluation.windows import window_stride, window_tokens
from ..models.retriever import DualTowerRetriever
from ..results.reranker import CrossEncoderReranker
from ..settings.saved_folder import atomic_folder, write_checksums

__all__ = ["ST_POOLING", "to_sentence_transformer", "export_sentence_transformer",
           "export_cross_encoder"]

#: Our pooling names -> sentence-transformers' pooling modes.
ST_POOLING = {"mean": "mean", "last_token": "lasttoken", "cls": "cls"}


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
    tokenizer = (with_eos_template(model.tokenizer) if model.pooling == "last_token"
                 else model.tokenizer)
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


def export_sentence_transformer(model: DualTowerRetriever, path: str | Path,
                                overwrite: bool = False, card: str | None = None,
                                also=None) -> Path:
    """Write ``model`` as a sentence-transformers folder at ``path``; returns ``path``. The
    folder is written whole or not at all (a failed re-export leaves the previous one), with
    ``checksums.json`` recording each file; a ``path`` holding anything but an earlier export
    of a retriever is refused unless ``overwrite``. ``card`` replaces the ``README.md``
    sentence-transformers writes (:func:`~retrieval_lib.serving.card.model_card`); ``also``,
    when given, is called with the folder being written, before the checksums (what
    :func:`~retrieval_lib.serving.card.export_run` adds: the FlagEmbedding folder)."""
    import tempfile

    path = Path(path)
    size = window_tokens(model)
    windows = {"aggregation": model.passage_aggregation, "window_tokens": size,
               "stride": window_stride(size, model.passage_stride),
               "document_length": model.max_passage_length}
    with tempfile.TemporaryDirectory() as workdir, \
            atomic_folder(path, ("modules.json", "passage_windows.json"), overwrite) as tmp:
        to_sentence_transformer(model, workdir).save(str(tmp))
        (tmp / "passage_windows.json").write_text(json.dumps(windows, indent=2) + "\n",
                                                  encoding="utf-8")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if also is not None:
            also(tmp)
        write_checksums(tmp)
    return path


#: What every sentence-transformers CrossEncoder folder holds (``CrossEncoder.save``).
CROSS_ENCODER_FILES = ("config.json", "config_sentence_transformers.json")


def export_cross_encoder(reranker: CrossEncoderReranker, path: str | Path,
                         overwrite: bool = False) -> Path:
    """Write ``reranker`` as a sentence-transformers ``CrossEncoder`` folder at ``path``
    (written by sentence-transformers itself, whole or not at all, with ``checksums.json``):

        model = CrossEncoder(path)
        model.predict(list(zip(queries, passages)))  # == reranker.score(queries, passages)

    The scores are the raw logits (the folder names ``Identity`` as the activation; the
    sentence-transformers default for one label would be a sigmoid, which keeps the order),
    pairs are cut at the reranker's ``max_length``, and a decoder's tokenizer keeps its
    ``query EOS passage EOS`` template (saved in ``tokenizer.json``). A ``path`` holding
    anything but an earlier cross-encoder export is refused unless ``overwrite``."""
    import tempfile

    from sentence_transformers import CrossEncoder

    path = Path(path)
    with tempfile.TemporaryDirectory() as workdir, \
            atomic_folder(path, CROSS_ENCODER_FILES, overwrite) as tmp:
        reranker.model.save_pretrained(workdir, safe_serialization=True)
        reranker.tokenizer.save_pretrained(workdir)
        model = CrossEncoder(workdir, max_length=reranker.max_length, device="cpu",
                             activation_fn=torch.nn.Identity())
        model.save(str(tmp))
        write_checksums(tmp)
    return path
