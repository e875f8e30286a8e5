"""The dual-tower retriever: a shared pretrained encoder, pooling, projection, L2 normalisation.

Both towers share every weight of the encoder (so the retriever has the parameters of one
tower); the 128-d projection is shared too, or separate per tower (experiment 4.1.1 variant).

Base models are ``transformers`` models: MiniMind (Llama-shaped decoder), Qwen2 and BERT/XLM-R
style encoders, loaded with ``from_pretrained`` from a hub id or a local folder, or built from a
config at any size (the tiny twins of the demo and the tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.tokenizer import load_pretrained_tokenizer
from ..evaluation.windows import AGGREGATIONS
from ..settings.allocator import keep_freed_memory
from ..settings.config import ModelConfig
from ..settings.saved_folder import (
    atomic_folder,
    restore_interrupted,
    verify_checksums,
    write_checksums,
)
from .base import (
    POOLINGS,
    autocast_for,
    build_encoder,
    choose_precision,
    load_encoder,
    load_stage_projection,
)
from .checkpoints import resolve_base_model
from .m3 import M3Heads

__all__ = ["pool", "text_token_ids", "pad_token_ids", "DualTowerRetriever"]

def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool token states ``(B, L, H)`` into one vector per text ``(B, H)``.

    ``mean`` averages the non-padding tokens; ``cls`` takes the first token (BERT-like encoders,
    right padding); ``last_token`` takes the last non-padding token, wherever the padding is
    (left or right), which for a causal decoder is the only state that has seen the whole text.

    >>> h = torch.arange(12.).reshape(2, 3, 2); m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    >>> pool(h, m, "mean").tolist(), pool(h, m, "last_token").tolist()
    ([[1.0, 2.0], [9.0, 10.0]], [[2.0, 3.0], [10.0, 11.0]])
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if method == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if method == "cls":
        return hidden[:, 0]
    if method == "last_token":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {method!r}; expected one of {', '.join(POOLINGS)}")


def text_token_ids(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool,
                   instruction: str = "") -> list[list[int]]:
    """The ids a retriever reads for ``texts``: ``instruction`` in front (its tokens count
    towards ``max_length``), truncated to ``max_length``; with ``append_eos`` (last-token
    pooling) every text ends with EOS, within ``max_length``."""
    if instruction:
        texts = [instruction + t for t in texts]
    if not append_eos:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("last_token pooling needs a tokenizer with an EOS token")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length - 1)
    return [x if x and x[-1] == tokenizer.eos_token_id else x + [tokenizer.eos_token_id]
            for x in enc["input_ids"]]


def pad_token_ids(ids: list[list[int]], pad_id: int, left: bool = False,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` as a tokenizer's ``pad`` makes them: every row
    padded with ``pad_id`` to the longest (rounded up to ``pad_to_multiple_of``), on the left
    or the right."""
    longest = max((len(x) for x in ids), default=0)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        span = slice(longest - len(x), longest) if left else slice(0, len(x))
        input_ids[row, span] = torch.tensor(x, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class DualTowerRetriever(nn.Module):
    """Query tower == passage tower: one encoder, pooling, projection, L2 normalisation."""

    def __init__(self, encoder: nn.Module, tokenizer, pooling: str = "mean",
                 projection_dim: int = 128, separate_projections: bool = False,
                 max_query_length: int = 64, max_passage_length: int = 512,
                 architecture: str | None = None, m3_heads: bool = False,
                 query_instruction: str = "", passage_aggregation: str = "first",
                 passage_stride: int = 0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        if passage_aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown passage_aggregation {passage_aggregation!r}; expected "
                             f"one of {', '.join(AGGREGATIONS)}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.projection_dim = projection_dim
        self.separate_projections = separate_projections
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        self.architecture = architecture or getattr(encoder.config, "model_type", "unknown")
        hidden = encoder.config.hidden_size
        self.query_projection = nn.Linear(hidden, projection_dim)
        self.passage_projection = (nn.Linear(hidden, projection_dim) if separate_projections
                                   else self.query_projection)
        if tokenizer.pad_token is None:  # decoder tokenizers often have none
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.query_instruction = query_instruction
        #: how evaluation scores a passage longer than the window (:mod:`.windows`), and the
        #: tokens between its windows' starts (0: half a window)
        self.passage_aggregation = passage_aggregation
        self.passage_stride = passage_stride
        #: precision of encode_* (:func:`choose_precision`): ``auto`` encodes as training
        #: computes, half precision on a GPU and fp32 on the CPU
        self.precision = "auto"
        self.m3 = None
        if m3_heads:  # sparse + multi-vector heads (retrieval_lib.models.m3)
            self.m3 = M3Heads(hidden, projection_dim, tokenizer.all_special_ids,
                              skip_first_token=pooling == "cls")

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer=None, pretrained: bool = True,
                    dtype: torch.dtype | None = torch.float32) -> DualTowerRetriever:
        """Build the retriever of ``cfg``: pretrained weights (``pretrained``, in ``dtype``:
        float32 master weights by default, see :func:`load_encoder`) or a fresh model of the
        configured shape (demo twins, tests); tokenizer: the model's own; projection: a stage's."""
        if pretrained:
            path, _ = resolve_base_model(cfg.base_model)  # MiniMind: the converted folder
            encoder = load_encoder(path, cfg.trust_remote_code, dtype)
            if tokenizer is None:
                tokenizer = load_pretrained_tokenizer(path, cfg.trust_remote_code)
        else:
            if tokenizer is None:
                raise ValueError("a model built from a config needs a tokenizer")
            encoder = build_encoder(cfg)
        model = cls(encoder, tokenizer, pooling=cfg.pooling, projection_dim=cfg.projection_dim,
                   separate_projections=cfg.separate_projections,
                   max_query_length=cfg.max_query_length,
                   max_passage_length=cfg.max_passage_length, architecture=cfg.architecture,
                   m3_heads=cfg.m3_heads, query_instruction=cfg.query_instruction,
                   passage_aggregation=cfg.passage_aggregation,
                   passage_stride=cfg.passage_stride)
        if pretrained:  # a pretraining stage's projection, where the folder has one
            load_stage_projection({model.query_projection, model.passage_projection}, path)
        return model

    # -- tokenisation ---------------------------------------------------------------------------

    #: Texts whose token ids a retriever keeps (see :meth:`tokenize`); beyond it the cache
    #: starts again empty, so memory stays bounded on large training sets.
    TOKEN_CACHE_SIZE = 200_000

    def tokenize(self, texts: Sequence[str], tower: str = "query",
                 pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with truncation, padding to the longest text (rounded up to
        ``pad_to_multiple_of``) on the tokenizer's padding side; for ``last_token`` pooling
        every text ends with EOS. Queries get ``query_instruction`` in front (its tokens count
        towards the query length).

        The truncated ids of each text are kept (:data:`TOKEN_CACHE_SIZE` texts): evaluation
        encodes the same corpus every epoch and training sees its texts every epoch, and
        tokenising long texts costs more than the small models' forward pass on the CPU."""
        max_length = self.max_query_length if tower == "query" else self.max_passage_length
        signature = (id(self.tokenizer), self.max_query_length, self.max_passage_length,
                     self.query_instruction, self.pooling)
        cache = getattr(self, "_token_cache", None)
        if cache is None or cache[0] != signature or len(cache[1]) > self.TOKEN_CACHE_SIZE:
            cache = self._token_cache = (signature, {})
        known = cache[1]
        missing = list(dict.fromkeys(t for t in texts if (tower, t) not in known))
        if missing:
            for text, ids in zip(missing, self._token_ids(missing, tower, max_length),
                                 strict=True):
                known[tower, text] = ids
        return self._pad([known[tower, t] for t in texts], pad_to_multiple_of)

    def clear_token_cache(self) -> None:
        """Forget the kept token ids: the next encoding tokenises afresh, as new texts are."""
        self._token_cache = None

    def _token_ids(self, texts: list[str], tower: str, max_length: int) -> list[list[int]]:
        return text_token_ids(self.tokenizer, texts, max_length, self.pooling == "last_token",
                              self.query_instruction if tower == "query" else "")

    def _pad(self, ids: list[list[int]], pad_to_multiple_of: int | None
             ) -> dict[str, torch.Tensor]:
        return pad_token_ids(ids, self.tokenizer.pad_token_id,
                             self.tokenizer.padding_side == "left", pad_to_multiple_of)

    # -- forward --------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              tower: str = "query") -> torch.Tensor:
        """L2-normalised embeddings ``(B, projection_dim)`` of one tower, with gradients."""
        # Rotary position encodings (MiniMind, Qwen2) depend only on relative positions, so
        # left padding needs no position-id shift; the padding test checks this.
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden, attention_mask, tower)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             tower: str) -> torch.Tensor:
        """The tower's embedding of the encoder's token states: pooling, projection, L2
        normalisation (in at least float32)."""
        pooled = pool(hidden, attention_mask, self.pooling)
        projection = self.query_projection if tower == "query" else self.passage_projection
        out = projection(pooled)
        if out.dtype in (torch.float16, torch.bfloat16):  # normalise at least in fp32
            out = out.float()
        return nn.functional.normalize(out, dim=-1)

    def embed_m3(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tower: str = "query") -> dict[str, torch.Tensor]:
        """One encoder pass, three representations (needs ``m3_heads``): ``dense``
        ``(B, projection_dim)``, ``sparse`` ``(B, vocab)`` token weights and ``colbert``
        ``(B, L, projection_dim)`` token vectors with their ``colbert_mask``."""
        if self.m3 is None:
            raise ValueError("this retriever has no sparse/multi-vector heads (m3_heads=False)")
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = self.m3.token_mask(input_ids, attention_mask)
        return {"dense": self.head(hidden, attention_mask, tower),
                "sparse": self.m3.sparse(hidden, input_ids, mask, len(self.tokenizer)),
                "colbert": self.m3.colbert(hidden, mask), "colbert_mask": mask}

    def forward(self, query_inputs: dict, passage_inputs: dict
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(query_inputs["input_ids"], query_inputs["attention_mask"], "query")
        p = self.embed(passage_inputs["input_ids"], passage_inputs["attention_mask"], "passage")
        return q, p

    # -- inference ------------------------------------------------------------------------------

    def _batches(self, texts: Sequence[str], tower: str, batch_size: int,
                 show_progress: bool | None = False):
        """Eval-mode batches of ``texts``, longest first (less padding): yields the indices of
        the batch in ``texts`` and its ``input_ids`` / ``attention_mask`` on the model's device;
        the training mode is restored afterwards."""
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode_* takes a list of texts, not one string")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        if device.type == "cpu":
            keep_freed_memory()  # large activations reuse mapped pages (see allocator)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress is None:
            show_progress = len(texts) > 10 * batch_size
        try:
            for start in tqdm(range(0, len(texts), batch_size), disable=not show_progress,
                              desc=f"encode {tower}"):
                idx = order[start:start + batch_size]
                enc = self.tokenize([texts[i] for i in idx], tower)
                yield idx, enc["input_ids"].to(device), enc["attention_mask"].to(device)
        finally:
            self.train(was_training)

    def _autocast(self):
        """The autocast of :attr:`precision` on the model's device (encoding)."""
        device = next(self.parameters()).device
        return autocast_for(device, choose_precision(device, self.precision)[0])

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], tower: str, batch_size: int,
                show_progress: bool | None) -> np.ndarray:
        out = np.zeros((len(texts), self.projection_dim), dtype=np.float32)
        for idx, ids, mask in self._batches(texts, tower, batch_size, show_progress):
            with self._autocast():
                out[idx] = self.embed(ids, mask, tower).float().cpu().numpy()
        return out

    @torch.no_grad()
    def encode_m3(self, texts: Sequence[str], tower: str = "passage", batch_size: int = 32
                  ) -> dict:
        """``dense`` (N x projection_dim), ``sparse`` (per text ``{token id: weight}``, weights
        > 0) and ``colbert`` (per text its ``(tokens, dim)`` vectors), the inputs of
        :func:`retrieval_lib.models.m3.evaluate_reranked`."""
        dense = np.zeros((len(texts), self.projection_dim), dtype=np.float32)
        sparse, colbert = [None] * len(texts), [None] * len(texts)
        for idx, ids, mask in self._batches(texts, tower, batch_size):
            with self._autocast():
                out = self.embed_m3(ids, mask, tower)
            dense[idx] = out["dense"].cpu().numpy()
            weights = out["sparse"].float().cpu()
            for row, i in enumerate(idx):
                nonzero = weights[row].nonzero().squeeze(-1)
                sparse[i] = dict(zip(nonzero.tolist(), weights[row, nonzero].tolist(),
                                     strict=True))
                keep = out["colbert_mask"][row].cpu()
                colbert[i] = out["colbert"][row].float().cpu()[keep].numpy()
        return {"dense": dense, "sparse": sparse, "colbert": colbert}

    def encode_queries(self, texts: Sequence[str], batch_size: int = 64,
                       show_progress: bool | None = None) -> np.ndarray:
        """Query embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "query", batch_size, show_progress)

    def encode_passages(self, texts: Sequence[str], batch_size: int = 32,
                        show_progress: bool | None = None) -> np.ndarray:
        """Passage embeddings ``(len(texts), projection_dim)``, float32, unit norm."""
        return self._encode(texts, "passage", batch_size, show_progress)

    # -- persistence ----------------------------------------------------------------------------

    def retriever_config(self) -> dict:
        return {"pooling": self.pooling, "projection_dim": self.projection_dim,
                "separate_projections": self.separate_projections,
                "max_query_length": self.max_query_length,
                "max_passage_length": self.max_passage_length,
                "architecture": self.architecture,
                "hidden_size": self.encoder.config.hidden_size,
                "m3_heads": self.m3 is not None,
                "query_instruction": self.query_instruction,
                "passage_aggregation": self.passage_aggregation,
                "passage_stride": self.passage_stride}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``encoder/`` (weights as safetensors, config, tokenizer), ``head.safetensors``
        (the projection), ``retriever_config.json`` and ``checksums.json`` (size and SHA-256 of
        each, checked by :meth:`load`). The folder is written whole or not at all: a save that
        fails part-way leaves the previous one at ``path`` as it was. A ``path`` that holds
        anything but an earlier saved retriever is refused unless ``overwrite``."""
        path = Path(path)
        with atomic_folder(path, ("retriever_config.json",), overwrite) as tmp:
            self._write(tmp)
            write_checksums(tmp)
        return path

    def _head_parts(self) -> dict[str, nn.Module]:
        """The modules of ``head.safetensors`` by key prefix."""
        parts = {"query_projection": self.query_projection, "m3": self.m3, "passage_projection":
                 self.passage_projection if self.separate_projections else None}
        return {name: part for name, part in parts.items() if part is not None}

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        self.encoder.save_pretrained(str(path / "encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path / "encoder"))
        head = {f"{name}.{k}": v.detach().cpu().contiguous()
                for name, part in self._head_parts().items() for k, v in part.state_dict().items()}
        save_file(head, str(path / "head.safetensors"))
        (path / "retriever_config.json").write_text(
            json.dumps(self.retriever_config(), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             trust_remote_code: bool = False) -> DualTowerRetriever:
        """Load a retriever written by :meth:`save` (safetensors only, no pickle), after
        checking every file against its ``checksums.json`` (:class:`CheckpointError` names a
        truncated, edited or missing file; folders saved before checksums load unchecked)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        restore_interrupted(path)  # a save killed between its renames parked the old copy
        config_path = path / "retriever_config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{path} is not a saved retriever (no retriever_config.json)")
        verify_checksums(path)
        rc = json.loads(config_path.read_text(encoding="utf-8"))
        encoder = AutoModel.from_pretrained(str(path / "encoder"),
                                            trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(path / "encoder"),
                                                  trust_remote_code=trust_remote_code)
        model = cls(encoder, tokenizer, pooling=rc["pooling"], projection_dim=rc["projection_dim"],
                    separate_projections=rc["separate_projections"],
                    max_query_length=rc["max_query_length"],
                    max_passage_length=rc["max_passage_length"],
                    architecture=rc["architecture"], m3_heads=rc.get("m3_heads", False),
                    query_instruction=rc.get("query_instruction", ""),
                    passage_aggregation=rc.get("passage_aggregation", "first"),
                    passage_stride=rc.get("passage_stride", 0))
        head = load_file(str(path / "head.safetensors"))
        for name, part in model._head_parts().items():
            part.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()
                                  if k.startswith(f"{name}.")})
        return model.to(device)
