"""Export a trained retriever for FlagEmbedding's embedder classes, the inference side of the
code that trains BGE-M3.

    export_flagembedding(model, "my_retriever_flag")
    flag = load_flagembedding("my_retriever_flag")  # a FlagModel or FlagLLMModel
    flag.encode_queries(queries)   # == model.encode_queries(queries)
    flag.encode_corpus(passages)   # == model.encode_passages(passages)

The folder holds the encoder with the retriever's projection applied to every token state
(:mod:`.projected_encoder`, shipped as remote code: ``trust_remote_code=True``), its tokenizer
(for last-token pooling with a post-processor that appends EOS, as the retriever's tokenisation
does) and ``flagembedding.json``: the class and keyword arguments that reproduce the library's
vectors. Last-token pooling loads in ``FlagLLMModel`` (FlagEmbedding's class for decoder LLMs,
which pools the last token only); mean and first-token pooling in ``FlagModel`` with that
``pooling_method``. The query instruction is put in front of the query as training did
(``query_instruction_format="{}{}"``: FlagLLMModel's default, ``"Instruct: {}\\nQuery: {}"``,
would give other vectors); maximum lengths are the retriever's; ``use_fp16=False`` loads the
weights in float32 (FlagEmbedding's default casts them to float16 before its CPU path turns
them back to float32, which costs the last digits; on a GPU pass ``use_fp16=True``).

Not expressible in one FlagEmbedding model: separate query and passage projections (refused;
the sentence-transformers export handles them) and the sparse and multi-vector heads (only the
dense vector is exported).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..data.tokenizer import with_eos_template
from ..models.retriever import DualTowerRetriever
from ..settings.saved_folder import atomic_folder, verify_checksums, write_checksums
from .projected_encoder import PROJECTED_MODELS

__all__ = ["FLAG_SETTINGS", "flagembedding_settings", "write_flagembedding",
           "export_flagembedding", "load_flagembedding"]

#: The file of an exported folder that names the FlagEmbedding class and its arguments.
FLAG_SETTINGS = "flagembedding.json"


def flagembedding_settings(model: DualTowerRetriever) -> dict:
    """``{"class": ..., "kwargs": ...}``: the FlagEmbedding embedder class (its name in the
    ``FlagEmbedding`` package) and the keyword arguments that give ``model``'s vectors."""
    kwargs = {"normalize_embeddings": True, "use_fp16": False, "trust_remote_code": True,
              "query_instruction_for_retrieval": model.query_instruction or None,
              "query_instruction_format": "{}{}",
              "query_max_length": model.max_query_length,
              "passage_max_length": model.max_passage_length}
    if model.pooling == "last_token":
        return {"class": "FlagLLMModel", "kwargs": kwargs}
    return {"class": "FlagModel", "kwargs": {**kwargs, "pooling_method": model.pooling}}


def write_flagembedding(model: DualTowerRetriever, folder: str | Path) -> Path:
    """Write ``model``'s FlagEmbedding files into ``folder`` (no checksums; see
    :func:`export_flagembedding`)."""
    if model.separate_projections:
        raise ValueError("this retriever has separate query and passage projections, and a "
                         "FlagEmbedding embedder runs one model for both: use "
                         "export_sentence_transformer, whose folder routes each tower")
    name = type(model.encoder).__name__
    if name not in PROJECTED_MODELS:
        raise ValueError(f"no FlagEmbedding export for an encoder of class {name}; known: "
                         f"{', '.join(PROJECTED_MODELS)}")
    cls = PROJECTED_MODELS[name]
    config = copy.deepcopy(model.encoder.config)
    config.projection_dim = model.projection_dim
    projected = cls(config).to(next(model.encoder.parameters()).dtype)
    state = dict(model.encoder.state_dict())
    state.update({f"projection.{k}": v for k, v in model.query_projection.state_dict().items()})
    projected.load_state_dict(state, strict=True)
    cls.register_for_auto_class("AutoModel")  # config.json's auto_map, and the file copied
    folder = Path(folder)
    projected.save_pretrained(str(folder), safe_serialization=True)
    tokenizer = (with_eos_template(model.tokenizer) if model.pooling == "last_token"
                 else model.tokenizer)
    tokenizer.save_pretrained(str(folder))
    (folder / FLAG_SETTINGS).write_text(json.dumps(flagembedding_settings(model), indent=2,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def export_flagembedding(model: DualTowerRetriever, path: str | Path,
                         overwrite: bool = False) -> Path:
    """Write ``model`` as a FlagEmbedding folder at ``path`` (see the module docstring), whole
    or not at all, with ``checksums.json``; a ``path`` holding anything but an earlier export of
    this kind is refused unless ``overwrite``."""
    path = Path(path)
    with atomic_folder(path, (FLAG_SETTINGS, "config.json"), overwrite) as tmp:
        write_flagembedding(model, tmp)
        write_checksums(tmp)
    return path


def load_flagembedding(path: str | Path, **overrides):
    """The FlagEmbedding embedder of an exported folder, built with the folder's
    ``flagembedding.json`` arguments (``overrides`` replace them, e.g. ``devices="cuda:0"``,
    ``use_fp16=True``), after checking the files against their checksums where recorded."""
    import FlagEmbedding

    path = Path(path)
    settings_file = path / FLAG_SETTINGS
    if not settings_file.is_file():
        raise FileNotFoundError(f"{path} has no {FLAG_SETTINGS}: write it with "
                                f"export_flagembedding")
    verify_checksums(path)
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    return getattr(FlagEmbedding, settings["class"])(str(path),
                                                     **{**settings["kwargs"], **overrides})
